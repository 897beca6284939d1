"""Biases on the accumulator's grid, as integer runtimes hold them.

An integer kernel (ONNX Runtime's QLinearConv / QGemm, TF Lite's int8 ops) adds the
bias to the int32 accumulator, so it stores ``round(b / (s_x s_w))`` at the step
``s_x s_w`` of the input's and the weights' scales (per output channel). The
simulation adds the float bias; :func:`integer_biases` moves every bias onto that grid
so that the simulation computes what the integer runtime does. The change per output
is at most half a step of the accumulator.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import jax.numpy as jnp
import numpy as np

from ptq_jax.quant.interceptor import LayerQuant
from ptq_jax.quant.quantizer import reshape_for, scale_and_zero_point


def accumulator_step(lq: LayerQuant) -> Optional[np.ndarray]:
  """``s_x * s_w`` per output channel, where the layer has one: quantized weights and
  per-tensor input quantizers sharing one scale at every call site (None otherwise)."""
  sites = (lq.a_quant,) + tuple(lq.site_a_quants)
  if lq.w_quant is None or any(q is None or np.ndim(q.range) for q in sites):
    return None
  s_x = {float(scale_and_zero_point(q)[0]) for q in sites}
  if len(s_x) > 1:
    return None
  kernel_ndim = np.ndim(lq.kernel)
  s_w = np.asarray(scale_and_zero_point(reshape_for(lq.w_quant, kernel_ndim))[0], np.float32)
  channels = np.shape(lq.kernel)[-1]
  step = np.float32(s_x.pop()) * np.broadcast_to(s_w.reshape(-1), (channels,))
  return step.astype(np.float32)


def on_grid(bias: Any, step: np.ndarray) -> np.ndarray:
  """``bias`` rounded to the nearest multiple of ``step`` (float32)."""
  return (np.round(np.asarray(bias, np.float32) / step) * step).astype(np.float32)


def integer_biases(qstate: Dict[str, Any]) -> Dict[str, Any]:
  """``qstate`` with each layer's bias on its accumulator grid (layers without a single
  step, such as float or shared layers with several input scales, unchanged)."""
  out = dict(qstate)
  for path, lq in qstate.items():
    step = accumulator_step(lq) if isinstance(lq, LayerQuant) else None
    if step is not None:
      out[path] = lq.replace(bias=jnp.asarray(on_grid(lq.bias, step)))
  return out


__all__ = ['accumulator_step', 'integer_biases', 'on_grid']
