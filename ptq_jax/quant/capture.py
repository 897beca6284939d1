"""Capturing the inputs that layers receive, over a whole image set.

The inputs come from the network computing with a given quantization state: the
float state gives the float model's inputs (parallel AdaQuant, the float targets),
a quantized state the quantized prefix's (sequential AdaQuant). Layers are captured
in consecutive groups that fit a memory budget.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ptq_jax.distributed import local_devices, padded_batches
from ptq_jax.quant.interceptor import LayerQuant, apply_quantized
from ptq_jax.trace import LayerInfo


class InputCapture:
  """Captures the float inputs that layers receive when the network computes with a
  given quantization state, over a whole image set, one jitted pass per batch.

  The pass is compiled once per group of layers (``paths``) and state structure;
  ``keep`` says which of the group's inputs to hold. Batches are split over
  ``devices`` (default: all local devices).
  """

  def __init__(self, model: nn.Module, variables: Mapping[str, Any], folded_bns: frozenset,
               batch_size: int = 100, devices: Optional[Sequence[Any]] = None):
    self.variables, self.batch_size = variables, batch_size
    self.devices = local_devices(devices)

    def batch_inputs(variables, qstate, x, paths):
      found: Dict[str, jnp.ndarray] = {}

      def on_layer(path, inputs):
        if path in paths and path not in found:
          found[path] = inputs
      apply_quantized(model, variables, qstate, folded_bns, x, on_layer=on_layer)
      return found

    self._batch_inputs = jax.jit(batch_inputs, static_argnums=3)

  def __call__(self, qstate: Mapping[str, LayerQuant], images: np.ndarray,
               paths: Sequence[str], keep: Optional[Sequence[str]] = None
               ) -> Dict[str, jnp.ndarray]:
    keep = list(paths if keep is None else keep)
    # On CPU the inputs gather in host memory; on an accelerator they stay on the device
    # (no round trip through the host for every layer group).
    to_host = jax.default_backend() == 'cpu'
    parts: Dict[str, List[Any]] = {p: [] for p in keep}
    for batch, n in padded_batches(images, self.batch_size, self.devices):
      found = self._batch_inputs(self.variables, qstate, batch, tuple(paths))
      for p in keep:
        parts[p].append(np.asarray(found[p][:n], np.float32) if to_host else found[p][:n])
    if to_host:
      return {p: jnp.asarray(np.concatenate(parts[p])) for p in keep}
    return {p: jnp.concatenate(parts.pop(p)) for p in keep}


def capture_groups(layers: Sequence[LayerInfo], n_images: int, budget_mb: float
                    ) -> List[List[LayerInfo]]:
  """Consecutive groups of layers whose captured inputs fit in ``budget_mb``."""
  groups, current, size = [], [], 0.0
  for layer in layers:
    mb = n_images * int(np.prod(layer.input_shape)) * 4 * layer.sites / 2**20
    if current and size + mb > budget_mb:
      groups.append(current)
      current, size = [], 0.0
    current.append(layer)
    size += mb
  if current:
    groups.append(current)
  return groups
