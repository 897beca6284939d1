"""KD tuning of a quantized network lowers the distillation loss and touches only its target."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ptq_jax
from ptq_jax.stages.bias_tuning import kd_tune, kl_to_teacher
from ptq_jax.stages.prepare import prepare
from test_quant import ToyNet, random_variables


@pytest.fixture(scope='module')
def toy_w3a3():
  model = ToyNet()
  x = np.asarray(jax.random.normal(jax.random.key(5), (64, 12, 12, 3)))
  variables = random_variables(model, x)
  return model, variables, x, ptq_jax.quantize(model, variables, x, w_bits=3, a_bits=3,
                                               first_last_bits=None)


def test_kl_is_zero_for_identical_logits_and_positive_otherwise():
  a = jax.random.normal(jax.random.key(0), (4, 5))
  assert abs(float(kl_to_teacher(a, a))) < 1e-6
  assert float(kl_to_teacher(a, a[::-1])) > 0


@pytest.mark.parametrize('target', ['bias', 'all'])
def test_kd_tuning_lowers_the_loss_and_touches_only_its_target(toy_w3a3, target):
  model, variables, x, base = toy_w3a3
  state, report = kd_tune(prepare(model, variables, x, progress=False), base.qstate, target=target,
                          steps=60, batch_size=16)
  assert report['kd_loss_after'] < report['kd_loss_before']
  for path, lq in state.items():
    old = base.qstate[path]
    np.testing.assert_array_equal(lq.w_quant.range, old.w_quant.range)
    np.testing.assert_array_equal(lq.a_quant.low, old.a_quant.low)
    kernel_same = bool(jnp.all(lq.kernel == old.kernel))
    assert kernel_same == (target == 'bias')


def test_kd_tuning_warns_when_its_steps_raise_the_loss(toy_w3a3):
  """Steps far too large for the network (SGD lr 0.1 on an ImageNet-size one did this)
  must not pass silently: the stage says the loss rose and what to change."""
  model, variables, x, base = toy_w3a3
  with pytest.warns(UserWarning, match="raised the KD loss.*bias_optimizer='adam'"):
    kd_tune(prepare(model, variables, x, progress=False), base.qstate, steps=5,
            batch_size=16, optimizer=optax.sgd(1e4))


def test_bad_target(toy_w3a3):
  model, variables, x, base = toy_w3a3
  with pytest.raises(ValueError, match="target must be one of"):
    kd_tune(prepare(model, variables, x), base.qstate, target='kernels')
