"""The light, advanced and sequential pipelines end to end on a tiny model."""

import jax
import numpy as np
import pytest

import ptq_jax
from ptq_jax.distill import kl_to_teacher
from tests.test_quant import ToyNet, random_variables

FAST = ptq_jax.AdaQuantConfig(iterations=20, batch_size=8)


@pytest.fixture(scope='module')
def toy():
  model = ToyNet()
  x = jax.random.normal(jax.random.key(7), (32, 12, 12, 3))
  return model, random_variables(model, x), np.asarray(x)


@pytest.mark.parametrize('pipeline,kwargs,stages', [
    ('light', dict(size_pct=16), ['mixed_precision', 'bn_tuning']),
    ('advanced', dict(size_pct=16, bias_steps=30),
     ['mixed_precision', 'bn_tuning', 'bias_tuning']),
    ('sequential', dict(w_bits=4, a_bits=4, bias_steps=30),
     ['ranges', 'adaquant', 'bn_tuning', 'bias_tuning']),
])
def test_pipeline_end_to_end(toy, pipeline, kwargs, stages):
  model, variables, x = toy
  result = ptq_jax.run_pipeline(model, variables, x, pipeline, options=('W8A8', 'W4A4'),
                                adaquant=FAST, progress=False, **kwargs)
  assert [s.name for s in result.stages] == stages
  assert result.model.options['stages'] == stages
  out = result.model.predict(x)
  assert out.shape == (32, 5) and np.all(np.isfinite(out))
  if pipeline != 'sequential':
    assert result.allocation.size_pct_of_fp32 <= 16
    assert result.model.size_bits() == result.allocation.size_bits
  for stage in result.stages:
    assert f'{stage.name}_seconds' in result.model.timings


def test_bias_tuning_lowers_the_kd_loss(toy):
  model, variables, x = toy
  result = ptq_jax.run_pipeline(model, variables, x, 'sequential', w_bits=3, a_bits=3,
                                first_last_bits=None, adaquant=ptq_jax.AdaQuantConfig(
                                    iterations=0), bias_steps=200, progress=False)
  fp = ptq_jax.predict_logits(model, variables, x)
  before = result.stages[-2].model.predict(x)
  after = result.stages[-1].model.predict(x)
  assert float(kl_to_teacher(fp, after)) < float(kl_to_teacher(fp, before))
  # Only biases moved.
  for path, lq in result.stages[-1].model.qstate.items():
    np.testing.assert_array_equal(lq.kernel, result.stages[-2].model.qstate[path].kernel)


def test_quantize_selects_a_pipeline_and_checks_budgets(toy):
  model, variables, x = toy
  qm = ptq_jax.quantize(model, variables, x, pipeline='light', size_pct=20, progress=False)
  assert qm.options['stages'] == ['mixed_precision', 'bn_tuning']
  with pytest.raises(ValueError, match='give size_pct'):
    ptq_jax.run_pipeline(model, variables, x, 'advanced', progress=False)
  with pytest.raises(ValueError, match='fixed bit widths'):
    ptq_jax.run_pipeline(model, variables, x, 'sequential', size_pct=13, progress=False)
  with pytest.raises(ValueError, match="pipeline='fast'"):
    ptq_jax.run_pipeline(model, variables, x, 'fast', progress=False)
  with pytest.raises(ValueError, match='budgets of the light and advanced'):
    ptq_jax.quantize(model, variables, x, size_pct=13, progress=False)
