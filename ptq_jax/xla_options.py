"""Per-program XLA compiler options (``jax.jit(..., compiler_options=...)``), chosen by
what a program computes; nothing is set process-wide.

XLA's CPU backend schedules a program's independent operations to run concurrently by
default. For a depthwise conv written as shifted products (``ptq_jax.linear``) that
keeps all nine kernel taps' windows of a minibatch alive at once, far more than the
cache holds, while the operations running side by side share the cores: every pass is
slower. Scheduled for memory instead, each window is produced and reduced while still
in cache. The same schedule slows programs dominated by one large conv or matmul, so it
is asked for per program (``results/roofline.md``).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Sequence

import jax
import jax.numpy as jnp

from ptq_jax.linear import LayerGeometry, is_plain_depthwise

MEMORY_SCHEDULE: Dict[str, Any] = {'xla_cpu_scheduler_type': 'CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED'}


@functools.lru_cache(maxsize=None)
def _accepted() -> bool:
  """Whether this jaxlib's XLA knows :data:`MEMORY_SCHEDULE` (a trivial program compiled
  with it)."""
  try:
    jax.jit(lambda x: x + 1, compiler_options=MEMORY_SCHEDULE)(jnp.zeros(()))
    return True
  except Exception:   # an XLA without the option: the default schedule
    return False


def memory_schedule_pays(geom: LayerGeometry, input_shape: Sequence[int],
                         kernel_shape: Sequence[int]) -> bool:
  """Whether a layer's step program should be compiled with :data:`MEMORY_SCHEDULE`:
  a depthwise conv on CPU, where this XLA has the option."""
  return (jax.default_backend() == 'cpu' and geom is not None
          and is_plain_depthwise(geom, input_shape, kernel_shape) and _accepted())


class PerLayerJit:
  """``fn`` jitted twice, with the default schedule and with :data:`MEMORY_SCHEDULE`.
  Calling it runs the default program; :meth:`for_layer` picks a layer's."""

  def __init__(self, fn: Callable[..., Any], **jit_kwargs: Any):
    self._default = jax.jit(fn, **jit_kwargs)
    self._scheduled = jax.jit(fn, compiler_options=MEMORY_SCHEDULE, **jit_kwargs)

  def __call__(self, *args: Any, **kwargs: Any) -> Any:
    return self._default(*args, **kwargs)

  def for_layer(self, geom: LayerGeometry, input_shape: Sequence[int],
                kernel_shape: Sequence[int]) -> Callable[..., Any]:
    """The program for a layer of this geometry and shapes (:func:`memory_schedule_pays`)."""
    if memory_schedule_pays(geom, input_shape, kernel_shape):
      return self._scheduled
    return self._default

  def cache_size(self) -> int:
    """Programs compiled so far, both schedules."""
    return self._default._cache_size() + self._scheduled._cache_size()


def block_options(modules: Sequence[Any]) -> Dict[str, Any]:
  """Compiler options of a block's step program: :data:`MEMORY_SCHEDULE` on CPU when one
  of the block's layers is a grouped (e.g. depthwise) conv, else none."""
  grouped = any(getattr(m, 'feature_group_count', 1) > 1 for m in modules)
  return dict(MEMORY_SCHEDULE) if grouped and jax.default_backend() == 'cpu' and _accepted() else {}
