"""Geometry of conv / dense layers and the linear map computed from it.

``geometry_of`` reads a Flax ``nn.Conv`` / ``nn.Dense`` (at a given input shape) into
a hashable :class:`LayerGeometry`: strides, explicit padding, dilations, groups.
``apply_linear`` computes the layer from it with ``lax`` directly, so that

* the quantized forward pass, AdaQuant's per-layer step and the integer reference
  all compute a layer the same way;
* one jitted AdaQuant step serves every layer of the same geometry and shapes
  (the module, with its name, is not part of the compiled function);
* on CPU a depthwise conv runs as a sum of shifted products: XLA's CPU grouped
  conv is ~15x slower forward and ~5x slower for gradients on a 2-core machine.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp


class LayerGeometry(NamedTuple):
  """Everything besides the kernel that fixes what a conv / dense layer computes."""

  kind: str                                   # 'conv' or 'dense'
  strides: Tuple[int, ...] = ()
  padding: Tuple[Tuple[int, int], ...] = ()   # explicit (low, high) per spatial dim
  kernel_dilation: Tuple[int, ...] = ()
  input_dilation: Tuple[int, ...] = ()
  groups: int = 1


def _as_tuple(value, n: int) -> Tuple[int, ...]:
  if value is None:
    return (1,) * n
  return (int(value),) * n if isinstance(value, int) else tuple(int(v) for v in value)


def geometry_of(module: nn.Module, x_shape: Sequence[int],
                kernel_shape: Sequence[int]) -> Optional[LayerGeometry]:
  """The geometry of ``module`` at input shape ``x_shape`` (with batch dim), or None
  where it has no plain ``lax`` equivalent (masked, CIRCULAR/CAUSAL padding,
  unbatched input)."""
  if isinstance(module, nn.Dense):
    return LayerGeometry('dense')
  if not isinstance(module, nn.Conv) or module.mask is not None:
    return None
  n = len(kernel_shape) - 2
  if len(x_shape) != n + 2:
    return None
  strides = _as_tuple(module.strides, n)
  kdil = _as_tuple(module.kernel_dilation, n)
  idil = _as_tuple(module.input_dilation, n)
  padding = module.padding
  if isinstance(padding, str):
    if padding not in ('SAME', 'VALID'):
      return None
    window = [(k - 1) * d + 1 for k, d in zip(kernel_shape[:n], kdil)]
    spatial = [(s - 1) * i + 1 for s, i in zip(x_shape[1:1 + n], idil)]
    pads = jax.lax.padtype_to_pads(spatial, window, strides, padding)
  elif isinstance(padding, int):
    pads = [(padding, padding)] * n
  else:
    pads = [(p, p) if isinstance(p, int) else tuple(p) for p in padding]
    if len(pads) != n:
      return None
  return LayerGeometry('conv', strides, tuple((int(lo), int(hi)) for lo, hi in pads), kdil,
                       idil, int(module.feature_group_count))


def is_plain_depthwise(geom: LayerGeometry, x_shape: Sequence[int],
                       kernel_shape: Sequence[int]) -> bool:
  """A 2-D depthwise conv (one filter per channel) without dilation."""
  return (geom.kind == 'conv' and len(kernel_shape) == 4 and kernel_shape[2] == 1
          and geom.groups == x_shape[-1] == kernel_shape[3]
          and set(geom.kernel_dilation) == {1} and set(geom.input_dilation) == {1})


def depthwise_conv2d(x: jnp.ndarray, kernel: jnp.ndarray, strides: Sequence[int],
                     pads: Sequence[Tuple[int, int]]) -> jnp.ndarray:
  """NHWC depthwise conv (kernel HW1C) with explicit padding, as shifted products."""
  kh, kw = kernel.shape[:2]
  sh, sw = strides
  xp = jnp.pad(x, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))
  out_h = (xp.shape[1] - kh) // sh + 1
  out_w = (xp.shape[2] - kw) // sw + 1
  out = None
  for i in range(kh):
    for j in range(kw):
      patch = xp[:, i:i + (out_h - 1) * sh + 1:sh, j:j + (out_w - 1) * sw + 1:sw, :]
      term = patch * kernel[i, j, 0]
      out = term if out is None else out + term
  return out


def apply_linear(geom: LayerGeometry, x: jnp.ndarray, kernel: jnp.ndarray,
                 preferred_element_type=None) -> jnp.ndarray:
  """The layer's linear map (no bias) of ``x`` with ``kernel``.

  ``preferred_element_type=jnp.int32`` gives integer accumulation for integer inputs.
  """
  if geom.kind == 'dense':
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())),
                               preferred_element_type=preferred_element_type)
  if (preferred_element_type is None and jax.default_backend() == 'cpu'
      and is_plain_depthwise(geom, x.shape, kernel.shape)):
    return depthwise_conv2d(x, kernel, geom.strides, geom.padding)
  spatial = 'HWD'[:kernel.ndim - 2]
  return jax.lax.conv_general_dilated(
      x, kernel, geom.strides, geom.padding, lhs_dilation=geom.input_dilation,
      rhs_dilation=geom.kernel_dilation,
      dimension_numbers=(f'N{spatial}C', f'{spatial}IO', f'N{spatial}C'),
      feature_group_count=geom.groups, preferred_element_type=preferred_element_type)
