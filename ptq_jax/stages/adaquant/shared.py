"""AdaQuant of a layer called at several sites (shared weights).

One kernel, bias and weight quantizer serve every call; each call site has its own input
quantizer (``LayerQuant.for_site``). The loss is the mean over sites of each site's
reconstruction error on its own captured inputs and float targets, so the shared kernel
is optimised against all its call sites at once; every quantizer moves with the same
rates as in :mod:`.layer`, and the guard keeps the best checked state by the summed
error over all sites. Free weight updates only (no learned rounding or QDrop here).
"""

from __future__ import annotations

import functools
import time
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ptq_jax.linear import LayerGeometry
from ptq_jax.quant.interceptor import LayerQuant
from ptq_jax.stages.adaquant.config import AdaQuantConfig
from ptq_jax.stages.adaquant.report import UnitReport, guard_outcome
from ptq_jax.stages.adaquant.steps import split_examples
from ptq_jax.stages.adaquant.layer import float_targets
from ptq_jax.stages.adaquant.objective import (ERROR_BATCH, error_sums, layer_output,
                                              make_optimizer, param_labels, scaled_ranges,
                                              weight_range_scale)
from ptq_jax.trace import LayerInfo


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _shared_steps(geom: LayerGeometry, activation: str, steps: int, batch: int, schedule: str,
                  lq: LayerQuant, opt_state, xs, ys, key, step0, rates, w_scale=None):
  """``steps`` Adam steps on a shared layer; ``xs`` / ``ys``: per-site tuples."""
  tx = make_optimizer(rates, param_labels(lq), schedule)

  def loss_fn(params, step):
    params = scaled_ranges(params, w_scale, 1)
    total = 0.0
    for site, (x, y) in enumerate(zip(xs, ys)):
      idx = jax.random.choice(jax.random.fold_in(jax.random.fold_in(key, step), site),
                              x.shape[0], (batch,), replace=False)
      out = layer_output(geom, activation, params.for_site(site), x[idx])
      total = total + jnp.mean((out - y[idx])**2)
    return total / len(xs)

  def body(i, carry):
    params, opt_state, _ = carry
    loss, grads = jax.value_and_grad(loss_fn)(params, step0 + i)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  params = scaled_ranges(lq, w_scale, -1)
  params, opt_state, loss = jax.lax.fori_loop(0, steps, body, (params, opt_state, 0.0))
  return scaled_ranges(params, w_scale, 1), opt_state, loss


def _sums(geom: LayerGeometry, activation: str, lq: LayerQuant, xs, ys) -> Tuple[float, float]:
  """Squared error and squared target summed over every site's examples."""
  err = ref = 0.0
  for site, (x, y) in enumerate(zip(xs, ys)):
    for start in range(0, x.shape[0], ERROR_BATCH):
      e, r = error_sums(geom, activation, lq.for_site(site), x[start:start + ERROR_BATCH],
                         y[start:start + ERROR_BATCH])
      err, ref = err + float(e), ref + float(r)
  return err, ref


def optimize_shared_layer(layer: LayerInfo, lq: LayerQuant, xs: Sequence[jnp.ndarray],
                          ys: Sequence[Optional[jnp.ndarray]], config: AdaQuantConfig,
                          key: jax.Array,
                          holdout: Optional[Tuple[np.ndarray, np.ndarray]] = None
                          ) -> Tuple[LayerQuant, Dict[str, Any]]:
  """AdaQuant of shared ``layer`` on its sites' captured inputs ``xs`` and float targets
  ``ys`` (None: the float layer's own outputs on that site's inputs); ``holdout``:
  (train, check) example indices, the guard measuring on the check ones."""
  start = time.time()
  geom, act = layer.geometry, layer.activation
  ys = tuple(float_targets(geom, act, LayerQuant(lq.kernel, lq.bias), x) if y is None else y
             for x, y in zip(xs, ys))
  (xs, ys), (check_xs, check_ys) = split_examples((tuple(xs), ys), holdout)
  rates, w_scale = config.rates(), weight_range_scale(config, lq)
  count = sum(int(y.size) for y in check_ys)
  before_err, ref = _sums(geom, act, lq, check_xs, check_ys)
  best, best_err, kept_at = lq, before_err, -1
  opt_state = make_optimizer(rates, param_labels(lq), config.lr_schedule).init(
      scaled_ranges(lq, w_scale, -1))
  batch = min(config.batch_size, min(x.shape[0] for x in xs))
  checks, done, last_err = config.check_steps(), 0, before_err
  for k, end in enumerate(checks):
    lq, opt_state, _ = _shared_steps(geom, act, end - done, batch, config.lr_schedule, lq,
                                     opt_state, xs, ys, key, jnp.int32(done), rates, w_scale)
    done = end
    last_err, _ = _sums(geom, act, lq, check_xs, check_ys)
    if last_err <= best_err or not config.guard:
      best, best_err, kept_at = lq, last_err, k
  rel = lambda err: err / max(ref, 1e-30)
  return best, UnitReport(
      layer.path, act, lq.w_quant.bits if lq.w_quant else None,
      lq.a_quant.bits if lq.a_quant else None, before_err / count, best_err / count,
      rel(before_err), rel(best_err), rel(last_err), **guard_outcome(checks, kept_at),
      iterations=config.iterations, guard_examples=int(check_ys[0].shape[0]),
      seconds=time.time() - start, unit='shared', sites=layer.sites)
