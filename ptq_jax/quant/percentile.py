"""``jnp.percentile`` of large activation tensors without sorting them.

A percentile of ``n`` values is one or two order statistics (ranks fixed by ``n`` and
the percentile) and a linear interpolation between them. Sorting finds them at
``O(n log n)`` (XLA's CPU sort, and its top-k, take seconds for an ImageNet
activation tensor); here each is found among the 2^32 float32 values in their sort
order: for one large tensor by a radix select (two counts of 16-bit digits), per channel
(or for a small tensor) by a binary search, each step one count of the elements at or
below the candidate (32 cheap passes over the data); the next one by two more passes.
The ranks, the interpolation weights and the arithmetic are ``jnp.percentile``'s own
(method 'linear', float32), so the result is
the same number.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np


_SIGN = np.uint32(0x80000000)
_ALL = np.uint32(0xFFFFFFFF)


def _sortable(x: jnp.ndarray) -> jnp.ndarray:
  """float32 -> uint32 keys in the same order: the sign bit set for non-negative
  numbers, every bit flipped for negative ones."""
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  return bits ^ jnp.where(bits >= _SIGN, _ALL, _SIGN)


def _unsortable(key: jnp.ndarray) -> jnp.ndarray:
  bits = key ^ jnp.where(key >= _SIGN, _SIGN, _ALL)
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


RADIX_MIN_SIZE = 1 << 18   # elements from which one tensor's order statistic is a radix select


def _order_key(keys: jnp.ndarray, rank: Any, radix: Optional[bool] = None) -> jnp.ndarray:
  """The key of the ``rank``-th smallest (0-based) along axis 0, per remaining index
  (``radix``: by counts of digits, for a 1-D tensor; None: from ``RADIX_MIN_SIZE``)."""
  if radix is None:
    radix = keys.ndim == 1 and keys.shape[0] >= RADIX_MIN_SIZE
  if radix:
    return _order_key_by_counts(keys, rank)
  lo = jnp.zeros(keys.shape[1:], jnp.uint32)
  hi = jnp.full(keys.shape[1:], _ALL, jnp.uint32)

  def step(_, bounds):   # invariant: the answer's key lies in [lo, hi]
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    enough = jnp.sum(keys <= mid, axis=0, dtype=jnp.int32) >= rank + 1
    return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

  return jax.lax.fori_loop(0, 32, step, (lo, hi))[1]


_DIGITS = 1 << 16


def _order_key_by_counts(keys: jnp.ndarray, rank: Any) -> jnp.ndarray:
  """``_order_key`` of a 1-D tensor by two counts of 16-bit digits (a radix select):
  the high half of the answer's key is the digit whose cumulative count first exceeds
  ``rank``; the low half, likewise among the keys with that high half."""
  high = (keys >> 16).astype(jnp.int32)
  counts = jnp.bincount(high, length=_DIGITS)
  cumulative = jnp.cumsum(counts)
  top = jnp.sum(cumulative <= rank, dtype=jnp.int32)
  rank_within = rank - (cumulative[top] - counts[top])
  low = jnp.where(high == top, (keys & np.uint32(0xFFFF)).astype(jnp.int32), _DIGITS)
  bottom = jnp.sum(jnp.cumsum(jnp.bincount(low, length=_DIGITS + 1)[:_DIGITS]) <= rank_within,
                   dtype=jnp.int32)
  return (top.astype(jnp.uint32) << 16) | bottom.astype(jnp.uint32)


def order_statistic(x: jnp.ndarray, rank: Any) -> jnp.ndarray:
  """The ``rank``-th smallest (0-based; an int or a traced int32) of ``x`` along axis 0,
  per remaining index."""
  return _unsortable(_order_key(_sortable(jnp.asarray(x, jnp.float32)), rank))


def percentile(x: jnp.ndarray, percentile: float, radix: Optional[bool] = None
               ) -> jnp.ndarray:
  """``jnp.percentile(x, percentile, axis=0)`` of float32 ``x``, by order statistics.
  The ranks and weights are computed by ``jnp.percentile``'s own operations, in the
  same program, so they round as it does. ``radix``: how a 1-D tensor's order
  statistics are found (see ``_order_key``)."""
  x = jnp.asarray(x, jnp.float32)
  q = jnp.asarray(percentile, jnp.float32) / 100.0
  n = jnp.float32(x.shape[0])
  position = q * (n - 1)
  low, high = jnp.floor(position), jnp.ceil(position)
  high_weight = position - low
  low_weight = 1.0 - high_weight
  rank = lambda r: jnp.clip(r, 0.0, n - 1).astype(jnp.int32)
  keys = _sortable(x)
  low_key = _order_key(keys, rank(low), radix)
  # The next rank is the same value while enough elements tie with it, else the
  # smallest key above it: one more pass instead of a second search.
  ties = jnp.sum(keys <= low_key, axis=0, dtype=jnp.int32) >= rank(high) + 1
  above = jnp.min(jnp.where(keys > low_key, keys, _ALL), axis=0)
  high_key = jnp.where(ties, low_key, above)
  low_value, high_value = _unsortable(low_key), _unsortable(high_key)
  return low_value * low_weight + high_value * high_weight


__all__ = ['order_statistic', 'percentile']
