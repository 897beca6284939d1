"""Range calibration: weight quantizers from the folded kernels, input quantizers
from the layer inputs the float model sees on the calibration set.

Activation ranges are computed per calibration batch inside one jitted forward
pass (every layer at once) and averaged over batches, as the reference does for
min/max; memory stays at one batch of activations whatever the depth.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ptq_jax.quant.folding import FoldedLayer
from ptq_jax.quant.interceptor import apply_quantized
from ptq_jax.quant.quantizer import QuantizerState, init_range


def weight_quantizers(folded: Mapping[str, FoldedLayer], w_bits: Mapping[str, Optional[int]],
                      method: str, symmetric: bool, percentile: float
                      ) -> Dict[str, QuantizerState]:
  """Per-output-channel quantizers of the folded kernels of every layer with bits set.

  All layers are initialised in one jitted program (one compilation per model
  rather than one per kernel shape).
  """
  wanted = {p: b for p, b in w_bits.items() if b is not None}

  @jax.jit
  def init_all(kernels):
    return {p: init_range(kernels[p], wanted[p], method, channel_axis=-1, symmetric=symmetric,
                          percentile=percentile) for p in wanted}

  return init_all({p: folded[p].kernel for p in wanted})


def activation_quantizers(prepared: Any, a_bits: Mapping[str, Optional[int]], config: Any,
                          divisors: Optional[Mapping[str, jnp.ndarray]] = None
                          ) -> Dict[str, QuantizerState]:
  """Input quantizers (per tensor, or per input channel) for every layer with
  ``a_bits[path]`` set; a layer in ``divisors`` (smoothing) is calibrated on its input
  divided by them. ``prepared``: the model, its variables, folded BNs, folded float
  state and calibration images (a ``stages.prepare.Prepared``); ``config``: the range
  method and its settings (a ``RangeConfig``)."""
  model, variables, images = prepared.model, prepared.variables, prepared.images
  method, symmetric, percentile = config.method, config.symmetric, config.percentile
  per_channel, batch_size, folded_bns = config.per_channel_inputs, config.batch_size, \
      prepared.folded_bns
  divisors = dict(divisors or {})
  float_state = prepared.float_state
  wanted = {p: b for p, b in a_bits.items() if b is not None}
  if not wanted:
    return {}

  @jax.jit
  def batch_ranges(x):
    found: Dict[str, QuantizerState] = {}

    def on_layer(path, inputs):
      if path in wanted and path not in found:
        if path in divisors:
          inputs = inputs / divisors[path]
        found[path] = init_range(inputs, wanted[path], method, -1 if per_channel else None,
                                 symmetric, percentile)

    apply_quantized(model, variables, float_state, folded_bns, x, on_layer=on_layer)
    return found

  totals: Optional[Dict[str, QuantizerState]] = None
  count = 0
  for start in range(0, len(images), batch_size):
    batch = jnp.asarray(images[start:start + batch_size], jnp.float32)
    ranges = batch_ranges(batch)
    weighted = jax.tree.map(lambda a: a * len(batch), ranges)
    totals = weighted if totals is None else jax.tree.map(jnp.add, totals, weighted)
    count += len(batch)
  missing = sorted(set(wanted) - set(totals))
  if missing:
    raise RuntimeError(f'Layers {missing} never ran on the calibration data; was the model '
                       'traced with another input shape?')
  return jax.tree.map(lambda a: a / count, totals)


def input_channel_absmax(prepared: Any, paths, batch_size: int = 100) -> Dict[str, np.ndarray]:
  """max |x| per input channel (last axis) of each layer in ``paths`` over all the
  calibration images, as the float model feeds them (``prepared`` as in
  :func:`activation_quantizers`)."""
  model, variables, images = prepared.model, prepared.variables, prepared.images
  float_state, folded_bns = prepared.float_state, prepared.folded_bns
  paths = set(paths)

  @jax.jit
  def batch_max(x):
    found: Dict[str, jnp.ndarray] = {}

    def on_layer(path, inputs):
      if path in paths and path not in found:
        found[path] = jnp.max(jnp.abs(inputs).reshape(-1, inputs.shape[-1]), axis=0)

    apply_quantized(model, variables, float_state, folded_bns, x, on_layer=on_layer)
    return found

  result: Dict[str, np.ndarray] = {}
  for start in range(0, len(images), batch_size):
    found = batch_max(jnp.asarray(images[start:start + batch_size], jnp.float32))
    for path, value in found.items():
      result[path] = np.maximum(result.get(path, 0.0), np.asarray(value))
  return result
