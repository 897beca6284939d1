"""BatchNorm folding as a pure transform of the variable tree (docs/method.md).

``W' = W * gamma / sqrt(var + eps)`` per output channel (the kernel's last axis) and
``b' = (b - mean) * gamma / sqrt(var + eps) + beta``. Every conv/dense layer gets a
``FoldedLayer`` (kernel and an explicit bias, zeros where the layer had none);
layers without a BatchNorm keep their weights.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Sequence

import jax.numpy as jnp
from flax import struct

from ptq_jax.trace import LayerInfo


@struct.dataclass
class FoldedLayer:
  kernel: jnp.ndarray
  bias: jnp.ndarray


def get_path(tree: Mapping[str, Any], path: str) -> Any:
  """``tree['a']['b']`` for ``path='a/b'``; a KeyError names the missing part."""
  node = tree
  for part in path.split('/'):
    if not isinstance(node, Mapping) or part not in node:
      raise KeyError(f'No variables at {path!r} (missing {part!r}).')
    node = node[part]
  return node


def fold_layer(layer: LayerInfo, variables: Mapping[str, Any]) -> FoldedLayer:
  """The folded kernel and bias of one layer."""
  if layer.kernel_view is not None:   # a tied layer: its kernel views another parameter
    params = {'kernel': layer.kernel_view.of(variables['params'])}
    if layer.bias_view is not None:
      params['bias'] = layer.bias_view.of(variables['params'])
  else:
    params = get_path(variables['params'], layer.path)
  # (A DenseGeneral's kernel is viewed as the layer's (in, out) matrix.)
  kernel = jnp.asarray(params['kernel'], jnp.float32).reshape(layer.kernel_shape)
  bias = jnp.asarray(params['bias'], jnp.float32).reshape(-1) if 'bias' in params else \
      jnp.zeros(kernel.shape[-1], jnp.float32)
  if layer.bn_path is None:
    return FoldedLayer(kernel, bias)
  bn_params = get_path(variables['params'], layer.bn_path)
  stats = get_path(variables['batch_stats'], layer.bn_path)
  gamma = bn_params.get('scale', jnp.ones_like(stats['var']))
  beta = bn_params.get('bias', jnp.zeros_like(stats['mean']))
  scale = gamma / jnp.sqrt(stats['var'] + layer.bn_epsilon)
  return FoldedLayer(kernel * scale, (bias - stats['mean']) * scale + beta)


def fold_batchnorm(layers: Sequence[LayerInfo],
                   variables: Mapping[str, Any]) -> Dict[str, FoldedLayer]:
  """Folded weights of every layer in the table, keyed by path."""
  return {layer.path: fold_layer(layer, variables) for layer in layers}
