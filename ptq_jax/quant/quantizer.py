"""Uniform quantizers with differentiable range and offset.

A quantizer's state is a pytree ``QuantizerState(range, low)`` whose leaves are
broadcastable to the tensor (shape ``(C,)`` per output channel, ``()`` per
tensor); the bit width and the mode are static fields. Asymmetric (default):
``s = R / (2^b - 1)``, ``zp = clip(round(-z / s), 0, 2^b - 1)``,
``q(x) = s * (clip(round(x / s) + zp, 0, 2^b - 1) - zp)`` with ``z`` forced into
``[-R, 0]``. Symmetric: ``s = R / (2^(b-1) - 1)``, ``q(x) = s * clip(round(x / s),
-(2^(b-1) - 1), 2^(b-1) - 1)`` with ``R`` the largest magnitude. Rounding uses
the straight-through estimator, so gradients reach ``x``, ``R`` and ``z``.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ptq_jax.quant import mse_search
from ptq_jax.quant.percentile import percentile as order_statistic_percentile

MIN_BITS, MAX_BITS = 2, 8
RANGE_METHODS = ('minmax', 'mse', 'percentile')
HISTOGRAM_MIN_SIZE = 1 << 18   # elements from which init_mse searches from a histogram
_EPS = 1e-8


def check_bits(bits: Optional[int], what: str = 'bits') -> Optional[int]:
  """Returns ``bits`` if it is None (not quantized) or an integer in 2..8; raises otherwise."""
  if bits is None:
    return None
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not (
      MIN_BITS <= int(bits) <= MAX_BITS):
    raise ValueError(f'{what}={bits!r} is not supported: use an integer from {MIN_BITS} to '
                     f'{MAX_BITS}, or None to leave the tensor in float.')
  return int(bits)


Option = Tuple[int, int]  # a bit option: (w_bits, a_bits)


def parse_option(option: Any) -> Option:
  """``(4, 4)``, ``'W4A4'`` or ``'4/4'`` -> ``(4, 4)``, validated."""
  if isinstance(option, str):
    text = option.strip().upper()
    try:
      if text.startswith('W') and 'A' in text:
        w, a = text[1:].split('A')
      else:
        w, a = text.split('/')
      option = (int(w), int(a))
    except ValueError:
      raise ValueError(f'Bit option {option!r} is not understood: write "W4A4", "4/4" or '
                       '(4, 4).') from None
  if not isinstance(option, (tuple, list)) or len(option) != 2:
    raise ValueError(f'A bit option is a (w_bits, a_bits) pair, got {option!r}.')
  w, a = option
  return check_bits(w, 'option w_bits'), check_bits(a, 'option a_bits')


def option_name(option: Option) -> str:
  return f'W{option[0]}A{option[1]}'


@struct.dataclass
class QuantizerState:
  """Range ``R`` and low end ``z`` (asymmetric) of a uniform quantizer."""

  range: jnp.ndarray
  low: jnp.ndarray
  bits: int = struct.field(pytree_node=False)
  symmetric: bool = struct.field(pytree_node=False, default=False)

  @property
  def levels(self) -> int:
    return 2**self.bits - 1


def round_ste(x: jnp.ndarray) -> jnp.ndarray:
  """round(x) forward, identity gradient backward."""
  return x + jax.lax.stop_gradient(jnp.round(x) - x)


def clip_inclusive(x: jnp.ndarray, lo, hi) -> jnp.ndarray:
  """``clip`` whose gradient is 1 on the closed interval (``jnp.clip`` gives 0.5 at
  the end points, which would halve the gradient of values on the lowest level)."""
  return jnp.where((x >= lo) & (x <= hi), x, jnp.clip(x, lo, hi))


def scale_and_zero_point(q: QuantizerState) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """Step size ``s`` and (straight-through rounded) integer zero point ``zp``."""
  r = jnp.maximum(q.range, _EPS)
  if q.symmetric:
    return r / (2**(q.bits - 1) - 1), jnp.zeros_like(r)
  s = r / q.levels
  z = jnp.clip(q.low, -r, 0.0)
  return s, jnp.clip(round_ste(-z / s), 0, q.levels)


def fake_quant(x: jnp.ndarray, q: QuantizerState) -> jnp.ndarray:
  """Quantize-dequantize ``x`` (straight-through rounding)."""
  s, zp = scale_and_zero_point(q)
  if q.symmetric:
    qmax = 2**(q.bits - 1) - 1
    return s * clip_inclusive(round_ste(x / s), -qmax, qmax)
  return s * (clip_inclusive(round_ste(x / s) + zp, 0, q.levels) - zp)


def quantize_to_int(x: jnp.ndarray, q: QuantizerState) -> jnp.ndarray:
  """Integer codes of ``x``: in ``[0, 2^b - 1]`` (asymmetric) or ``[-qmax, qmax]`` (symmetric)."""
  s, zp = scale_and_zero_point(q)
  if q.symmetric:
    qmax = 2**(q.bits - 1) - 1
    return jnp.clip(jnp.round(x / s), -qmax, qmax).astype(jnp.int32)
  return jnp.clip(jnp.round(x / s) + zp, 0, q.levels).astype(jnp.int32)


def from_min_max(lo: jnp.ndarray, hi: jnp.ndarray, bits: int,
                 symmetric: bool = False) -> QuantizerState:
  """The quantizer covering ``[lo, hi]`` (extended to include 0)."""
  lo, hi = jnp.minimum(jnp.asarray(lo, jnp.float32), 0.0), jnp.maximum(jnp.asarray(hi, jnp.float32), 0.0)
  if symmetric:
    r = jnp.maximum(jnp.abs(lo), hi)
    return QuantizerState(r, -r, bits, True)
  return QuantizerState(hi - lo, lo, bits, False)


def _reduce_axes(x: jnp.ndarray, channel_axis: Optional[int]) -> Tuple[int, ...]:
  if channel_axis is None:
    return tuple(range(x.ndim))
  channel_axis = channel_axis % x.ndim
  return tuple(a for a in range(x.ndim) if a != channel_axis)


def init_minmax(x: jnp.ndarray, bits: int, channel_axis: Optional[int] = None,
                symmetric: bool = False) -> QuantizerState:
  """Range from the tensor's min and max (per channel along ``channel_axis``)."""
  axes = _reduce_axes(x, channel_axis)
  return from_min_max(jnp.min(x, axis=axes), jnp.max(x, axis=axes), bits, symmetric)


def init_percentile(x: jnp.ndarray, bits: int, channel_axis: Optional[int] = None,
                    symmetric: bool = False, percentile: float = 99.99) -> QuantizerState:
  """Range from the ``100 - p`` and ``p`` percentiles, clipping rare outliers."""
  if not 50.0 < percentile <= 100.0:
    raise ValueError(f'percentile must be in (50, 100], got {percentile}.')
  if channel_axis is not None:
    flat = jnp.moveaxis(x, channel_axis % x.ndim, -1).reshape(-1, x.shape[channel_axis])
  else:
    flat = x.reshape(-1)
  # (jnp.percentile's own numbers, by order statistics instead of a sort: quant/percentile)
  lo = order_statistic_percentile(flat, 100.0 - percentile)
  hi = order_statistic_percentile(flat, percentile)
  return from_min_max(lo, hi, bits, symmetric)


def init_mse(x: jnp.ndarray, bits: int, channel_axis: Optional[int] = None,
             symmetric: bool = False, grid: int = 100, min_fraction: float = 0.2,
             exhaustive: Optional[bool] = None) -> QuantizerState:
  """Range minimising ``||x - q(x)||^2`` over shrunken min/max ranges.

  Searches ``grid`` fractions of the min/max range in ``[min_fraction, 1]``
  independently per channel (all candidates in one vectorised pass). A per-tensor
  search (``channel_axis=None``) of a large tensor scores the candidates from a
  histogram of ``x`` and only the close ones on ``x`` itself
  (:mod:`ptq_jax.quant.mse_search`), with the same result; ``exhaustive``: True scores
  every candidate on ``x``, False always uses the histogram, None (default) uses it from
  ``HISTOGRAM_MIN_SIZE`` elements (below, the plain search is cheaper to compile and run).
  """
  full = init_minmax(x, bits, channel_axis, symmetric)
  axes = _reduce_axes(x, channel_axis)
  fractions = jnp.linspace(min_fraction, 1.0, grid)
  if exhaustive is None:
    exhaustive = x.size < HISTOGRAM_MIN_SIZE
  if channel_axis is None and not exhaustive:
    best = mse_search.best_fraction(x, full, fractions, fake_quant,
                                     lambda q: scale_and_zero_point(q)[0])
    return QuantizerState(full.range * best, full.low * best, bits, symmetric)

  def error(fraction):
    q = QuantizerState(full.range * fraction, full.low * fraction, bits, symmetric)
    if channel_axis is not None:
      shape = [1] * x.ndim
      shape[channel_axis % x.ndim] = -1
      q = jax.tree.map(lambda a: a.reshape(shape), q)
    return jnp.sum((fake_quant(x, q) - x)**2, axis=axes)

  errors = jax.lax.map(error, fractions)        # (grid, C) or (grid,)
  best = fractions[jnp.argmin(errors, axis=0)]  # (C,) or ()
  return QuantizerState(full.range * best, full.low * best, bits, symmetric)


def init_range(x: jnp.ndarray, bits: int, method: str = 'minmax',
               channel_axis: Optional[int] = None, symmetric: bool = False,
               percentile: float = 99.99) -> QuantizerState:
  """Dispatches to ``init_minmax`` / ``init_mse`` / ``init_percentile``."""
  check_bits(bits)
  x = jnp.asarray(x, jnp.float32)
  if method == 'minmax':
    return init_minmax(x, bits, channel_axis, symmetric)
  if method == 'mse':
    return init_mse(x, bits, channel_axis, symmetric)
  if method == 'percentile':
    return init_percentile(x, bits, channel_axis, symmetric, percentile)
  raise ValueError(f'Unknown range method {method!r}; choose one of {RANGE_METHODS}.')


def reshape_for(q: QuantizerState, ndim: int, channel_axis: int = -1) -> QuantizerState:
  """Reshapes per-channel leaves of shape (C,) to broadcast along ``channel_axis`` of an
  ``ndim``-dim tensor (scalars are left alone)."""
  def fix(a):
    if a.ndim == 0:
      return a
    shape = [1] * ndim
    shape[channel_axis % ndim] = a.shape[0]
    return a.reshape(shape)
  return jax.tree.map(fix, q)
