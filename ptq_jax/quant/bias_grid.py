"""Biases on the accumulator's grid, as integer runtimes hold them.

An integer kernel (ONNX Runtime's QLinearConv / QGemm, TF Lite's int8 ops) adds the
bias to the int32 accumulator, so it stores ``round(b / (s_x s_w))`` at the step
``s_x s_w`` of the input's and the weights' scales (per output channel). The
simulation adds the float bias; :func:`integer_biases` moves every bias onto that grid
so that the simulation computes what the integer runtime does. The change per output
is at most half a step of the accumulator.

A channel whose weights are (nearly) zero has a tiny weight step, and its bias then
needs more than 32 bits at that step. As TF Lite's converter does, such a channel's
weight step is first widened until the bias fits (its weights, far below the new step,
round to zero or close to it: the channel computes its bias, as before).
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import jax.numpy as jnp
import numpy as np

from ptq_jax.quant.interceptor import LayerQuant
from ptq_jax.quant.quantizer import reshape_for, scale_and_zero_point

INT32_MAX = 2**31 - 1
_BIAS_LIMIT = 2.0**30   # the widened steps leave the bias codes this far inside int32


def input_step(lq: LayerQuant) -> Optional[float]:
  """The one input step ``s_x`` of a layer with quantized weights and per-tensor input
  quantizers sharing one scale at every call site (None otherwise)."""
  sites = (lq.a_quant,) + tuple(lq.site_a_quants)
  if lq.w_quant is None or any(q is None or np.ndim(q.range) for q in sites):
    return None
  steps = {float(np.float32(scale_and_zero_point(q)[0])) for q in sites}
  return steps.pop() if len(steps) == 1 else None


def accumulator_step(lq: LayerQuant) -> Optional[np.ndarray]:
  """``s_x * s_w`` per output channel, where the layer has one (:func:`input_step`)."""
  s_x = input_step(lq)
  if s_x is None:
    return None
  channels = np.shape(lq.kernel)[-1]
  s_w = np.asarray(scale_and_zero_point(reshape_for(lq.w_quant, np.ndim(lq.kernel)))[0],
                   np.float32)
  return (np.float32(s_x) * np.broadcast_to(s_w.reshape(-1), (channels,))).astype(np.float32)


def widened_for_bias(lq: LayerQuant) -> LayerQuant:
  """``lq`` with each channel's weight step widened where its bias would not fit int32
  at the step ``s_x s_w`` (its zero point kept)."""
  step = accumulator_step(lq)
  if step is None:
    return lq
  need = np.abs(np.asarray(lq.bias, np.float32)) / _BIAS_LIMIT
  if np.all(step >= need):
    return lq
  q = lq.w_quant
  s_w = step / np.float32(input_step(lq))
  wider = np.where(step < need, need / np.float32(input_step(lq)), s_w)   # per channel
  levels = (2**(q.bits - 1) - 1) if q.symmetric else q.levels
  old = np.maximum(np.broadcast_to(np.asarray(q.range, np.float32).reshape(-1), s_w.shape),
                   np.finfo(np.float32).tiny)
  new_range = np.where(step < need, wider * levels, old)
  low = np.broadcast_to(np.asarray(q.low, np.float32).reshape(-1), s_w.shape) * new_range / old
  if np.size(q.range) != s_w.size:   # (one weight quantizer for the layer: the widest)
    new_range, low = new_range.max(keepdims=True), low[np.argmax(new_range)].reshape(1)
  shape = np.shape(q.range)
  return lq.replace(w_quant=q.replace(range=jnp.asarray(new_range.reshape(shape)),
                                      low=jnp.asarray(low.reshape(np.shape(q.low)))))


def on_grid(bias: Any, step: np.ndarray) -> np.ndarray:
  """``bias`` rounded to the nearest multiple of ``step`` (float32); an entry whose
  multiple would not fit int32 keeps its value."""
  bias = np.asarray(bias, np.float32)
  with np.errstate(divide='ignore', invalid='ignore'):
    codes = np.round(bias / step)
  fits = np.isfinite(codes) & (np.abs(codes) <= INT32_MAX)
  return np.where(fits, codes * step, bias).astype(np.float32)


def integer_biases(qstate: Dict[str, Any]) -> Dict[str, Any]:
  """``qstate`` with each layer's bias on its accumulator grid, weight steps widened
  first where a bias would not fit (layers without one input step, such as float or
  shared layers with several input scales, unchanged)."""
  out = dict(qstate)
  for path, lq in qstate.items():
    if isinstance(lq, LayerQuant) and input_step(lq) is not None:
      lq = widened_for_bias(lq)
      out[path] = lq.replace(bias=jnp.asarray(on_grid(lq.bias, accumulator_step(lq))))
  return out


__all__ = ['INT32_MAX', 'accumulator_step', 'input_step', 'integer_biases', 'on_grid',
           'widened_for_bias']
