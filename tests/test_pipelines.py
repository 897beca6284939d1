"""The light, advanced and sequential pipelines end to end on a tiny model."""

import jax
import numpy as np
import pytest

import ptq_jax
from ptq_jax.qat import QATConfig, qat_train
from ptq_jax.stages.bias_tuning import kl_to_teacher
from ptq_jax.stages.prepare import Stage
from ptq_jax.stages.stage_guard import guarded, output_kl
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
    ('light', dict(w_bits=4, a_bits=4), ['ranges', 'bn_tuning']),
    ('advanced', dict(w_bits=4, a_bits=4, bias_steps=30),
     ['ranges', 'adaquant', 'bn_tuning', 'bias_tuning']),
])
def test_pipeline_end_to_end(toy, pipeline, kwargs, stages):
  model, variables, x = toy
  result = ptq_jax.run_pipeline(model, variables, x, pipeline, options=('W8A8', 'W4A4'),
                                adaquant=FAST, progress=False, **kwargs)
  assert [s.name for s in result.stages] == stages
  assert result.model.settings['stages'] == stages
  out = result.model.predict(x)
  assert out.shape == (32, 5) and np.all(np.isfinite(out))
  if 'size_pct' in kwargs:
    assert result.allocation.size_pct_of_fp32 <= 16
    assert result.model.size_bits() == result.allocation.size_bits
  for stage in result.stages:
    assert f'{stage.name}_seconds' in result.model.timings


def test_bias_tuning_lowers_the_kd_loss_with_either_optimizer(toy):
  model, variables, x = toy
  fp = ptq_jax.predict_logits(model, variables, x)
  biases = {}
  for optimizer in ('sgd', 'adam'):
    result = ptq_jax.run_pipeline(model, variables, x, 'sequential', w_bits=3, a_bits=3,
                                  first_last_bits=None, adaquant=ptq_jax.AdaQuantConfig(
                                      iterations=0), bias_steps=200, bias_optimizer=optimizer,
                                  progress=False)
    before = result.stages[-2].model.predict(x)
    after = result.stages[-1].model.predict(x)
    assert float(kl_to_teacher(fp, after)) < float(kl_to_teacher(fp, before))
    assert result.model.settings['bias_optimizer'] == optimizer
    # Only biases moved.
    for path, lq in result.stages[-1].model.qstate.items():
      np.testing.assert_array_equal(lq.kernel, result.stages[-2].model.qstate[path].kernel)
    biases[optimizer] = {p: np.asarray(lq.bias) for p, lq in result.model.qstate.items()
                         if lq.bias is not None}
  # The named optimiser is the one that ran (the same start, other steps).
  assert any(not np.allclose(biases['sgd'][p], biases['adam'][p]) for p in biases['sgd'])
  with pytest.raises(ValueError, match="bias_optimizer='adamw' is not one of"):
    ptq_jax.run_pipeline(model, variables, x, 'sequential', bias_optimizer='adamw',
                         progress=False)


def test_pipeline_checks_budgets_and_names(toy):
  model, variables, x = toy
  qm = ptq_jax.run_pipeline(model, variables, x, 'light', size_pct=20, progress=False).model
  assert qm.settings['stages'] == ['mixed_precision', 'bn_tuning']
  with pytest.raises(ValueError, match='fixed bit widths'):
    ptq_jax.run_pipeline(model, variables, x, 'sequential', size_pct=13, progress=False)
  with pytest.raises(ValueError, match="pipeline='fast'"):
    ptq_jax.run_pipeline(model, variables, x, 'fast', progress=False)
  with pytest.raises(TypeError, match='size_pct'):   # budgets belong to run_pipeline
    ptq_jax.quantize(model, variables, x, size_pct=13, progress=False)


def test_fixed_advanced_is_parallel_adaquant_and_shares_its_states(toy):
  """Advanced at W4A4 (first/last 8-bit) = parallel AdaQuant from the option states; a
  mixed run handed those states (mixed=) reuses them instead of recomputing."""
  model, variables, x = toy
  fixed = ptq_jax.run_pipeline(model, variables, x, 'advanced', w_bits=4, a_bits=4,
                               options=('W8A8', 'W4A4'), adaquant=FAST, bias_steps=0,
                               progress=False)
  adaquant = fixed.stages[1].model
  bits = adaquant.bits()
  paths = list(bits)
  assert bits[paths[0]] == bits[paths[-1]] == (8, 8)
  assert all(bits[p] == (4, 4) for p in paths[1:-1])
  # Each layer's state is exactly its option's parallel-AdaQuant state.
  for path in paths:
    option = (8, 8) if path in (paths[0], paths[-1]) else (4, 4)
    np.testing.assert_array_equal(adaquant.qstate[path].kernel,
                                  fixed.mixed.option_states[option][path].kernel)
  assert [r['path'] for r in adaquant.layer_reports] == paths
  mixed = ptq_jax.run_pipeline(model, variables, x, 'advanced', size_pct=16,
                               options=('W8A8', 'W4A4'), adaquant=FAST, bias_steps=0,
                               mixed=fixed.mixed, progress=False)
  assert mixed.mixed is fixed.mixed
  for path, option in mixed.allocation.choice.items():
    np.testing.assert_array_equal(mixed.stages[0].model.qstate[path].kernel,
                                  fixed.mixed.option_states[option][path].kernel)
  with pytest.raises(ValueError, match='needs ptq states'):
    ptq_jax.run_pipeline(model, variables, x, 'light', size_pct=16, mixed=fixed.mixed,
                         progress=False)


def test_qat_trains_the_quantized_model_on_labels(toy):
  model, variables, x = toy
  labels = np.argmax(np.asarray(ptq_jax.predict_logits(model, variables, x)), -1)
  qm = ptq_jax.quantize(model, variables, x, w_bits=3, a_bits=3, first_last_bits=None,
                        progress=False)
  raw = (x - x.min()) / (x.max() - x.min()) * 255  # "pixels"; preprocess undoes the scaling
  preprocess = lambda p: p / 255 * (x.max() - x.min()) + x.min()
  trained, report = qat_train(qm, raw, labels, preprocess, QATConfig(
      epochs=25, batch_size=16, learning_rate=1e-3, crop_pad=0, flip=False), progress=False)
  assert report['steps'] == 50 and report['loss_by_tenth'][-1] < report['loss_by_tenth'][0]
  assert trained.settings['stages'][-1] == 'qat' and trained.bits() == qm.bits()
  def ce(m):
    logp = np.asarray(jax.nn.log_softmax(m.predict(x)))
    return -np.mean(logp[np.arange(len(labels)), labels])
  assert ce(trained) < ce(qm)
  # Kernels, biases and quantizer ranges all moved.
  path = next(iter(qm.qstate))
  for field in (lambda lq: lq.kernel, lambda lq: lq.bias, lambda lq: lq.a_quant.range):
    assert not np.allclose(field(trained.qstate[path]), field(qm.qstate[path]))
  with pytest.raises(ValueError, match='epochs'):
    QATConfig(epochs=0)
  with pytest.raises(ValueError, match='at least one batch'):
    qat_train(qm, raw, labels, preprocess, QATConfig(batch_size=1000), progress=False)


def test_a_hand_made_stage_list_is_the_sequential_pipeline(toy):
  """The stages compose as documented (README, docs/method.md): ranges -> sequential
  AdaQuant -> BN tuning -> bias tuning run by hand through ``run_stages`` give exactly
  what ``run_pipeline('sequential')`` gives, stage by stage."""
  from ptq_jax import stages as st   # every constructor from one place
  model, variables, x = toy
  key = jax.random.key(5)
  prepared = st.prepare(model, variables, x, progress=False)
  stages = [st.ranges_stage(st.BitsRule(4, 4, first_last_bits=8)),
            st.adaquant_stage('sequential', FAST), st.bn_tuning_stage(),
            st.bias_tuning_stage(10)]
  by_hand = st.run_stages(prepared, stages, key)
  # The recipe gives the same list.
  spec = ptq_jax.QuantSpec(adaquant=FAST, mode='sequential', bias_steps=10)
  assert [s.name for s in ptq_jax.recipes.sequential(spec)] == [s.name for s in stages]
  result = ptq_jax.run_pipeline(model, variables, x, 'sequential', adaquant=FAST,
                                bias_steps=10, key=key, progress=False)
  assert [s[0] for s in by_hand] == [s.name for s in result.stages]
  for (_, state, _, _), stage in zip(by_hand, result.stages):
    jax.tree.map(np.testing.assert_array_equal, state, stage.model.qstate)


def test_the_stage_guard_keeps_a_stage_only_if_it_lowers_the_output_kl(toy):
  """A stage that shifts every bias is dropped (its input state comes back, its own
  report kept beside the guard's); a stage that raises the bit widths is kept. The
  measured loss is KL(FP32 || quantized) over the calibration images."""
  model, variables, x = toy
  prepared = ptq_jax.stages.prepare(model, variables, x)
  w4 = ptq_jax.quantize(model, variables, x, w_bits=4, a_bits=4, progress=False)
  w8 = ptq_jax.quantize(model, variables, x, w_bits=8, a_bits=8, progress=False)
  fp = ptq_jax.predict_logits(model, variables, x)
  np.testing.assert_allclose(output_kl(prepared, w4.qstate),
                             float(kl_to_teacher(fp, w4.predict(x))), rtol=1e-4)
  harm = Stage('harm', lambda p, s, k: ({q: lq.replace(bias=lq.bias + 3.0)
                                         for q, lq in s.items()}, 'own report'))
  state, report = guarded(harm).apply(prepared, w4.qstate, jax.random.key(0))
  assert not report.kept and report.kl_after > report.kl_before and report.report == 'own report'
  for q, lq in state.items():
    np.testing.assert_array_equal(lq.bias, w4.qstate[q].bias)
  better = Stage('better', lambda p, s, k: (w8.qstate, None))
  state, report = guarded(better).apply(prepared, w4.qstate, jax.random.key(0))
  assert report.kept and report.kl_after < report.kl_before and state is w8.qstate


def test_a_guarded_pipeline_goes_on_from_the_state_before_a_dropped_stage(toy):
  """AdaQuant without its own guard at an absurd learning rate wrecks the model: with
  stage_guard=True the pipeline drops it, records why, and BN tuning starts from the
  ranges' state; the end is no worse than the start on the calibration images."""
  model, variables, x = toy
  absurd = ptq_jax.AdaQuantConfig(iterations=12, batch_size=8, lr_kernel=10.0, lr_bias=10.0,
                                  lr_schedule='constant', guard=False)
  kwargs = dict(w_bits=4, a_bits=4, adaquant=absurd, bias_steps=0, progress=False)
  safe = ptq_jax.run_pipeline(model, variables, x, 'sequential', stage_guard=True, **kwargs)
  assert [s.name for s in safe.stages] == ['ranges', 'adaquant', 'bn_tuning']
  assert safe.stages[0].guard is None and all(s.guard is not None for s in safe.stages[1:])
  ranges, dropped, bn = safe.stages
  assert not dropped.kept and dropped.guard.kl_after > dropped.guard.kl_before
  assert dropped.model.layer_reports == [] and dropped.report   # reports of the attempt
  prepared = ptq_jax.stages.prepare(model, variables, x)
  for path, lq in dropped.model.qstate.items():
    np.testing.assert_array_equal(lq.kernel, ranges.model.qstate[path].kernel)
  assert 'adaquant' not in safe.model.settings['stages']
  assert output_kl(prepared, safe.model.qstate) <= output_kl(prepared, ranges.model.qstate)
  with pytest.raises(TypeError, match='stage_guard'):
    ptq_jax.run_pipeline(model, variables, x, 'light', stage_guard='yes', progress=False)


def test_every_entry_point_records_the_settings_the_spec_writes(toy):
  """One writer of the recorded settings: quantize, a pipeline and a mixed model record
  the same range settings (the percentile was once recorded by quantize only)."""
  model, variables, x = toy
  ranges = ptq_jax.RangeConfig('percentile', percentile=99.5)
  models = [ptq_jax.quantize(model, variables, x, ranges=ranges, progress=False),
            ptq_jax.run_pipeline(model, variables, x, 'light', ranges=ranges,
                                 progress=False).model,
            ptq_jax.mixed_precision(model, variables, x, options=('W8A8', 'W4A4'),
                                    ranges=ranges, progress=False).quantize(size_pct=20)[0]]
  for qm in models:
    assert (qm.settings['range_method'], qm.settings['percentile']) == ('percentile', 99.5)
  assert [qm.settings['method'] for qm in models] == ['ptq', 'ptq', 'mixed_precision']
  spec = ptq_jax.QuantSpec(ranges=ranges)
  assert spec.settings(32) == {k: models[0].settings[k] for k in spec.settings(32)}


def test_the_spec_checks_its_settings_before_any_work():
  with pytest.raises(ValueError, match='mode'):
    ptq_jax.QuantSpec(mode='sideways')
  with pytest.raises(ValueError, match='w_bits'):
    ptq_jax.QuantSpec(w_bits=1)
  with pytest.raises(TypeError, match='ranges'):
    ptq_jax.QuantSpec(ranges=3)
  with pytest.raises(ValueError, match='bn_target'):
    ptq_jax.QuantSpec(bn_target='ema')
  assert ptq_jax.QuantSpec(ranges='mse').ranges == ptq_jax.RangeConfig('mse')


def test_the_mixed_stage_reports_its_allocation_instead_of_writing_a_result(toy):
  """The mixed-precision stage is a plain stage: its report carries the allocation, the
  table and the reusable states; the pipeline's result only reads them."""
  model, variables, x = toy
  from ptq_jax.mixed_precision import MixedReport
  result = ptq_jax.run_pipeline(model, variables, x, 'light', size_pct=20,
                                options=('W8A8', 'W4A4'), progress=False)
  report = result.stages[0].report
  assert isinstance(report, MixedReport)
  assert result.allocation is report.allocation and result.table is report.mixed.table
  assert result.mixed is report.mixed
  assert result.model.settings['allocation'] == report.allocation.counts()
