"""Argument checks shared by the public entry points: each raises ``TypeError`` or
``ValueError`` naming the argument and what it must be, before any work starts."""

from __future__ import annotations

import math
from typing import Any, Optional

import jax
import numpy as np


def check_int(value: Any, name: str, minimum: int = 0) -> int:
  """``value`` as an int >= ``minimum`` (bools and floats refused)."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f'{name} must be an integer, got {value!r} ({type(value).__name__}).')
  if value < minimum:
    raise ValueError(f'{name} must be >= {minimum}, got {value}.')
  return int(value)


def check_number(value: Any, name: str, minimum: Optional[float] = None) -> float:
  """``value`` as a finite float (>= ``minimum`` if given); strings and bools refused."""
  if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
    raise TypeError(f'{name} must be a number, got {value!r} ({type(value).__name__}).')
  if not math.isfinite(value) or (minimum is not None and value < minimum):
    bound = f' >= {minimum}' if minimum is not None else ''
    raise ValueError(f'{name} must be a finite number{bound}, got {value}.')
  return float(value)


def check_key(key: Any, name: str = 'key') -> Optional[jax.Array]:
  """None, or a typed JAX PRNG key (``jax.random.key(seed)``)."""
  if key is None:
    return None
  if not (isinstance(key, jax.Array) and jax.dtypes.issubdtype(key.dtype,
                                                                jax.dtypes.prng_key)
          and key.shape == ()):
    raise TypeError(f'{name} must be a PRNG key made by jax.random.key(seed), got {key!r}.')
  return key
