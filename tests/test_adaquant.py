"""AdaQuant: lowers every layer's error, sequential inputs, determinism, compilation reuse."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ptq_jax
from ptq_jax.models import create_model
from ptq_jax.quant.capture import InputCapture
from ptq_jax.stages.adaquant import driver as adaquant_driver
from ptq_jax.stages.adaquant import layer as adaquant
from ptq_jax.stages.adaquant.driver import run_adaquant
from ptq_jax.stages.prepare import prepare
from ptq_jax.quant.interceptor import apply_quantized
from test_quant import ToyNet, random_variables

CONFIG = ptq_jax.AdaQuantConfig(iterations=120, batch_size=16)


@pytest.fixture(scope='module')
def toy_w3a3():
  model = ToyNet()
  x = jax.random.normal(jax.random.key(3), (64, 12, 12, 3))
  variables = random_variables(model, x)
  base = ptq_jax.quantize(model, variables, np.asarray(x), w_bits=3, a_bits=3,
                          first_last_bits=None)
  return model, variables, np.asarray(x), base


@pytest.mark.parametrize('mode', ['parallel', 'sequential'])
def test_adaquant_lowers_every_layers_error(toy_w3a3, mode):
  model, variables, x, base = toy_w3a3
  state, reports = run_adaquant(prepare(model, variables, x, progress=False), base.qstate, mode,
                                         CONFIG, jax.random.key(0))
  assert [r['path'] for r in reports] == [l.path for l in base.layers]
  for r in reports:
    assert r['mse_after'] < r['mse_before'], r
  # The whole network gets closer to the float one too.
  ref = model.apply(variables, x)
  err = lambda st: float(jnp.mean((apply_quantized(model, variables, st, base.folded_bns, x) - ref)**2))
  assert err(state) < err(base.qstate)


def test_quantize_entry_point(toy_w3a3):
  model, variables, x, base = toy_w3a3
  qm = ptq_jax.quantize(model, variables, x, w_bits=3, a_bits=3, first_last_bits=None,
                        method='adaquant', mode='sequential', adaquant=CONFIG)
  assert qm.settings['method'] == 'adaquant' and qm.settings['mode'] == 'sequential'
  assert qm.settings['adaquant']['iterations'] == 120
  assert len(qm.layer_reports) == len(qm.layers) and 'adaquant_seconds' in qm.timings
  with pytest.raises(ValueError, match="mode='diagonal'"):
    ptq_jax.quantize(model, variables, x, method='adaquant', mode='diagonal')
  with pytest.raises(ValueError, match="method='gptq'"):
    ptq_jax.quantize(model, variables, x, method='gptq')


def test_sequential_inputs_come_from_the_quantized_prefix(toy_w3a3, monkeypatch):
  model, variables, x, base = toy_w3a3
  seen, targets = {}, {}
  original = adaquant_driver.optimize_layer

  def recording(layer, lq, xs, ys, *args, **kwargs):
    seen[layer.path], targets[layer.path] = np.asarray(xs), np.asarray(ys)
    return original(layer, lq, xs, ys, *args, **kwargs)

  monkeypatch.setattr(adaquant_driver, 'optimize_layer', recording)
  config = ptq_jax.AdaQuantConfig(iterations=20, batch_size=16)
  state, _ = run_adaquant(prepare(model, variables, x, progress=False), base.qstate, 'sequential',
                                   config, jax.random.key(0))
  float_state = {p: adaquant.LayerQuant(lq.kernel, lq.bias) for p, lq in base.qstate.items()}
  for i, layer in enumerate(base.layers):
    # Expected input: the network with the final (optimised) state for the layers before
    # this one; later layers cannot influence it.
    prefix = {p: (state[p] if j < i else float_state[p])
              for j, p in enumerate(l.path for l in base.layers)}
    captured = {}
    apply_quantized(model, variables, prefix, base.folded_bns, jnp.asarray(x),
                    on_layer=lambda p, v: captured.setdefault(p, v))
    np.testing.assert_allclose(seen[layer.path], captured[layer.path], rtol=1e-5, atol=1e-5)
    # The target is the float layer on the float model's input, not on the prefix's.
    fp = {}
    apply_quantized(model, variables, float_state, base.folded_bns, jnp.asarray(x),
                    on_layer=lambda p, v: fp.setdefault(p, v))
    want = adaquant.float_target(layer.geometry, layer.activation, float_state[layer.path],
                                 fp[layer.path])
    np.testing.assert_allclose(targets[layer.path], want, rtol=1e-5, atol=1e-5)
    if i > 0:  # ... and the input is not the float model's input.
      assert float(jnp.max(jnp.abs(fp[layer.path] - seen[layer.path]))) > 1e-3


def test_deterministic_for_a_seed(toy_w3a3):
  model, variables, x, base = toy_w3a3
  config = ptq_jax.AdaQuantConfig(iterations=15, batch_size=8)
  run = lambda seed: run_adaquant(prepare(model, variables, x, progress=False), base.qstate,
                                  'parallel', config, jax.random.key(seed))[0]
  a, b, c = run(1), run(1), run(2)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  diffs = jax.tree.map(lambda u, v: bool(jnp.any(u != v)), a, c)
  assert any(jax.tree.leaves(diffs))


def test_same_geometry_layer_does_not_recompile():
  model = create_model('resnet20')
  x = jax.random.normal(jax.random.key(0), (32, 28, 28, 1))
  variables = random_variables(model, x)
  base = ptq_jax.quantize(model, variables, np.asarray(x), w_bits=4, a_bits=4)
  layers = {l.path: l for l in base.layers}
  first, second = layers['BasicBlock_0/Conv_0'], layers['BasicBlock_1/Conv_0']
  assert first.geometry == second.geometry and first.activation == second.activation
  config = ptq_jax.AdaQuantConfig(iterations=3, batch_size=8)
  capture = InputCapture(model, variables, base.folded_bns)
  inputs = capture(base.qstate, np.asarray(x), [first.path, second.path])
  for layer in (first, second):
    lq = base.qstate[layer.path]
    y = adaquant.float_target(layer.geometry, layer.activation, lq, inputs[layer.path])
    adaquant.optimize_layer(layer, lq, inputs[layer.path], y, config, jax.random.key(0))
    if layer is first:
      compiled = adaquant.compiled_step_count()
  assert adaquant.compiled_step_count() == compiled


def test_batched_target_and_error_equal_the_whole_set_ones(toy_w3a3):
  """The float target and reconstruction error computed in minibatch-sized pieces
  inside one program (the GPU default, so their convs share the step's shapes) equal
  the whole-set computation, including a smaller remainder batch."""
  model, variables, x, base = toy_w3a3
  capture = InputCapture(model, variables, base.folded_bns)
  for layer in base.layers[:2]:
    xs = capture(base.qstate, x, [layer.path])[layer.path]
    lq = base.qstate[layer.path]
    float_lq = adaquant.LayerQuant(lq.kernel, lq.bias)
    whole = adaquant.float_targets(layer.geometry, layer.activation, float_lq, xs)
    for batch in (7, len(xs)):          # with a remainder; one batch
      pieces = adaquant.float_targets(layer.geometry, layer.activation, float_lq, xs, batch)
      np.testing.assert_allclose(pieces, whole, rtol=1e-5, atol=1e-6)
      errors = adaquant.reconstruction_error(layer.geometry, layer.activation, lq, xs, whole,
                                             batch)
      np.testing.assert_allclose(errors, adaquant.reconstruction_error(
          layer.geometry, layer.activation, lq, xs, whole), rtol=1e-5)
    assert errors[0] > 0


def test_one_program_per_layer_when_batched_and_one_call(toy_w3a3):
  """With batched passes and every step in one call (the GPU default), a layer's whole
  AdaQuant (target, errors, optimiser start, steps) is one compiled program, and it
  gives what the separate calls give (the same steps and minibatches; only float
  rounding may differ between the programs)."""
  model, variables, x, base = toy_w3a3
  layer = base.layers[1]
  xs = InputCapture(model, variables, base.folded_bns)(
      base.qstate, x, [layer.path])[layer.path]
  lq = base.qstate[layer.path]
  config = ptq_jax.AdaQuantConfig(iterations=11, batch_size=8)
  one = ptq_jax.AdaQuantRuntime(steps_per_call=11, eval_batch_size=8)
  split = dataclasses.replace(one, eval_batch_size=None)   # CPU passes: separate programs
  assert one.single_program(len(xs), config) and not split.single_program(len(xs), config)
  key, compiles = jax.random.key(2), []

  def listener(name, secs, **kwargs):
    if name.endswith('backend_compile_duration'):
      compiles.append(kwargs.get('fun_name', name))
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    fused, report = adaquant.optimize_layer(layer, lq, xs, None, config, key, runtime=one)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert compiles == ['jit(_fit_layer)']
  separate, expected = adaquant.optimize_layer(layer, lq, xs, None, config, key, runtime=split)
  for field in ('mse_before', 'rel_error_before', 'mse_after', 'rel_error_after'):
    np.testing.assert_allclose(report[field], expected[field], rtol=1e-4)
  assert report['mse_after'] < report['mse_before']
  np.testing.assert_allclose(fused.bias, separate.bias, atol=1e-5)
  assert np.mean(np.abs(np.ravel(fused.kernel - separate.kernel)) <= 1e-6) > 0.9
  # Targets passed in (sequential mode) or computed inside (parallel mode) agree.
  ys = adaquant.float_targets(layer.geometry, layer.activation,
                              adaquant.LayerQuant(lq.kernel, lq.bias), xs)
  given, report_given = adaquant.optimize_layer(layer, lq, xs, ys, config, key, runtime=one)
  np.testing.assert_allclose(report_given['mse_after'], report['mse_after'], rtol=1e-4)
  np.testing.assert_allclose(given.bias, fused.bias, atol=1e-5)


@pytest.mark.parametrize('runtime', [
    ptq_jax.AdaQuantRuntime(steps_per_call=1, eval_batch_size=None),    # the CPU way
    ptq_jax.AdaQuantRuntime(steps_per_call=12, eval_batch_size=16)],    # one program
    ids=['separate calls', 'one program'])
def test_the_guard_never_returns_a_layer_worse_than_it_started(toy_w3a3, runtime):
  """An absurd weight learning rate wrecks the layer by the last step: with the guard
  the layer keeps its best measured state (here an early one) and says so; without,
  the paper's AdaQuant returns the wrecked last state."""
  model, variables, x, base = toy_w3a3
  layer = base.layers[1]
  xs = InputCapture(model, variables, base.folded_bns)(
      base.qstate, x, [layer.path])[layer.path]
  lq = base.qstate[layer.path]
  absurd = ptq_jax.AdaQuantConfig(iterations=12, batch_size=16, lr_kernel=10.0,
                                  lr_w_quant=10.0, lr_schedule='constant')
  key = jax.random.key(0)
  guarded, report = adaquant.optimize_layer(layer, lq, xs, None, absurd, key, runtime=runtime)
  assert report['rel_error_last_step'] > 2 * report['rel_error_before']   # it did drift
  assert report['guard_acted'] and report['kept_iteration'] < 12
  assert report['rel_error_after'] <= report['rel_error_before']
  _, (_, measured) = guarded, adaquant.reconstruction_error(
      layer.geometry, layer.activation, guarded, xs, adaquant.float_targets(
          layer.geometry, layer.activation, adaquant.LayerQuant(lq.kernel, lq.bias), xs))
  np.testing.assert_allclose(measured, report['rel_error_after'], rtol=1e-4)
  paper = dataclasses.replace(absurd, guard=False)
  _, unguarded = adaquant.optimize_layer(layer, lq, xs, None, paper, key, runtime=runtime)
  assert not unguarded['guard_acted'] and unguarded['kept_iteration'] == 12
  np.testing.assert_allclose(unguarded['rel_error_after'], report['rel_error_last_step'],
                             rtol=1e-4)


@pytest.mark.parametrize('updates', ['relative', 'absolute'])
def test_relative_weight_range_updates_do_not_depend_on_the_weight_scale(toy_w3a3, updates):
  """The same layer with its kernel, bias and weight range scaled by c (so its
  outputs and target scale by c): relative updates move the range by the same fraction
  of itself; absolute ones (the paper's) by the same amount, a larger fraction for
  small weights."""
  model, variables, x, base = toy_w3a3
  layer = base.layers[1]
  xs = InputCapture(model, variables, base.folded_bns)(
      base.qstate, x, [layer.path])[layer.path]
  lq = base.qstate[layer.path]
  c = 0.25   # a power of two: scaling is exact in float, so roundings are the same
  small = lq.replace(kernel=lq.kernel * c, bias=lq.bias * c,
                     w_quant=lq.w_quant.replace(range=lq.w_quant.range * c,
                                                low=lq.w_quant.low * c))
  config = ptq_jax.AdaQuantConfig(iterations=20, batch_size=16, lr_kernel=0.0, lr_bias=0.0,
                                  lr_a_quant=0.0, lr_w_quant=1e-2, guard=False,
                                  weight_range_updates=updates)
  key = jax.random.key(1)
  runtime = ptq_jax.AdaQuantRuntime(steps_per_call=1, eval_batch_size=None)
  big_fit, _ = adaquant.optimize_layer(layer, lq, xs, None, config, key, runtime=runtime)
  small_fit, _ = adaquant.optimize_layer(layer, small, xs, None, config, key, runtime=runtime)
  moved = lambda fit, start: np.asarray(fit.w_quant.range / start.w_quant.range - 1)
  assert np.abs(moved(big_fit, lq)).max() > 1e-3       # the range did move
  if updates == 'relative':
    # (Adam's epsilon is not scale-free: a channel with tiny gradients may differ.)
    assert np.median(np.abs(moved(small_fit, small) - moved(big_fit, lq))) < 1e-3
  else:
    assert np.abs(moved(small_fit, small)).max() > 2 * np.abs(moved(big_fit, lq)).max()


def test_qdrop(toy_w3a3):
  """drop_prob=0 is AdaQuant exactly; with drop_prob > 0 a step's loss is the
  reconstruction error with each input element unquantized with that probability."""
  model, variables, x, base = toy_w3a3
  layer = base.layers[1]
  xs = InputCapture(model, variables, base.folded_bns)(
      base.qstate, x, [layer.path])[layer.path]
  lq = base.qstate[layer.path]
  key = jax.random.key(3)
  plain = ptq_jax.AdaQuantConfig(iterations=6, batch_size=16)
  zero = dataclasses.replace(plain, drop_prob=0.0)
  a, ra = adaquant.optimize_layer(layer, lq, xs, None, plain, key)
  b, rb = adaquant.optimize_layer(layer, lq, xs, None, zero, key)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert ra['mse_after'] == rb['mse_after']
  dropped, _ = adaquant.optimize_layer(layer, lq, xs, None,
                                       dataclasses.replace(plain, drop_prob=0.5), key)
  assert not np.array_equal(dropped.kernel, a.kernel)
  # One step's loss, recomputed by hand with the step's mask.
  ys = adaquant.float_target(layer.geometry, layer.activation,
                             adaquant.LayerQuant(lq.kernel, lq.bias), xs)
  config = dataclasses.replace(plain, iterations=1, drop_prob=0.5)
  opt_state = adaquant._init_optimizer(config.lr_schedule, config.rates(), lq)
  _, _, loss = adaquant._run_steps(layer.geometry, layer.activation, 1, 16, config.lr_schedule,
                                   lq, opt_state, xs, ys, key, np.int32(0), config.rates(),
                                   drop_prob=0.5)
  idx = jax.random.choice(jax.random.fold_in(key, 0), xs.shape[0], (16,), replace=False)
  mask = jax.random.bernoulli(jax.random.fold_in(jax.random.fold_in(key, 0), 1), 0.5,
                              xs[idx].shape)
  assert 0.3 < float(mask.mean()) < 0.7
  x_used = jnp.where(mask, xs[idx], adaquant.quantized_input(lq, xs[idx]))
  out = adaquant.activation_fn(layer.activation)(adaquant.apply_linear(
      layer.geometry, x_used, adaquant.quantized_weight(lq)) + lq.bias)
  np.testing.assert_allclose(float(loss), float(jnp.mean((out - ys[idx])**2)), rtol=1e-5)
  with pytest.raises(ValueError, match='drop_prob'):
    ptq_jax.AdaQuantConfig(drop_prob=1.0)


def test_qdrop_with_learned_rounding(toy_w3a3):
  """QDrop composes with learned rounding: one step's loss is the soft-rounded layer's
  error with the step's mask (the same draw as free updates use). Catches the mask
  ignored, or applied to the quantized input instead of the float one."""
  from ptq_jax.stages.adaquant import rounding
  model, variables, x, base = toy_w3a3
  layer = base.layers[1]
  xs = InputCapture(model, variables, base.folded_bns)(
      base.qstate, x, [layer.path])[layer.path]
  lq, key = base.qstate[layer.path], jax.random.key(3)
  ys = adaquant.float_target(layer.geometry, layer.activation,
                             adaquant.LayerQuant(lq.kernel, lq.bias), xs)
  config = ptq_jax.AdaQuantConfig(iterations=1, batch_size=16, rounding='learned',
                                  drop_prob=0.5)
  params = rounding.start(lq)
  lr, reg = jnp.float32(config.lr_rounding), jnp.float32(config.rounding_reg)
  opt_state = rounding.init_optimizer(config.rates(), lr, params)
  losses = [rounding.run_steps(layer.geometry, layer.activation, 1, 16, lq, params, opt_state,
                               xs, ys, key, np.int32(0), config.rates(), lr, reg,
                               drop_prob=p)[2] for p in (0.0, 0.5)]
  idx = jax.random.choice(jax.random.fold_in(key, 0), xs.shape[0], (16,), replace=False)
  mask = rounding.drop_mask(key, 0, None, 0.5, xs[idx].shape)
  x_used = jnp.where(mask, xs[idx], adaquant.quantized_input(lq, xs[idx]))
  w = rounding.rounded_kernel(lq, params['v'], hard=False)
  out = adaquant.activation_fn(layer.activation)(adaquant.apply_linear(
      layer.geometry, x_used, w) + lq.bias)
  np.testing.assert_allclose(float(losses[1]), float(jnp.mean((out - ys[idx])**2)), rtol=1e-5)
  assert abs(float(losses[1]) - float(losses[0])) > 1e-3 * float(losses[0])


def test_learned_rounding_ends_hard_and_on_the_grid(toy_w3a3):
  """rounding='learned': every weight ends rounded down or up from where it was (never
  further), the kernel lies on the quantization grid, the rounding variables are (nearly
  all) pushed to 0 or 1 by the annealed regulariser, and the layer error falls."""
  from ptq_jax.quant.quantizer import reshape_for, scale_and_zero_point
  model, variables, x, base = toy_w3a3
  layer = base.layers[1]
  xs = InputCapture(model, variables, base.folded_bns)(
      base.qstate, x, [layer.path])[layer.path]
  lq = base.qstate[layer.path]
  config = ptq_jax.AdaQuantConfig(iterations=400, batch_size=16, rounding='learned',
                                  lr_rounding=3e-2, rounding_reg=1.0)
  out, report = adaquant.optimize_layer(layer, lq, xs, None, config, jax.random.key(0),
                                        runtime=ptq_jax.AdaQuantRuntime(steps_per_call=50))
  s, zp = scale_and_zero_point(reshape_for(lq.w_quant, lq.kernel.ndim))
  codes = np.asarray(out.kernel / s)
  np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)       # on the grid
  np.testing.assert_array_equal(adaquant.quantized_weight(out), out.kernel)
  start = np.asarray(lq.kernel / s)
  lo = np.clip(np.floor(start), -np.asarray(zp), lq.w_quant.levels - np.asarray(zp))
  hi = np.clip(np.floor(start) + 1, -np.asarray(zp), lq.w_quant.levels - np.asarray(zp))
  rounded = np.round(codes)
  assert np.all((rounded == lo) | (rounded == hi))
  assert np.mean(rounded != np.clip(np.round(start), lo, hi)) > 0.01   # some choices moved
  assert report['hard_fraction'] > 0.9 and report['rounding'] == 'learned'
  assert report['rel_error_after'] < report['rel_error_before']
  np.testing.assert_array_equal(out.bias, lq.bias)
  np.testing.assert_array_equal(out.w_quant.range, lq.w_quant.range)


def test_bad_config():
  with pytest.raises(ValueError, match='iterations >= 0'):
    ptq_jax.AdaQuantConfig(iterations=-1).validate()
  with pytest.raises(ValueError, match='eval_batch_size must be >= 1'):
    ptq_jax.AdaQuantRuntime(eval_batch_size=0)
  with pytest.raises(ValueError, match='lr_bias must be a finite number >= 0'):
    ptq_jax.AdaQuantConfig(lr_bias=-1.0)
  with pytest.raises(ValueError, match='lr_kernel must be a finite number >= 0'):
    ptq_jax.AdaQuantConfig(lr_kernel=float('nan'))
  with pytest.raises(ValueError, match="lr_schedule must be one of"):
    ptq_jax.AdaQuantConfig(lr_schedule='linear').validate()


def test_cosine_schedule_decays_and_constant_does_not():
  """Step k of n moves by rate * (1 + cos(pi k / n)) / 2 (cosine, the default) or by the
  rate (constant); Adam with a constant gradient steps by exactly the scheduled rate."""
  from ptq_jax.stages.adaquant.objective import make_optimizer
  params = {'w': jnp.ones(3)}
  for schedule in ('cosine', 'constant'):
    rates = ptq_jax.AdaQuantConfig(iterations=4, lr_kernel=1.0, lr_schedule=schedule).rates()
    tx = make_optimizer(rates, {"w": "kernel"}, schedule)
    state = tx.init(params)
    steps = []
    for _ in range(4):
      updates, state = tx.update({'w': jnp.ones(3)}, state, params)
      steps.append(float(jnp.abs(updates['w'][0])))
    expected = ([0.5 * (1 + np.cos(np.pi * k / 4)) for k in range(4)] if schedule == 'cosine'
                else [1.0] * 4)
    np.testing.assert_allclose(steps, expected, atol=1e-5)


def test_minibatches_do_not_depend_on_steps_per_call(toy_w3a3):
  """Drawing a call's minibatches up front gives the same steps as one call per step.

  The two runs are different programs (one step per call, or a loop of four), so float
  rounding differs; where a weight sits near a rounding boundary of the 3-bit grid that
  can move one output channel by ~1e-5. Another seed (other minibatches) moves every
  layer by far more, so: most weights agree to float precision, and the largest
  difference is well below what a change of minibatches does."""
  model, variables, x, base = toy_w3a3
  run = lambda spc, seed=3: run_adaquant(
      prepare(model, variables, x, progress=False), base.qstate, 'parallel',
      ptq_jax.AdaQuantConfig(iterations=9, batch_size=8), jax.random.key(seed),
      runtime=ptq_jax.AdaQuantRuntime(steps_per_call=spc))[0]
  one, four, other_seed = run(1), run(4), run(1, seed=4)
  largest = lambda a, b, field: max(float(jnp.max(jnp.abs(field(a[p]) - field(b[p]))))
                                    for p in a)
  for field in (lambda lq: lq.kernel, lambda lq: lq.bias):
    moved = largest(one, other_seed, field)
    assert moved > 1e-5
    assert largest(one, four, field) < moved / 10
  kernels = lambda st: np.concatenate([np.ravel(st[p].kernel) for p in st])
  assert np.mean(np.abs(kernels(one) - kernels(four)) <= 1e-7) > 0.9


def test_compilation_cache_stores_programs_for_later_processes(tmp_path):
  """``enable_compilation_cache`` makes JAX write compiled programs to the directory
  (in a child process: it sets JAX's own configuration)."""
  import subprocess
  import sys
  code = ('import jax, jax.numpy as jnp, ptq_jax\n'
          f'print(ptq_jax.enable_compilation_cache({str(tmp_path / "xla")!r}, 0.0))\n'
          'jax.jit(lambda x: jnp.sin(x) @ x)(jnp.ones((8, 8))).block_until_ready()\n')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == str(tmp_path / 'xla')
  assert any((tmp_path / 'xla').iterdir())
  from ptq_jax.compilation_cache import cache_setting, enable_compilation_cache
  assert cache_setting('off') is None and cache_setting('/some/dir') == '/some/dir'
  assert cache_setting('auto') is None  # the tests run on CPU
  with pytest.raises(ValueError, match='min_compile_seconds'):
    enable_compilation_cache(str(tmp_path / 'other'), -1.0)


def test_objective_includes_the_activation_after_the_layer(toy_w3a3):
  """The step's loss is ``mean((f(Q(W) Q(x) + b) - f(W x + b))^2)`` with ``f`` the ReLU
  the trace found after the layer: computed here independently on the step's own
  minibatch, it matches the loss the step reports, and differs from the loss without
  ``f`` (so an objective that dropped the activation would fail)."""
  model, variables, x, base = toy_w3a3
  layer = base.layers[0]
  assert layer.activation == 'relu'
  lq = base.qstate[layer.path]
  xs = InputCapture(model, variables, base.folded_bns)(base.qstate, x, [layer.path])[layer.path]
  float_lq = adaquant.LayerQuant(lq.kernel, lq.bias)
  ys = adaquant.float_target(layer.geometry, layer.activation, float_lq, xs)
  config = ptq_jax.AdaQuantConfig(iterations=1, batch_size=16)
  key = jax.random.key(7)
  opt_state = adaquant._init_optimizer(config.lr_schedule, config.rates(), lq)
  _, _, loss = adaquant._run_steps(layer.geometry, layer.activation, 1, 16, config.lr_schedule,
                                   lq, opt_state, xs, ys, key, np.int32(0), config.rates())
  idx = jax.random.choice(jax.random.fold_in(key, 0), xs.shape[0], (16,), replace=False)
  pre_q = adaquant.apply_linear(layer.geometry, adaquant.quantized_input(lq, xs[idx]),
                                adaquant.quantized_weight(lq)) + lq.bias
  pre_fp = adaquant.apply_linear(layer.geometry, xs[idx], lq.kernel) + lq.bias
  with_relu = float(jnp.mean((jnp.maximum(pre_q, 0) - jnp.maximum(pre_fp, 0))**2))
  without = float(jnp.mean((pre_q - pre_fp)**2))
  np.testing.assert_allclose(float(loss), with_relu, rtol=1e-5)
  assert abs(without - with_relu) > 0.05 * with_relu


def test_micro_batches_give_the_minibatch_gradient():
  """A step's loss and gradient over micro-batches are the minibatch's: catches summing
  the micro-batches instead of averaging, counting a data-free term (learned rounding's
  regulariser) once per micro-batch, mis-aligned inputs and targets, and one QDrop mask
  repeated in every micro-batch (``part`` must differ)."""
  from ptq_jax.stages.adaquant import steps
  params = {'w': jax.random.normal(jax.random.key(0), (6, 3)), 'none': None}
  x = jax.random.normal(jax.random.key(1), (8, 6))
  y = jax.random.normal(jax.random.key(2), (8, 3)) * jnp.arange(8.0)[:, None]
  parts = []

  def loss(p, x, y, step, part):
    parts.append(part)
    return jnp.mean((x @ p['w'] - y)**2) + 0.1 * jnp.sum(p['w']**2)
  whole = steps.value_and_grad(loss, 8)(params, x, y, 0)
  micro = steps.value_and_grad(loss, 8, 2)(params, x, y, 0)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), whole, micro)
  assert parts[0] is None and parts[1] is not None
  seen = steps.value_and_grad(lambda p, x, y, s, part: jnp.sum(p['w']) * 0 + part, 8, 2)(
      params, x, y, 0)[0]
  assert float(seen) == 1.5   # parts 0..3, averaged
  with pytest.raises(ValueError, match='does not divide'):
    steps.value_and_grad(loss, 8, 3)


def test_micro_batches_only_where_they_pay():
  """Automatic micro-batches: on CPU for large depthwise / pointwise maps only; never
  for a general conv (slow inside a loop), a weight-heavy layer or small maps; a given
  size must divide the minibatch."""
  from ptq_jax.linear import LayerGeometry
  from ptq_jax.trace import LayerInfo

  def conv(k, c_in, c_out, size, groups=1):
    pads = ((k // 2, k // 2),) * 2
    geom = LayerGeometry('conv', (1, 1), pads, (1, 1), (1, 1), groups)
    return LayerInfo('c', 'conv', (k, k, c_in // groups, c_out), groups, (size, size, c_in),
                     (size, size, c_out), 0, 0, geom)
  auto = ptq_jax.AdaQuantRuntime()
  depthwise, pointwise = conv(3, 96, 96, 56, groups=96), conv(1, 96, 24, 56)
  assert auto.micro_batch_for(32, [depthwise]) == 2
  assert auto.micro_batch_for(31, [depthwise, pointwise]) == 1
  assert auto.micro_batch_for(32, [conv(3, 96, 96, 56)]) == 0          # general conv
  assert auto.micro_batch_for(32, [conv(1, 1152, 1152, 7)]) == 0        # weights dominate
  assert auto.micro_batch_for(32, [conv(3, 16, 16, 14, groups=16)]) == 0  # small map
  assert ptq_jax.AdaQuantRuntime(micro_batch=0).micro_batch_for(32, [depthwise]) == 0
  assert ptq_jax.AdaQuantRuntime(micro_batch=4).micro_batch_for(32, [conv(3, 8, 8, 4)]) == 4
  with pytest.raises(ValueError, match='does not divide'):
    ptq_jax.AdaQuantRuntime(micro_batch=5).micro_batch_for(32, [depthwise])
  with pytest.raises(ValueError, match='micro_batch'):
    ptq_jax.AdaQuantRuntime(micro_batch=-1)


def test_micro_batched_steps_fit_the_same_minibatches(toy_w3a3):
  """The layer step with micro-batches sees the same minibatch (loss equal) and lands
  where the whole-minibatch step does (Adam's first step: up to float rounding)."""
  model, variables, x, base = toy_w3a3
  layer = base.layers[1]
  xs = InputCapture(model, variables, base.folded_bns)(
      base.qstate, x, [layer.path])[layer.path]
  lq = base.qstate[layer.path]
  ys = adaquant.float_target(layer.geometry, layer.activation,
                             adaquant.LayerQuant(lq.kernel, lq.bias), xs)
  config = ptq_jax.AdaQuantConfig(iterations=1, batch_size=16)
  opt_state = adaquant._init_optimizer(config.lr_schedule, config.rates(), lq)
  out = [adaquant._run_steps(layer.geometry, layer.activation, 1, 16, config.lr_schedule, lq,
                             opt_state, xs, ys, jax.random.key(3), np.int32(0), config.rates(),
                             micro_batch=m) for m in (0, 4)]
  np.testing.assert_allclose(float(out[0][2]), float(out[1][2]), rtol=1e-5)
  np.testing.assert_allclose(out[0][0].bias, out[1][0].bias, atol=1e-6)


def test_the_report_is_typed_and_reads_like_a_table_row(toy_w3a3):
  model, variables, x, base = toy_w3a3
  _, reports = run_adaquant(prepare(model, variables, x, progress=False), base.qstate,
                            'parallel', ptq_jax.AdaQuantConfig(iterations=4, batch_size=8))
  from ptq_jax.stages.adaquant.report import UnitReport
  r = reports[0]
  assert isinstance(r, UnitReport) and r.unit == 'layer' and r.mode == 'parallel'
  assert r['mse_after'] == r.mse_after and r.get('device') is None and r.get('nope', 7) == 7
  with pytest.raises(KeyError):
    r['nope']
  assert r.to_dict()['path'] == r.path
