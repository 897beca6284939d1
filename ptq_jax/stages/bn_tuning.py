"""BN re-estimation ("global statistics tuning", docs/method.md) as a functional pass.

After quantization a layer's outputs drift from the statistics its folded BatchNorm
was trained with. For every layer with a folded BN, in network order, we measure the
exact per-channel mean ``m`` and variance ``v`` of its quantized output ``y`` over the
whole calibration set (with the layers before it already re-estimated), put the BN
back with its original ``gamma``, ``beta`` and fresh statistics, and fold again. In
folded terms ``y = s z + t`` with ``s = gamma / sqrt(var_old + eps)``, so the
re-estimated BN output is ``a y + c`` with

    a = |gamma| / sqrt(v + s^2 eps),   c = beta - a m,

which is folded into the kernel (``a W``, the weight quantizer's range and low end
scaled alike, so the same grid) and the bias (``a b + c``). The reference code runs
one EMA step (momentum 0.1) from the FP statistics instead, keeping most of the stale
ones. Returns a new state; nothing else changes.

That re-estimation assumes the calibration images come from the training
distribution, so that the FP network's own statistics on them are its running
statistics. Where they do not (photos of cut-outs on white for an ImageNet model),
it moves the quantized network *away* from the FP one. ``target='fp'`` instead
matches each layer's quantized output statistics to the FP network's output
statistics on the same images, ``a = sqrt(v_fp / v)``, ``c = m_fp - a m``: it
corrects only what quantization changed, whatever the data.
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ptq_jax.quant.folding import get_path
from ptq_jax.quant.interceptor import (LayerQuant, QState, apply_quantized, quantized_layer_output)
from ptq_jax.quant.quantizer import QuantizerState
from ptq_jax.stages.prepare import Prepared, Stage
from ptq_jax.trace import LayerInfo


def _scale_quantizer(q: Optional[QuantizerState], a: jnp.ndarray) -> Optional[QuantizerState]:
  """The quantizer of ``a * w`` (per output channel) given that of ``w``: same grid."""
  if q is None:
    return None
  if q.symmetric:
    return q.replace(range=q.range * jnp.abs(a))
  low = jnp.where(a >= 0, q.low * a, (q.low + q.range) * a)
  return q.replace(range=q.range * jnp.abs(a), low=low)


def refold(lq: LayerQuant, a: jnp.ndarray, c: jnp.ndarray) -> LayerQuant:
  """``lq`` with its output mapped to ``a * y + c`` per output channel."""
  return lq.replace(kernel=lq.kernel * a, bias=lq.bias * a + c,
                    w_quant=_scale_quantizer(lq.w_quant, a))


TARGETS = ('data', 'fp')
MIN_IMAGES = 32   # below this BN tuning warns: its statistics are too noisy


def _merge(acc, mean_b, m2_b, n_b):
  """Chan et al.'s pairwise update of (count, mean, sum of squared deviations)."""
  count, mean, m2 = acc
  mean_b, m2_b = np.asarray(mean_b, np.float64), np.asarray(m2_b, np.float64)
  delta = mean_b - mean
  total = count + n_b
  return total, mean + delta * n_b / total, m2 + m2_b + delta**2 * count * n_b / total


def bn_tune(prepared: Prepared, qstate: Mapping[str, LayerQuant], target: str = 'data',
            batch_size: int = 250) -> Tuple[QState, List[Dict[str, Any]]]:
  """Re-estimates every folded BN on the calibration images through the quantized
  network.

  ``target``: 'data' re-estimates the BN statistics from the images (the paper's);
  'fp' matches the quantized outputs' per-channel mean and variance to the FP
  network's on the same images (see the module docstring).

  Returns the new state and, per tuned layer, how far its output mean and standard
  deviation were from the BN's before (relative to the BN's own).
  """
  if target not in TARGETS:
    raise ValueError(f'target={target!r} is not one of {TARGETS}.')
  _check_images(prepared.images)
  state = dict(qstate)
  todo = [l for l in prepared.layers if l.bn_path and l.path in state]
  moments = _Moments(prepared, todo, batch_size)
  fp_moments = {}
  if target == 'fp' and todo:
    fp_state = {p: LayerQuant(lq.kernel, lq.bias) for p, lq in prepared.float_state.items()}
    fp_moments = moments(fp_state, [l.path for l in todo])
  reports = []
  bar = tqdm(total=len(todo), desc='BN tuning', disable=not prepared.progress, leave=False)
  start = time.time()
  for layer in todo:
    mean, var = moments(state, [layer.path])[layer.path]
    gamma, beta, old_var = _bn_params(prepared.variables, layer)
    if target == 'fp':
      fp_mean, fp_var = fp_moments[layer.path]
      a = np.sqrt((fp_var + 1e-12) / (var + 1e-12))
      c = fp_mean - a * mean
    else:
      s_old = gamma / np.sqrt(old_var + layer.bn_epsilon)
      a = np.abs(gamma) / np.sqrt(var + s_old**2 * layer.bn_epsilon)  # y carries gamma's sign
      c = beta - a * mean
    state[layer.path] = refold(state[layer.path], jnp.asarray(a, jnp.float32),
                               jnp.asarray(c, jnp.float32))
    expected_std = np.maximum(np.abs(gamma) * np.sqrt(old_var / (old_var + layer.bn_epsilon)),
                              1e-12)
    reports.append({'path': layer.path, 'bn_path': layer.bn_path,
                    'mean_shift': float(np.mean(np.abs(mean - beta) / expected_std)),
                    'std_ratio': float(np.mean(np.sqrt(var) / expected_std))})
    bar.update()
  bar.close()
  if reports:
    reports[-1]['seconds_total'] = time.time() - start
  return state, reports


def _check_images(images: np.ndarray) -> None:
  if len(images) == 0:
    raise ValueError('BN tuning needs calibration images; the set is empty.')
  if len(images) < MIN_IMAGES:
    warnings.warn(f'BN tuning on {len(images)} calibration image(s): per-channel statistics '
                  f'from fewer than {MIN_IMAGES} images are noisy and can cost accuracy '
                  'instead of restoring it; use more images or skip BN tuning.', stacklevel=3)


class _Moments:
  """``(state, paths) -> {path: (mean, variance)}``: the exact per-channel statistics of
  those layers' quantized outputs over every position of every calibration image,
  merged batch by batch (stable when the mean is large). One compiled program
  measures every BN layer's output, though only the next layer's is used: each
  layer's must be measured after the layers before it were re-estimated."""

  def __init__(self, prepared: Prepared, todo: Sequence[LayerInfo], batch_size: int):
    self.images = np.asarray(prepared.images, np.float32)
    self.todo, self.batch_size = todo, batch_size
    model, variables, folded_bns = prepared.model, prepared.variables, prepared.folded_bns
    tuned_paths = frozenset(l.path for l in todo)

    def batch_moments(state, x):
      found = {}

      def layer_output(p, module, inputs, site):
        y = quantized_layer_output(module, state[p].for_site(site), inputs)
        if p in tuned_paths and p not in found:
          flat = y.reshape(-1, y.shape[-1])
          mean = jnp.mean(flat, axis=0)
          found[p] = (mean, jnp.sum((flat - mean)**2, axis=0))
        return y
      apply_quantized(model, variables, state, folded_bns, x, layer_output=layer_output)
      return found
    self._batch = jax.jit(batch_moments)

  def __call__(self, state: QState, paths: Sequence[str]) -> Dict[str, Tuple[Any, Any]]:
    acc = {p: (0, 0.0, 0.0) for p in paths}
    for s in range(0, len(self.images), self.batch_size):
      batch = self.images[s:s + self.batch_size]
      found = self._batch(state, jnp.asarray(batch))
      for layer in self.todo:
        if layer.path in acc:
          n_b = len(batch) * int(np.prod(layer.output_shape[:-1]))
          acc[layer.path] = _merge(acc[layer.path], *found[layer.path], n_b)
    return {p: (mean, m2 / count) for p, (count, mean, m2) in acc.items()}


def _bn_params(variables: Mapping[str, Any], layer: LayerInfo):
  params = get_path(variables['params'], layer.bn_path)
  stats = get_path(variables['batch_stats'], layer.bn_path)
  var = np.asarray(stats['var'], np.float64)
  gamma = np.asarray(params.get('scale', np.ones_like(var)), np.float64)
  beta = np.asarray(params.get('bias', np.zeros_like(var)), np.float64)
  return gamma, beta, var


def bn_tuning_stage(target: str = 'data', batch_size: int = 250) -> Stage:
  """The BN-tuning stage (:func:`bn_tune` on the prepared model's calibration images)."""
  if target not in TARGETS:
    raise ValueError(f'target={target!r} is not one of {TARGETS}.')

  def apply(prepared: Prepared, qstate: QState, key: jax.Array) -> Tuple[QState, Any]:
    del key  # deterministic
    return bn_tune(prepared, qstate, target, batch_size)
  return Stage('bn_tuning', apply)
