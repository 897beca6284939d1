"""The per-tensor MSE range search without one pass over the tensor per candidate.

The search (``quantizer.init_mse``) scores each of ``grid`` shrunken min/max ranges by
``sum (x - q(x))^2`` and keeps the best. Scoring every candidate on the whole tensor is
``grid`` passes over an activation tensor of millions of values. Here one pass builds a
fine histogram of the tensor (16,384 bins), each bin's count and first and second
moments about its centre; a candidate's error is then exact for every bin that ``q``
maps to one level
(``sum (d + c - v)^2`` with ``d = x - c`` about the bin centre ``c``), and bounded for the
few bins where ``q`` changes level. Candidates whose bounded estimate could still be the
minimum are scored on the tensor itself, exactly as the plain search scores them, so the
chosen fraction is the plain search's (the bound is rigorous up to float32 rounding of
the estimate, for which it keeps a margin).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BINS = 16384
_RELATIVE_SLACK = 1e-4   # float32 rounding of the histogram sums


def _exact_error(x: jnp.ndarray, fraction, full, quantize) -> jnp.ndarray:
  """``sum (q(x) - x)^2`` for the range ``fraction`` of ``full``: the plain search's score."""
  q = full.replace(range=full.range * fraction, low=full.low * fraction)
  return jnp.sum((quantize(x, q) - x)**2)


def best_fraction(x: jnp.ndarray, full, fractions: jnp.ndarray, quantize, step
                  ) -> jnp.ndarray:
  """The first of ``fractions`` minimising ``sum (x - q(x))^2`` over all of ``x``, for
  the per-tensor quantizer ``full`` (min/max) scaled by the fraction; ``quantize(x, q)``
  is the fake quantizer, ``step(q)`` its step between levels."""
  tensor = x = jnp.asarray(x, jnp.float32)
  x = x.reshape(-1)
  lo, hi = jnp.min(x), jnp.max(x)
  width = jnp.maximum((hi - lo) / BINS, jnp.finfo(jnp.float32).tiny * BINS)
  index = jnp.clip(jnp.floor((x - lo) / width).astype(jnp.int32), 0, BINS - 1)
  edges = lo + jnp.arange(BINS + 1, dtype=jnp.float32) * width
  centre = (edges[:-1] + edges[1:]) / 2
  d = x - centre[index]
  count = jnp.bincount(index, length=BINS).astype(jnp.float32)
  first = jnp.bincount(index, weights=d, length=BINS)
  second = jnp.bincount(index, weights=d * d, length=BINS)
  margin = width * 1e-3   # (an element's bin index is off by float rounding: < width / 2)
  ends = jnp.stack([lo - margin, hi + margin])

  def estimate(fraction):
    q = full.replace(range=full.range * fraction, low=full.low * fraction)
    v = quantize(centre, q)
    offset = centre - v
    error = jnp.sum(second + 2 * offset * first + count * offset**2)
    # The elements of bin j lie between centres j - 1 and j + 1, so (q is monotone) on
    # levels v' in [v[j-1], v[j+1]]: exact where those are equal. Else, one threshold t
    # between the neighbours (a jump of one step) is within 1.5 widths of every element,
    # so |2x - v - v'| <= 2 |x - t|; more thresholds: |x - v| <= 1.5 width + jump.
    outer = quantize(ends, q)
    below = jnp.concatenate([outer[:1], v[:-1]])
    above = jnp.concatenate([v[1:], outer[1:]])
    jump = above - below
    spread = 3.01 * width   # 2 |x - t| with the margins
    one = jump <= 1.5 * step(q)
    per_element = jump * jnp.where(one, spread, spread + 2 * jump)
    bound = jnp.sum(count * per_element)
    return error, bound + _RELATIVE_SLACK * jnp.abs(error)

  errors, bounds = jax.vmap(estimate)(fractions)
  candidates = errors - bounds <= jnp.min(errors + bounds)
  exact = jax.lax.map(
      lambda args: jax.lax.cond(args[1], lambda f: _exact_error(tensor, f, full, quantize),
                                lambda f: jnp.float32(jnp.inf), args[0]),
      (fractions, candidates))
  return fractions[jnp.argmin(exact)]
