"""The guard's holdout (AdaQuantConfig.guard_holdout): the optimiser never sees the held-out
calibration examples, and the guard keeps the checked state that does best on them."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ptq_jax
from ptq_jax.quant.interceptor import LayerQuant
from ptq_jax.stages.adaquant import layer as adaquant
from ptq_jax.stages.adaquant.block import optimize_block
from test_blocks import Residual, _program


class OneDense(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    return nn.Dense(4, name='dense')(x)


@pytest.fixture(scope='module')
def wide_dense():
  """A layer with more inputs (48) than training examples (24 of 32): it can fit
  anything in its training targets, noise included."""
  model = OneDense()
  x = np.asarray(jax.random.normal(jax.random.key(0), (32, 48)))
  variables = model.init(jax.random.key(1), x[:1])
  base = ptq_jax.quantize(model, variables, x, w_bits=4, a_bits=8, first_last_bits=None,
                          progress=False)
  return x, base


@pytest.mark.parametrize('runtime', [
    ptq_jax.AdaQuantRuntime(steps_per_call=1, eval_batch_size=None),    # the CPU way
    ptq_jax.AdaQuantRuntime(steps_per_call=40, eval_batch_size=8)],     # one program
    ids=['separate calls', 'one program'])
def test_holdout_guard_keeps_the_state_that_generalises(wide_dense, runtime):
  """Targets with per-example noise: the optimiser fits the training examples' noise
  and does worse on the others. Guarded on the held-out examples, the start is kept;
  guarded on the training examples (no holdout), the over-fitted last state is. Catches
  held-out examples leaking into the optimisation (the trajectory would differ) and a
  guard that measures on the training examples."""
  x, base = wide_dense
  layer = base.layers[0]
  lq = base.qstate[layer.path]
  geom, act = layer.geometry, layer.activation
  clean = adaquant.float_targets(geom, act, LayerQuant(lq.kernel, lq.bias), jnp.asarray(x))
  noise = 3.0 * float(jnp.std(clean)) * jax.random.normal(jax.random.key(2), clean.shape)
  ys = clean + noise
  config = ptq_jax.AdaQuantConfig(iterations=40, batch_size=8, lr_kernel=0.05, lr_bias=0.05,
                                  lr_schedule='constant', guard_holdout=0.25)
  key = jax.random.key(3)
  train, check = config.holdout_split(len(x), key)
  assert len(check) == 8 and not set(train) & set(check)
  xs = jnp.asarray(x)
  held_err = lambda state: adaquant.reconstruction_error(geom, act, state, xs[check],
                                                         ys[check])[1]

  fitted, fit_report = adaquant.optimize_layer(
      layer, lq, xs[train], ys[train], dataclasses.replace(config, guard_holdout=0.0), key,
      runtime=runtime)
  assert fit_report['kept_iteration'] == 40          # training error kept falling ...
  assert held_err(fitted) > 1.2 * held_err(lq)       # ... held-out error rose

  kept, report = adaquant.optimize_layer(layer, lq, xs, ys, config, key, runtime=runtime,
                                         holdout=(train, check))
  # The same trajectory (trained on the training examples only), measured held out.
  np.testing.assert_allclose(report['rel_error_last_step'], held_err(fitted), rtol=1e-4)
  np.testing.assert_allclose(report['rel_error_before'], held_err(lq), rtol=1e-4)
  assert report['guard_acted'] and report['guard_examples'] == 8
  assert held_err(kept) <= held_err(lq)
  np.testing.assert_allclose(report['rel_error_after'], held_err(kept), rtol=1e-4)


def test_learned_rounding_guard_measures_held_out(wide_dense):
  x, base = wide_dense
  layer = base.layers[0]
  lq = base.qstate[layer.path]
  geom, act = layer.geometry, layer.activation
  xs = jnp.asarray(x)
  ys = adaquant.float_targets(geom, act, LayerQuant(lq.kernel, lq.bias), xs)
  config = ptq_jax.AdaQuantConfig(iterations=12, batch_size=8, rounding='learned',
                                  guard_holdout=0.25)
  train, check = config.holdout_split(len(x), jax.random.key(0))
  kept, report = adaquant.optimize_layer(layer, lq, xs, ys, config, jax.random.key(1),
                                         holdout=(train, check))
  held_err = lambda state: adaquant.reconstruction_error(geom, act, state, xs[check],
                                                         ys[check])[1]
  assert report['guard_examples'] == 8
  np.testing.assert_allclose(report['rel_error_before'], held_err(lq), rtol=1e-4)
  np.testing.assert_allclose(report['rel_error_after'], held_err(kept), rtol=1e-4)


def test_block_holdout_trains_on_the_rest_and_measures_held_out():
  """A block's last state under the holdout is the state trained on the training
  examples alone, and its errors are those of the held-out examples."""
  model = Residual()
  x = np.asarray(jax.random.normal(jax.random.key(0), (40, 8, 8, 3)))
  variables = model.init(jax.random.key(1), x[:1])
  base = ptq_jax.quantize(model, variables, x, w_bits=2, a_bits=8, first_last_bits=None,
                          progress=False)
  program = _program(base, x)
  float_state = {p: LayerQuant(lq.kernel, lq.bias) for p, lq in base.qstate.items()}
  block = program.blocks[1]
  xs = program.run(program.blocks[0], jnp.asarray(x), float_state)
  ys = program.run(block, xs, float_state)
  config = ptq_jax.AdaQuantConfig(iterations=8, batch_size=8, unit='block', guard_holdout=0.25,
                                  guard_checks=1)
  train, check = config.holdout_split(len(x), jax.random.key(0))
  key = jax.random.key(1)
  last, _ = optimize_block(program, block, base.qstate, ['b', 'c'], xs[train], ys[train],
                           dataclasses.replace(config, guard=False, guard_holdout=0.0), key)
  _, report = optimize_block(program, block, base.qstate, ['b', 'c'], xs, ys, config, key,
                             holdout=(train, check))
  held = lambda state: float(jnp.mean((program.run(block, xs[check], {**base.qstate, **state})
                                       - ys[check])**2) / jnp.mean(ys[check]**2))
  np.testing.assert_allclose(report['rel_error_last_step'], held(last), rtol=1e-4)
  np.testing.assert_allclose(report['rel_error_before'], held({}), rtol=1e-4)
  assert report['guard_examples'] == 10


@pytest.mark.parametrize('unit', ['layer', 'block'])
def test_quantize_with_a_holdout(unit):
  """End to end, sequential: every layer / block reports its held-out count and ends no
  worse on the held-out examples than it started."""
  model = Residual()
  x = np.asarray(jax.random.normal(jax.random.key(0), (40, 8, 8, 3)))
  variables = model.init(jax.random.key(1), x[:1])
  qm = ptq_jax.quantize(model, variables, x, w_bits=3, a_bits=8, first_last_bits=None,
                        method='adaquant', mode='sequential', progress=False,
                        adaquant=ptq_jax.AdaQuantConfig(iterations=8, batch_size=8, unit=unit,
                                                        guard_holdout=0.2))
  assert qm.layer_reports and qm.settings['adaquant']['guard_holdout'] == 0.2
  for r in qm.layer_reports:
    assert r['guard_examples'] == 8 and r['rel_error_after'] <= r['rel_error_before'], r


def test_bad_holdout():
  with pytest.raises(ValueError, match='guard_holdout must be a fraction'):
    ptq_jax.AdaQuantConfig(guard_holdout=0.7)
  with pytest.raises(ValueError, match='set guard=True'):
    ptq_jax.AdaQuantConfig(guard_holdout=0.2, guard=False)
  model = OneDense()
  x = np.ones((3, 48), np.float32)
  variables = model.init(jax.random.key(1), x[:1])
  with pytest.raises(ValueError, match='holds out 0'):   # before any work
    ptq_jax.quantize(model, variables, x, method='adaquant', progress=False,
                     adaquant=ptq_jax.AdaQuantConfig(guard_holdout=0.1))
