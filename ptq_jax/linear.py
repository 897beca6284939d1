"""Geometry of conv / dense / einsum layers and the linear map computed from it.

A transposed conv (``nn.ConvTranspose``) is the conv of its stride-dilated input, and a
supported ``nn.Einsum`` (:func:`einsum_view`) keeps its equation.

``geometry_of`` reads a Flax ``nn.Conv`` / ``nn.Dense`` (at a given input shape) into
a hashable :class:`LayerGeometry`: strides, explicit padding, dilations, groups.
``apply_linear`` computes the layer from it with ``lax`` directly, so that

* the quantized forward pass, AdaQuant's per-layer step and the integer reference
  all compute a layer the same way;
* one jitted AdaQuant step serves every layer of the same geometry and shapes
  (the module, with its name, is not part of the compiled function);
* on CPU a depthwise conv runs as a sum of shifted products (XLA's CPU grouped conv
  is much slower, forward and backward), with its gradient written out as shifted
  products too (see ``depthwise_conv2d``); a 1x1 conv runs as a matmul
  (``pointwise_conv``), whose gradients XLA's CPU backend computes faster than the
  conv's; any other ungrouped conv keeps XLA's conv forward but computes its kernel
  gradient as a conv in XLA's canonical layout (``conv_with_canonical_grad``), which
  the CPU backend otherwise leaves to a slow generic loop inside ``while`` bodies.
  Timings: results/adaquant_speed.md, results/roofline.md.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class LayerGeometry(NamedTuple):
  """Everything besides the kernel that fixes what a conv / dense layer computes."""

  kind: str                                   # 'conv', 'dense' or 'einsum'
  strides: Tuple[int, ...] = ()
  padding: Tuple[Tuple[int, int], ...] = ()   # explicit (low, high) per spatial dim
  kernel_dilation: Tuple[int, ...] = ()
  input_dilation: Tuple[int, ...] = ()
  groups: int = 1
  equation: str = ''                          # 'einsum': the equation, input first


def einsum_view(module: nn.Module, x_ndim: int) -> Optional[Tuple[str, Tuple[int, ...]]]:
  """``(equation, out_dims)`` if ``module`` is an ``nn.Einsum`` this library quantizes, else
  None. Quantized: the equation set on the module (not at call time), no ellipsis, the
  batch axis first in input and output, and the kernel's output axes trailing in both
  kernel and output, in the same order (every other kernel axis contracted with the
  input). Those axes are the output features: they are flattened into one, so the layer
  is an einsum with one output-feature axis (``equation`` is rewritten so), per-feature
  weight scales, and the output is reshaped back to ``out_dims`` after."""
  equation = getattr(module, 'einsum_str', None)
  if not isinstance(module, nn.Einsum) or not equation:
    return None
  equation = equation.replace(' ', '')
  try:
    lhs, rest = equation.split(',')
    rhs, out = rest.split('->')
  except ValueError:
    return None
  if ('.' in equation or len(lhs) != x_ndim or not out or not rhs
      or len(set(lhs)) != len(lhs) or len(set(rhs)) != len(rhs)):
    return None
  features = [c for c in rhs if c in out]
  n = len(features)
  if (not n or any(c in lhs for c in features) or list(rhs[len(rhs) - n:]) != features
      or list(out[len(out) - n:]) != features or lhs[0] != out[0] or lhs[0] in rhs
      or any(c not in lhs or c in out for c in rhs[:len(rhs) - n])):
    return None
  flat = f'{lhs},{rhs[:len(rhs) - n]}{features[0]}->{out[:len(out) - n]}{features[0]}'
  return flat, tuple(int(d) for d in tuple(module.shape)[len(rhs) - n:])


def conv_transpose_pads(kernel: int, stride: int, padding: str) -> Tuple[int, int]:
  """The (low, high) padding of the dilated-input conv that ``lax.conv_transpose``
  computes for a 'SAME' / 'VALID' transposed conv (``kernel``: its dilated size)."""
  if padding == 'SAME':
    total = kernel + stride - 2
    low = kernel - 1 if stride > kernel - 1 else int(np.ceil(total / 2))
  else:
    total = kernel + stride - 2 + max(kernel - stride, 0)
    low = kernel - 1
  return low, total - low


def _conv_transpose_geometry(module: nn.ConvTranspose, x_shape: Sequence[int],
                             kernel_shape: Sequence[int]) -> Optional[LayerGeometry]:
  """A transposed conv as the conv of the stride-dilated input it is (kernel not
  flipped); None for a mask, ``transpose_kernel`` or CIRCULAR padding."""
  n = len(kernel_shape) - 2
  if (module.mask is not None or module.transpose_kernel or len(x_shape) != n + 2
      or module.padding == 'CIRCULAR'):
    return None
  strides = _as_tuple(module.strides, n)
  kdil = _as_tuple(module.kernel_dilation, n)
  padding = module.padding
  if isinstance(padding, str):
    if padding not in ('SAME', 'VALID'):
      return None
    pads = [conv_transpose_pads((k - 1) * d + 1, s, padding)
            for k, d, s in zip(kernel_shape[:n], kdil, strides)]
  else:
    pads = _explicit_pads(padding, n)
  if pads is None:
    return None
  return LayerGeometry('conv', (1,) * n, tuple((int(lo), int(hi)) for lo, hi in pads), kdil,
                       strides, 1)


def _explicit_pads(padding, n: int):
  """``(low, high)`` per spatial dim from an int or a sequence of ints / pairs; None if
  the sequence has the wrong length."""
  if isinstance(padding, int):
    return [(padding, padding)] * n
  pads = [(p, p) if isinstance(p, int) else tuple(p) for p in padding]
  return pads if len(pads) == n else None


def dense_general_view(module: nn.Module, x_ndim: int) -> Optional[Tuple[int, Tuple[int, ...]]]:
  """``(n_in, features)`` if ``module`` is an ``nn.DenseGeneral`` that is a Dense on
  reshaped views: it contracts the input's last ``n_in`` axes (no ``batch_dims``), so
  ``y = (x flattened over them) @ (kernel as (in, out))``, reshaped to ``features``
  at the end. None otherwise (other axes or batch dims: not quantized)."""
  if not isinstance(module, nn.DenseGeneral) or tuple(module.batch_dims or ()):
    return None
  axes = module.axis if isinstance(module.axis, (tuple, list)) else (module.axis,)
  axes = sorted(int(a) % x_ndim for a in axes)
  if axes != list(range(x_ndim - len(axes), x_ndim)) or len(axes) >= x_ndim:
    return None
  features = module.features if isinstance(module.features, (tuple, list)) else (
      module.features,)
  return len(axes), tuple(int(f) for f in features)


def flatten_input(module: nn.Module, x: jnp.ndarray) -> jnp.ndarray:
  """The input a layer's kernel multiplies: ``x`` itself, or for a DenseGeneral its
  contracted axes flattened into one."""
  view = dense_general_view(module, x.ndim)
  if view is None:
    return x
  return x.reshape(x.shape[:x.ndim - view[0]] + (-1,))


def unflatten_output(module: nn.Module, x_ndim: int, y: jnp.ndarray) -> jnp.ndarray:
  """The inverse for the output: a DenseGeneral's or an Einsum's features restored."""
  if isinstance(module, nn.Einsum):
    view = einsum_view(module, x_ndim)
    return y if view is None else y.reshape(y.shape[:-1] + view[1])
  view = dense_general_view(module, x_ndim)
  if view is None:
    return y
  return y.reshape(y.shape[:-1] + view[1])


def _as_tuple(value, n: int) -> Tuple[int, ...]:
  if value is None:
    return (1,) * n
  return (int(value),) * n if isinstance(value, int) else tuple(int(v) for v in value)


def geometry_of(module: nn.Module, x_shape: Sequence[int],
                kernel_shape: Sequence[int]) -> Optional[LayerGeometry]:
  """The geometry of ``module`` at input shape ``x_shape`` (with batch dim), or None
  where it has no plain ``lax`` equivalent (masked, CIRCULAR/CAUSAL padding,
  unbatched input)."""
  if isinstance(module, nn.Dense) or dense_general_view(module, len(x_shape)) is not None:
    return LayerGeometry('dense')
  if isinstance(module, nn.Einsum):
    view = einsum_view(module, len(x_shape))
    return None if view is None else LayerGeometry('einsum', equation=view[0])
  if isinstance(module, nn.ConvTranspose):
    return _conv_transpose_geometry(module, x_shape, kernel_shape)
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
  else:
    pads = _explicit_pads(padding, n)
  if pads is None:
    return None
  return LayerGeometry('conv', strides, tuple((int(lo), int(hi)) for lo, hi in pads), kdil,
                       idil, int(module.feature_group_count))


def is_plain_depthwise(geom: LayerGeometry, x_shape: Sequence[int],
                       kernel_shape: Sequence[int]) -> bool:
  """A 2-D depthwise conv (one filter per channel) without dilation or negative padding."""
  return (geom.kind == 'conv' and len(kernel_shape) == 4 and kernel_shape[2] == 1
          and geom.groups == x_shape[-1] == kernel_shape[3]
          and set(geom.kernel_dilation) == {1} and set(geom.input_dilation) == {1}
          and min(min(p) for p in geom.padding) >= 0)


def is_pointwise(geom: LayerGeometry, kernel_shape: Sequence[int]) -> bool:
  """A 1x1 (or 1, 1x1x1) ungrouped conv without padding or dilation: a matmul over the
  strided pixels."""
  return (geom.kind == 'conv' and all(k == 1 for k in kernel_shape[:-2]) and geom.groups == 1
          and set(geom.kernel_dilation) == {1} and set(geom.input_dilation) == {1}
          and all(p == (0, 0) for p in geom.padding))


def pointwise_conv(x: jnp.ndarray, kernel: jnp.ndarray, strides: Sequence[int]) -> jnp.ndarray:
  """A pointwise conv as ``dot_general`` over the strided pixels (N...C layout)."""
  if any(s != 1 for s in strides):
    x = x[(slice(None),) + tuple(slice(None, None, s) for s in strides)]
  flat_kernel = kernel.reshape(kernel.shape[-2:])
  return jax.lax.dot_general(x, flat_kernel, (((x.ndim - 1,), (0,)), ((), ())))


def _window(xp: jnp.ndarray, i: int, j: int, strides: Sequence[int],
            out_hw: Tuple[int, int]) -> jnp.ndarray:
  """The ``out_hw`` rows and columns of ``xp`` that kernel tap ``(i, j)`` reads."""
  (sh, sw), (oh, ow) = strides, out_hw
  return xp[:, i:i + (oh - 1) * sh + 1:sh, j:j + (ow - 1) * sw + 1:sw, :]


def _shifted_products(xp: jnp.ndarray, kernel: jnp.ndarray, strides: Sequence[int],
                      out_hw: Tuple[int, int]) -> jnp.ndarray:
  """``sum_ij window_ij(xp) * kernel[i, j, 0]``: a depthwise conv of padded ``xp``."""
  kh, kw = kernel.shape[:2]
  out = None
  for i in range(kh):
    for j in range(kw):
      term = _window(xp, i, j, strides, out_hw) * kernel[i, j, 0]
      out = term if out is None else out + term
  return out


def _pad_spatial(x: jnp.ndarray, pads: Sequence[Tuple[int, int]]) -> jnp.ndarray:
  return jnp.pad(x, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def depthwise_conv2d(x: jnp.ndarray, kernel: jnp.ndarray, strides: Tuple[int, int],
                     pads: Tuple[Tuple[int, int], Tuple[int, int]]) -> jnp.ndarray:
  """NHWC depthwise conv (kernel HW1C) with explicit non-negative padding, as shifted
  products.

  Its gradient is written out (``_depthwise_vjp``): the input gradient as one more sum
  of shifted products over the dilated, padded cotangent (a transposed conv), instead
  of the nine scattered pads that autodiff of the slices gives (equal values), which is
  faster on CPU (``benchmarks/adaquant_speed.py --depthwise``).
  """
  kh, kw = kernel.shape[:2]
  xp = _pad_spatial(x, pads)
  out_hw = ((xp.shape[1] - kh) // strides[0] + 1, (xp.shape[2] - kw) // strides[1] + 1)
  return _shifted_products(xp, kernel, strides, out_hw)


def _depthwise_fwd(x, kernel, strides, pads):
  return depthwise_conv2d(x, kernel, strides, pads), (x, kernel)


def _depthwise_vjp(strides, pads, residuals, g):
  x, kernel = residuals
  kh, kw = kernel.shape[:2]
  (sh, sw), (h, w), (oh, ow) = strides, x.shape[1:3], g.shape[1:3]
  (pad_h, _), (pad_w, _) = pads
  # d x[h] = sum_i g_dilated[h + pad - i] k[i]: dilate g by the stride and pad (or crop)
  # it so that a stride-1 pass of the flipped kernel lands exactly on x's rows.
  g_padded = jax.lax.pad(g, jnp.zeros((), g.dtype), [
      (0, 0, 0), (kh - 1 - pad_h, h + pad_h - (oh - 1) * sh - 1, sh - 1),
      (kw - 1 - pad_w, w + pad_w - (ow - 1) * sw - 1, sw - 1), (0, 0, 0)])
  dx = _shifted_products(g_padded, kernel[::-1, ::-1], (1, 1), (h, w))
  xp = _pad_spatial(x, pads)
  dk = jnp.stack([jnp.sum(_window(xp, i, j, strides, (oh, ow)) * g, axis=(0, 1, 2))
                  for i in range(kh) for j in range(kw)]).reshape(kernel.shape)
  return dx, dk


depthwise_conv2d.defvjp(_depthwise_fwd, _depthwise_vjp)


def _conv(x: jnp.ndarray, kernel: jnp.ndarray, geom: LayerGeometry,
          preferred_element_type=None) -> jnp.ndarray:
  """The layer's conv as one ``conv_general_dilated`` (N...C input, ...IO kernel)."""
  spatial = 'HWD'[:kernel.ndim - 2]
  return jax.lax.conv_general_dilated(
      x, kernel, geom.strides, geom.padding, lhs_dilation=geom.input_dilation,
      rhs_dilation=geom.kernel_dilation,
      dimension_numbers=(f'N{spatial}C', f'{spatial}IO', f'N{spatial}C'),
      feature_group_count=geom.groups, preferred_element_type=preferred_element_type)


def has_canonical_grad(geom: LayerGeometry) -> bool:
  """A conv whose kernel gradient :func:`conv_with_canonical_grad` computes: ungrouped,
  no input dilation."""
  return geom.kind == 'conv' and geom.groups == 1 and set(geom.input_dilation) == {1}


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_with_canonical_grad(x: jnp.ndarray, kernel: jnp.ndarray,
                             geom: LayerGeometry) -> jnp.ndarray:
  """The layer's conv (N...C, ...IO), with its kernel gradient written as one conv in
  XLA's canonical form (batch, spatial, feature): the examples become the contracted
  feature axis and the input channels the batch. Autodiff's own kernel gradient is a
  conv with permuted dimension labels; inside a ``while`` loop (``lax.fori_loop``) the
  CPU backend cannot give it a canonical layout and runs it tens of times slower. The
  input gradient is written out too (the stride-dilated cotangent against the flipped
  kernel), for the same reason. Equal values (summation order aside)."""
  return _conv(x, kernel, geom)


def _conv_fwd(x, kernel, geom):
  return _conv(x, kernel, geom), (x, kernel)


def _conv_vjp(geom, residuals, g):
  x, kernel = residuals
  nd = kernel.ndim - 2
  spatial = 'HWD'[:nd]
  dims = (f'N{spatial}C', f'{spatial}IO', f'N{spatial}C')
  # dx: the stride-dilated g, padded so that the flipped kernel (in and out swapped)
  # lands on x's positions; a negative pad crops what the forward never read.
  reach = [(k - 1) * d + 1 for k, d in zip(kernel.shape[:nd], geom.kernel_dilation)]
  pads = [(r - 1 - lo, size + lo - (out - 1) * stride - 1)
          for r, (lo, _), size, out, stride in zip(reach, geom.padding, x.shape[1:-1],
                                                   g.shape[1:-1], geom.strides)]
  flipped = jnp.swapaxes(kernel[tuple(slice(None, None, -1) for _ in range(nd))], -1, -2)
  dx = jax.lax.conv_general_dilated(g, flipped, (1,) * nd, pads, lhs_dilation=geom.strides,
                                    rhs_dilation=geom.kernel_dilation, dimension_numbers=dims)
  # dK[k, i, o] = sum_{n, p} x_pad[n, p * stride + k * dilation, i] g[n, p, o]: a conv of
  # x (channels as batch, examples as features) with g (examples in, channels out) as
  # the window, the window dilated by the stride and stepped by the kernel dilation.
  xt = jnp.transpose(x, (x.ndim - 1,) + tuple(range(1, nd + 1)) + (0,))
  gt = jnp.transpose(g, tuple(range(1, nd + 1)) + (0, g.ndim - 1))
  dk = jax.lax.conv_general_dilated(xt, gt, geom.kernel_dilation, geom.padding,
                                    rhs_dilation=geom.strides, dimension_numbers=dims)
  dk = dk[(slice(None),) + tuple(slice(0, k) for k in kernel.shape[:nd])]
  return dx, jnp.transpose(dk, tuple(range(1, nd + 1)) + (0, nd + 1)).astype(kernel.dtype)


conv_with_canonical_grad.defvjp(_conv_fwd, _conv_vjp)


def apply_linear(geom: LayerGeometry, x: jnp.ndarray, kernel: jnp.ndarray,
                 preferred_element_type=None, one_op: bool = False) -> jnp.ndarray:
  """The layer's linear map (no bias) of ``x`` with ``kernel``.

  ``preferred_element_type=jnp.int32`` gives integer accumulation for integer inputs;
  ``one_op=True`` keeps every conv one ``conv_general_dilated`` (what an exporter
  maps onto one Conv node) instead of CPU's faster equivalents.
  """
  if geom.kind == 'dense':
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())),
                               preferred_element_type=preferred_element_type)
  if geom.kind == 'einsum':
    return jnp.einsum(geom.equation, x, kernel, preferred_element_type=preferred_element_type)
  if preferred_element_type is None and jax.default_backend() == 'cpu' and not one_op:
    if is_plain_depthwise(geom, x.shape, kernel.shape):
      return depthwise_conv2d(x, kernel, tuple(geom.strides), tuple(geom.padding))
    if is_pointwise(geom, kernel.shape):
      return pointwise_conv(x, kernel, geom.strides)
    if has_canonical_grad(geom):
      return conv_with_canonical_grad(x, kernel, geom)
  return _conv(x, kernel, geom, preferred_element_type)
