"""Ahead-of-time compilation of many jitted programs at once, on a thread pool.

Why: a whole-model AdaQuant run needs a few programs per distinct layer shape, and on
a GPU compiling them (XLA plus convolution autotuning) is most of a cold run. XLA
compiles with the GIL released, so a thread pool can compile them side by side while
the main thread captures layer inputs, and the layer loop then compiles nothing.
Measured on one H200 (results/resnet50_gpu.md): this did *not* shorten a cold
ResNet-50 run (115 s with 16 threads; 101 s, in an earlier session, compiling each
program when its first layer came up; 4 threads and none both took over 95 s): the
GPU compilations do not overlap usefully and their autotuning competes with the
running steps. So it is opt-in (``AdaQuantConfig(precompile=True)``); what helps is
JAX's persistent compilation cache (:mod:`ptq_jax.compilation_cache`).

The programs are ``jax.jit`` functions lowered with ``.lower(...).compile()`` from
abstract arguments that carry the device they will run on (a committed
``SingleDeviceSharding``); a later call of the same jitted function with arrays
committed to that device (``commit``) then finds the compiled executable in JAX's
own cache. A program whose compilation fails here is simply compiled again when it
is called (the error is reported once).
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
import warnings
from typing import Any, Callable, Dict, Hashable, Optional

import jax
import numpy as np
from jax.sharding import SingleDeviceSharding


def commit(tree: Any, device: Any) -> Any:
  """``tree``'s arrays committed to ``device`` (a no-op for those already there), so a
  jitted call matches a program compiled by :class:`Precompiler` for that device."""
  return jax.device_put(tree, SingleDeviceSharding(device))


def abstract(tree: Any, device: Any) -> Any:
  """Shape/dtype stand-ins for ``tree``'s arrays (or ``ShapeDtypeStruct`` leaves),
  committed to ``device``."""
  sharding = SingleDeviceSharding(device)

  def leaf(a):
    return jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=sharding,
                                weak_type=bool(getattr(a, 'weak_type', False)))
  return jax.tree.map(leaf, tree)


def signature(tree: Any) -> Hashable:
  """A hashable description of an abstract tree: structure, shapes, dtypes, devices."""
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, tuple((tuple(l.shape), str(l.dtype), bool(getattr(l, 'weak_type', False)),
                         str(getattr(l, 'sharding', None))) for l in leaves)


class Precompiler:
  """Compiles jitted programs on ``threads`` host threads, each distinct one once.

  ``submit(key, fn, *args)`` queues ``fn.lower(*args).compile()`` under ``key`` (a
  hashable description of the program, e.g. its static arguments plus
  :func:`signature` of the abstract ones); ``wait(keys)`` blocks until those are done
  (so the caller never compiles the same program a second time at once); ``close()``
  waits for all and stops the threads.
  """

  def __init__(self, threads: Optional[int] = None):
    self._pool = concurrent.futures.ThreadPoolExecutor(
        max(1, threads or os.cpu_count() or 1), thread_name_prefix='ptq_jax_compile')
    self._futures: Dict[Hashable, concurrent.futures.Future] = {}
    self._lock = threading.Lock()
    self._failed = self._cancelled = False

  def submit(self, key: Hashable, fn: Callable, *args: Any) -> None:
    with self._lock:
      if key not in self._futures:
        self._futures[key] = self._pool.submit(lambda: fn.lower(*args).compile())

  def wait(self, keys=None) -> None:
    with self._lock:
      futures = list(self._futures.values() if keys is None
                     else (self._futures[k] for k in keys if k in self._futures))
    for future in futures:
      if future.cancelled():
        continue
      error = future.exception()
      if error is not None and not self._failed:
        self._failed = True
        warnings.warn(f'Ahead-of-time compilation failed ({type(error).__name__}: {error}); '
                      'the programs compile when first called instead.')

  def cancel(self) -> None:
    """Drops the compilations not yet started (on an error: do not wait for them)."""
    self._cancelled = True
    self._pool.shutdown(wait=False, cancel_futures=True)

  def close(self) -> None:
    if not self._cancelled:
      self.wait()
    self._pool.shutdown(wait=not self._cancelled)
