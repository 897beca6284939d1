"""AdaQuant of one layer: its loss, optimiser and compiled programs (docs/method.md).

For one layer, minimise over its captured inputs

    mean || f(W X + b) - f(Q(W + V) Q(X) + b') ||^2

jointly over the continuous weight, the bias, the weight quantizer (range and low
end per output channel) and the input quantizer, with Adam and one learning rate
per group (``optax.multi_transform``). ``f`` is the activation the traced graph
found after the layer (ReLU / ReLU6), identity otherwise.

The programs take the layer's geometry (``ptq_jax.linear``), not its module, as a
static argument, so every layer with the same geometry, shapes and bit widths reuses
one compiled function. How the steps are driven (one per call on CPU, all in one
``lax.fori_loop`` elsewhere, or the whole fit as one program) is
:class:`~ptq_jax.stages.adaquant.config.AdaQuantRuntime`'s choice.
"""

from __future__ import annotations

import functools
import time
from typing import Any, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import SingleDeviceSharding

from ptq_jax.linear import LayerGeometry, apply_linear
from ptq_jax.quant.interceptor import LayerQuant, quantized_input, quantized_weight
from ptq_jax.stages.adaquant import rounding
from ptq_jax.stages.adaquant.config import AdaQuantConfig, AdaQuantRuntime
from ptq_jax.stages.adaquant.objective import (ERROR_BATCH, error_sums, float_target,
                                              layer_output, make_optimizer, param_labels,
                                              scaled_ranges, weight_range_scale)
from ptq_jax.stages.adaquant.report import UnitReport, guard_outcome
from ptq_jax.stages.adaquant.steps import run_loop, split_examples
from ptq_jax.trace import LayerInfo, activation_fn
from ptq_jax.xla_options import PerLayerJit


_float_target = jax.jit(float_target, static_argnums=(0, 1))


@functools.partial(jax.jit, static_argnums=0)
def _init_optimizer(schedule: str, rates: jnp.ndarray, lq: LayerQuant):
  return make_optimizer(rates, param_labels(lq), schedule).init(lq)


def _steps(geom: LayerGeometry, activation: str, steps: int, batch: int, schedule: str,
               lq: LayerQuant, opt_state, xs, ys, key, step0, rates, w_scale=None,
               drop_prob: float = 0.0, micro_batch: int = 0):
  """``steps`` Adam steps on one layer. The module is not an argument of this or the
  programs below, only its geometry, so ``jax.jit`` compiles each once per geometry,
  shapes and bit widths. With ``w_scale`` the optimiser sees the weight quantizer's
  range and low end in units of ``w_scale`` (per output channel), so its learning rate
  is relative to each channel's range. With ``drop_prob`` > 0 (QDrop), each element of
  the layer's input skips input quantization with that probability, drawn anew every
  step; 0 is AdaQuant exactly (the same program). ``micro_batch``: see
  :func:`~.steps.value_and_grad`."""
  tx = make_optimizer(rates, param_labels(lq), schedule)

  def loss_fn(lq, x, y, step, part):
    lq = scaled_ranges(lq, w_scale, 1)
    if drop_prob == 0.0:
      return jnp.mean((layer_output(geom, activation, lq, x) - y)**2)
    keep_float = rounding.drop_mask(key, step, part, drop_prob, x.shape)
    unquantized = x if lq.smooth is None else x / lq.smooth   # (what the smoothed W sees)
    x_used = jnp.where(keep_float, unquantized, quantized_input(lq, x))
    out = activation_fn(activation)(apply_linear(geom, x_used, quantized_weight(lq)) + lq.bias)
    return jnp.mean((out - y)**2)

  lq, opt_state, loss = run_loop(loss_fn, tx, scaled_ranges(lq, w_scale, -1), opt_state, xs,
                                 ys, key, step0, steps, batch, micro_batch)
  return scaled_ranges(lq, w_scale, 1), opt_state, loss


# (Per layer, the default or the memory-optimised schedule: ptq_jax.xla_options.)
_run_steps = PerLayerJit(_steps, static_argnums=(0, 1, 2, 3, 4),
                         static_argnames=('drop_prob', 'micro_batch'))


def compiled_step_count() -> int:
  """How many AdaQuant step programs (free weights, learned rounding, whole fits) have
  been compiled so far (tests, benchmarks)."""
  return (_run_steps.cache_size() + _fit_layer._cache_size()
          + rounding.run_steps.cache_size())


def _in_batches(fn, batch: int, *arrays):
  """``fn`` over leading-axis batches of ``arrays`` (``lax.map``; a smaller last call
  for the remainder), stacked back."""
  n = arrays[0].shape[0]
  full = n // batch * batch
  parts = []
  if full:
    split = [a[:full].reshape((full // batch, batch) + a.shape[1:]) for a in arrays]
    out = jax.lax.map(lambda xs: fn(*xs), split)
    parts.append(jax.tree.map(lambda o: o.reshape((full,) + o.shape[2:]), out))
  if full < n:
    parts.append(fn(*[a[full:] for a in arrays]))
  return parts[0] if len(parts) == 1 else jax.tree.map(lambda *p: jnp.concatenate(p), *parts)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _batched_float_target(geom: LayerGeometry, activation: str, batch: int, lq: LayerQuant, xs):
  return _in_batches(functools.partial(float_target, geom, activation, lq), batch, xs)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _batched_error_sums(geom: LayerGeometry, activation: str, batch: int, lq: LayerQuant,
                        xs, ys):
  def sums(x, y):   # per-example sums, added up after (no carry across batches)
    per_example = lambda a: jnp.sum(a.reshape(len(a), -1)**2, axis=1)
    return per_example(layer_output(geom, activation, lq, x) - y), per_example(y)
  err, ref = _in_batches(sums, batch, xs, ys)
  return jnp.sum(err), jnp.sum(ref)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5, 6),
                   static_argnames=('drop_prob', 'micro_batch'))
def _fit_layer(geom: LayerGeometry, activation: str, checks: Tuple[int, ...], guard: bool,
               batch: int, schedule: str, eval_batch: int, lq: LayerQuant, xs, ys, key, rates,
               w_scale=None, drop_prob: float = 0.0, micro_batch: int = 0, check=None):
  """A layer's whole AdaQuant in one program: the float target (``ys=None``: the float
  layer's own outputs on ``xs``, as in parallel mode), the error before, the optimiser
  state, the steps up to each of ``checks`` (iteration counts; the last is the total)
  with the error measured after each, and the guard's choice. Used off CPU when one
  call runs every iteration: one compilation per layer geometry instead of four, and
  the passes' convs all have the minibatch's shapes (``eval_batch``). Returns the
  kept state, the (error, target) sums of squares before, after the last step and of
  the kept state, and the index of the kept check (-1: the start). Without the
  ``guard`` the last state is kept, whatever its error. ``check``: the (inputs,
  targets) the errors are measured on, if not ``(xs, ys)`` (a guard holdout)."""
  # (The jitted helpers called here are traced into this one program, not compiled apart.)
  if ys is None:
    ys = _batched_float_target(geom, activation, eval_batch, LayerQuant(lq.kernel, lq.bias), xs)
  cxs, cys = (xs, ys) if check is None else check
  before = _batched_error_sums(geom, activation, eval_batch, lq, cxs, cys)
  opt_state = _init_optimizer(schedule, rates, lq)
  best, best_sums, best_at = lq, before, jnp.int32(-1)
  done = 0
  for k, end in enumerate(checks):
    lq, opt_state, _ = _run_steps(geom, activation, end - done, batch, schedule, lq, opt_state,
                                  xs, ys, key, np.int32(done), rates, w_scale,
                                  drop_prob=drop_prob, micro_batch=micro_batch)
    done = end
    sums = _batched_error_sums(geom, activation, eval_batch, lq, cxs, cys)
    better = (sums[0] <= best_sums[0]) | (not guard)   # ties go to the later state
    best = jax.tree.map(lambda new, old: jnp.where(better, new, old), lq, best)
    best_sums = jax.tree.map(lambda new, old: jnp.where(better, new, old), sums, best_sums)
    best_at = jnp.where(better, jnp.int32(k), best_at)
  return best, before, sums, best_sums, best_at


def float_targets(geom: LayerGeometry, activation: str, lq: LayerQuant, xs: jnp.ndarray,
                  batch: Optional[int] = None) -> jnp.ndarray:
  """:func:`float_target` over a whole captured set, in ``batch``-sized pieces inside
  one program, or (``batch=None``) in one call."""
  if batch is None:
    return _float_target(geom, activation, lq, xs)
  return _batched_float_target(geom, activation, batch, lq, xs)


def reconstruction_error(geom: LayerGeometry, activation: str, lq: LayerQuant, xs: jnp.ndarray,
                         ys: jnp.ndarray, batch: Optional[int] = None) -> Tuple[float, float]:
  """(MSE, MSE / mean(target^2)) of a quantized layer over a whole captured set: in
  ``batch``-sized pieces inside one program, or (``batch=None``) in host-side calls of
  ERROR_BATCH examples."""
  if batch is not None:
    return _relative_error(_batched_error_sums(geom, activation, batch, lq, xs, ys), ys.size)
  total_err = total_ref = 0.0
  for start in range(0, xs.shape[0], ERROR_BATCH):
    e, r = error_sums(geom, activation, lq, xs[start:start + ERROR_BATCH],
                       ys[start:start + ERROR_BATCH])
    total_err, total_ref = total_err + float(e), total_ref + float(r)
  return _relative_error((total_err, total_ref), ys.size)


def _relative_error(sums, count: int) -> Tuple[float, float]:
  """(MSE, MSE / mean(target^2)) from the sums of squared errors and targets."""
  total_err, total_ref = map(float, sums)
  mse = total_err / count
  return mse, mse / max(total_ref / count, 1e-30)


class _Fit(NamedTuple):
  """How one layer is fitted: its settings and step sizes, on its device (``pin``)."""

  config: AdaQuantConfig
  runtime: AdaQuantRuntime
  key: jax.Array
  rates: jnp.ndarray
  w_scale: Optional[jnp.ndarray]
  pin: Any
  batch: int
  micro: int
  eval_batch: int


def optimize_layer(layer: LayerInfo, lq: LayerQuant, xs: jnp.ndarray,
                   ys: Optional[jnp.ndarray], config: AdaQuantConfig, key: jax.Array,
                   device: Optional[Any] = None,
                   runtime: AdaQuantRuntime = AdaQuantRuntime(),
                   holdout: Optional[Tuple[np.ndarray, np.ndarray]] = None
                   ) -> Tuple[LayerQuant, UnitReport]:
  """AdaQuant of one layer on captured inputs ``xs`` and float targets ``ys`` (None:
  the float layer's own outputs on ``xs``, i.e. ``lq``'s kernel and bias unquantized,
  as in parallel mode). ``holdout``: (train, check) example indices
  (:meth:`AdaQuantConfig.holdout_split`); the guard measures on the check ones.

  Off CPU (batched passes, every step in one call) this is one compiled program per
  layer geometry (:func:`_fit_layer`); otherwise the target, errors and step loop are
  separate calls. With ``device``, everything is committed to it first, so the layer
  runs there (layer-parallel mode); without, the arrays stay where they are."""
  start = time.time()
  pin = (lambda tree: commit(tree, device)) if device is not None else (lambda tree: tree)
  lq, xs, ys, key, rates, w_scale = pin((lq, xs, ys, key, config.rates(),
                                         weight_range_scale(config, lq)))
  n = xs.shape[0]
  eval_batch = runtime.eval_batches(n, config)
  check = None
  if holdout is not None:   # the targets of every example first, then the split
    if ys is None:
      ys = float_targets(layer.geometry, layer.activation, LayerQuant(lq.kernel, lq.bias), xs,
                         eval_batch)
    (xs, ys), check = split_examples((xs, ys), holdout)
    n = xs.shape[0]
  batch = min(config.batch_size, n)
  fit = _Fit(config, runtime, key, rates, w_scale, pin, batch,
             runtime.micro_batch_for(batch, [layer]), eval_batch)
  guard_examples = n if check is None else int(check[1].shape[0])
  if config.rounding == 'learned' and lq.w_quant is not None:
    lq, report = _learn_rounding(layer, lq, xs, ys, fit, check)
    report.seconds, report.guard_examples = time.time() - start, guard_examples
    return lq, report
  if runtime.single_program(n, config):
    lq, errors = _fit_in_one_program(layer, lq, xs, ys, fit, check)
  else:
    lq, errors = _fit_in_calls(layer, lq, xs, ys, fit, check)
  return lq, UnitReport(layer.path, layer.activation, lq.w_quant.bits if lq.w_quant else None,
                        lq.a_quant.bits if lq.a_quant else None, *errors[:5],
                        **guard_outcome(config.check_steps(), errors[5]),
                        iterations=config.iterations, guard_examples=guard_examples,
                        seconds=time.time() - start)


def _fit_in_one_program(layer: LayerInfo, lq: LayerQuant, xs, ys, fit: _Fit, check):
  """The whole fit as one compiled program (:func:`_fit_layer`); returns the kept state
  and (mse before, after, rel. before, after, last, kept check index)."""
  config = fit.config
  lq, before, last, kept, kept_at = _fit_layer(
      layer.geometry, layer.activation, config.check_steps(), config.guard, fit.batch,
      config.lr_schedule, fit.eval_batch, lq, xs, ys, fit.key, fit.rates, fit.w_scale,
      drop_prob=config.drop_prob, micro_batch=fit.micro, check=check)
  # target elements the errors were summed over
  count = (xs.shape[0] if check is None else check[1].shape[0]) * int(np.prod(layer.output_shape))
  (before, rel_before), (_, rel_last), (after, rel_after) = (
      _relative_error(s, count) for s in (before, last, kept))
  return lq, (before, after, rel_before, rel_after, rel_last, int(kept_at))


def _fit_in_calls(layer: LayerInfo, lq: LayerQuant, xs, ys, fit: _Fit, check):
  """The fit as calls of compiled steps (``runtime.call_plan``), the guard's error
  measured between them; returns what :func:`_fit_in_one_program` returns."""
  geom, act, config = layer.geometry, layer.activation, fit.config
  if ys is None:
    ys = float_targets(geom, act, LayerQuant(lq.kernel, lq.bias), xs, fit.eval_batch)
  cxs, cys = (xs, ys) if check is None else check
  before, rel_before = reconstruction_error(geom, act, lq, cxs, cys, fit.eval_batch)
  best, (after, rel_after), kept_at = lq, (before, rel_before), -1
  rel_last = rel_before
  # (Committed again: outputs that do not depend on an input come back uncommitted.)
  opt_state = fit.pin(_init_optimizer(config.lr_schedule, fit.rates, lq))
  done = 0
  for k, calls in enumerate(fit.runtime.call_plan(config)):
    for steps in calls:
      # (The step's outputs stay committed; ``step0`` goes uncommitted, as compiled.)
      lq, opt_state, _ = _run_steps.for_layer(geom, xs.shape, lq.kernel.shape)(
          geom, act, steps, fit.batch, config.lr_schedule, lq,
                                    opt_state, xs, ys, fit.key, np.int32(done), fit.rates,
                                    fit.w_scale, drop_prob=config.drop_prob,
                                    micro_batch=fit.micro)
      done += steps
    last, rel_last = reconstruction_error(geom, act, lq, cxs, cys, fit.eval_batch)
    if last <= after or not config.guard:   # the best state so far (ties: the later)
      best, (after, rel_after), kept_at = lq, (last, rel_last), k
  return best, (before, after, rel_before, rel_after, rel_last, kept_at)


def _learn_rounding(layer: LayerInfo, lq: LayerQuant, xs, ys, fit: _Fit, check=None
                    ) -> Tuple[LayerQuant, UnitReport]:
  """Learned rounding of one layer (``config.rounding='learned'``), step calls and guard
  checks as in :func:`optimize_layer` (errors on ``check``, the held-out inputs and
  targets, if given); the kept state is always hard-rounded."""
  geom, act, config, pin, rates = layer.geometry, layer.activation, fit.config, fit.pin, fit.rates
  eval_batch = fit.runtime.eval_batches(xs.shape[0], config)
  if ys is None:
    ys = float_targets(geom, act, LayerQuant(lq.kernel, lq.bias), xs, eval_batch)
  cxs, cys = (xs, ys) if check is None else check
  before, rel_before = reconstruction_error(geom, act, lq, cxs, cys, eval_batch)
  lr, reg = pin((jnp.float32(config.lr_rounding), jnp.float32(config.rounding_reg)))
  params = pin(rounding.start(lq))
  opt_state = pin(rounding.init_optimizer(rates, lr, params))
  best, (after, rel_after), kept_at = lq, (before, rel_before), -1
  last, rel_last, done = before, rel_before, 0
  for k, calls in enumerate(fit.runtime.call_plan(config)):
    for steps in calls:
      params, opt_state, _ = rounding.run_steps.for_layer(geom, xs.shape, lq.kernel.shape)(
          geom, act, steps, fit.batch, lq, params,
                                                opt_state, xs, ys, fit.key, np.int32(done),
                                                rates, lr, reg, micro_batch=fit.micro,
                                                drop_prob=config.drop_prob)
      done += steps
    hard = rounding.finish(lq, params)
    last, rel_last = reconstruction_error(geom, act, hard, cxs, cys, eval_batch)
    if last <= after or not config.guard:
      best, (after, rel_after), kept_at = hard, (last, rel_last), k
  return best, UnitReport(layer.path, act, lq.w_quant.bits,
                          lq.a_quant.bits if lq.a_quant else None, before, after, rel_before,
                          rel_after, rel_last, **guard_outcome(config.check_steps(), kept_at),
                          iterations=config.iterations, rounding='learned',
                          hard_fraction=rounding.hard_fraction(lq, params))


def commit(tree: Any, device: Any) -> Any:
  """``tree``'s arrays committed to ``device`` (a no-op for those already there)."""
  return jax.device_put(tree, SingleDeviceSharding(device))
