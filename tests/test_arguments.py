"""Careless arguments to the public entry points: each is a TypeError or ValueError that
names the argument, raised before any work, never a raw error from deep inside."""

import jax
import numpy as np
import pytest

import ptq_jax
from ptq_jax.data.loader import sample_indices
from ptq_jax.quant.quantizer import parse_option
from ptq_jax.stages import allocation as alloc
from ptq_jax.stages.bn_tuning import bn_tune
from ptq_jax.stages.sensitivity import SensitivityTable
from tests.test_quant import ToyNet, random_variables


@pytest.fixture(scope='module')
def toy():
  model = ToyNet()
  x = jax.random.normal(jax.random.key(7), (16, 12, 12, 3))
  return model, random_variables(model, x), np.asarray(x)


TABLE = SensitivityTable(('a', 'b'), ((8, 8), (4, 4)), np.ones((2, 2)), np.ones((2, 2)), 0.0,
                         (100, 10), (1000, 50))

CASES = [  # (what, call given the toy model, error type, words the message must hold)
    ('overrides not a dict of dicts', lambda m, v, x: ptq_jax.quantize(
        m, v, x, overrides={'Conv_0': 4}), TypeError, "overrides['Conv_0']"),
    ('overrides a list', lambda m, v, x: ptq_jax.quantize(m, v, x, overrides=[1]), TypeError,
     'overrides must be a dict'),
    ('key an int', lambda m, v, x: ptq_jax.quantize(m, v, x, key=0), TypeError,
     'jax.random.key'),
    ('pipeline key an int', lambda m, v, x: ptq_jax.run_pipeline(m, v, x, 'light', key=0),
     TypeError, 'jax.random.key'),
    ('bias_steps a float', lambda m, v, x: ptq_jax.run_pipeline(m, v, x, bias_steps=2.5),
     TypeError, 'bias_steps'),
    ('option a bare int', lambda m, v, x: parse_option(4), ValueError, '(w_bits, a_bits) pair'),
    ('option of one', lambda m, v, x: parse_option((4,)), ValueError, '(w_bits, a_bits) pair'),
    ('size_pct a string', lambda m, v, x: alloc.budgets_from_pct(TABLE, size_pct='13'),
     TypeError, 'size_pct'),
    ('size_pct NaN', lambda m, v, x: alloc.budgets_from_pct(TABLE, size_pct=float('nan')),
     ValueError, 'size_pct'),
    ('budget negative', lambda m, v, x: alloc.allocate(TABLE, size_bits=-1), ValueError,
     'size_bits'),
    ('seed negative', lambda m, v, x: sample_indices(100, 10, -1), ValueError, 'seed'),
    ('calibration size a float', lambda m, v, x: sample_indices(100, 10.5, 0), TypeError,
     'calibration set size'),
    ('labels out of range', lambda m, v, x: ptq_jax.mixed_precision(
        m, v, x, options=('W8A8',), labels=np.full(len(x), 99), progress=False), ValueError,
     'class 99'),
    ('labels negative', lambda m, v, x: ptq_jax.mixed_precision(
        m, v, x, options=('W8A8',), labels=np.full(len(x), -1), progress=False), ValueError,
     '>= 0'),
    ('labels as floats', lambda m, v, x: ptq_jax.mixed_precision(
        m, v, x, options=('W8A8',), labels=np.zeros(len(x)), progress=False), ValueError,
     'integer class indices'),
    ('AdaQuant rate infinite', lambda m, v, x: ptq_jax.AdaQuantConfig(lr_a_quant=float('inf')),
     ValueError, 'lr_a_quant'),
    ('AdaQuant batch 0', lambda m, v, x: ptq_jax.AdaQuantConfig(batch_size=0), ValueError,
     'batch_size'),
]


@pytest.mark.parametrize('case', CASES, ids=[c[0] for c in CASES])
def test_careless_arguments(toy, case):
  _, call, error, words = case
  with pytest.raises(error) as raised:
    call(*toy)
  assert words in str(raised.value)


def test_bn_tuning_warns_on_too_few_images(toy):
  model, variables, x = toy
  qm = ptq_jax.quantize(model, variables, x, w_bits=8, a_bits=8, first_last_bits=None)
  with pytest.warns(UserWarning, match='BN tuning on 4 calibration image'):
    bn_tune(model, qm.variables, qm.layers, qm.qstate, x[:4], progress=False)
