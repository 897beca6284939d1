"""The layer table of a Flax model, from one traced forward pass.

``flax.linen.intercept_methods`` sees every ``nn.Conv`` / ``nn.Dense`` call with its
module path, input and output; ``jax.eval_shape`` makes the trace free of any
computation. Nothing is inferred from layer names. Counts are per example.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Sequence, Tuple

import flax.linen as nn
import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class LayerInfo:
  """One weight layer as seen in the traced forward pass."""

  path: str                        # module path, e.g. 'BasicBlock_0/Conv_1'
  kind: str                        # 'conv' or 'dense'
  kernel_shape: Tuple[int, ...]
  groups: int                      # feature_group_count (1 for dense)
  input_shape: Tuple[int, ...]     # per example, no batch dim
  output_shape: Tuple[int, ...]
  params: int                      # kernel + bias elements
  macs: int                        # multiply-accumulates per example


def _conv_info(module: nn.Conv, path: str, x, y, variables) -> LayerInfo:
  kernel = variables['kernel']
  groups = int(module.feature_group_count)
  # Each output element sums over the kernel's spatial window and in_channels/groups.
  macs = int(np.prod(y.shape[1:])) * int(np.prod(kernel.shape[:-1]))
  params = sum(int(np.size(v)) for v in variables.values())
  return LayerInfo(path, 'conv', tuple(kernel.shape), groups, tuple(x.shape[1:]),
                   tuple(y.shape[1:]), params, macs)


def _dense_info(module: nn.Dense, path: str, x, y, variables) -> LayerInfo:
  kernel = variables['kernel']
  rows = int(np.prod(x.shape[1:-1])) if x.ndim > 2 else 1
  macs = rows * int(np.prod(kernel.shape))
  params = sum(int(np.size(v)) for v in variables.values())
  return LayerInfo(path, 'dense', tuple(kernel.shape), 1, tuple(x.shape[1:]),
                   tuple(y.shape[1:]), params, macs)


_HANDLERS = ((nn.Conv, _conv_info), (nn.Dense, _dense_info))


def trace(model: nn.Module, variables: Dict[str, Any], x: Any,
          **apply_kwargs) -> List[LayerInfo]:
  """Layer table of ``model`` at input ``x`` (a batch; only its shape and dtype matter).

  Layers are listed in call order. A module called twice (weight sharing) appears
  once per call.
  """
  layers: List[LayerInfo] = []

  def interceptor(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name == '__call__' and args:
      for cls, handler in _HANDLERS:
        if isinstance(module, cls):
          path = '/'.join(module.path)
          layers.append(handler(module, path, args[0], y, module.variables['params']))
          break
    return y

  def forward(variables, x):
    with nn.intercept_methods(interceptor):
      return model.apply(variables, x, **apply_kwargs)

  jax.eval_shape(forward, variables, x)
  return layers


def totals(layers: Sequence[LayerInfo]) -> Dict[str, int]:
  """Sum of weight-layer parameters and MACs."""
  return {'params': sum(l.params for l in layers), 'macs': sum(l.macs for l in layers)}
