"""Spreading the work over JAX devices and hosts.

* Data-parallel passes (evaluation, teacher logits, calibration capture, the
  sensitivity table): each batch is split along its first axis over a 1-D device mesh
  (``jax.sharding``); the jitted computation is partitioned by XLA.
* Layer-parallel AdaQuant (parallel mode: every layer is independent): layers are
  dealt round-robin to the local devices, one host thread per device dispatching that
  device's layers; across hosts, to processes (``jax.process_index()``), and the
  finished states are exchanged with ``multihost_utils.process_allgather``.

Multi-host: call ``jax.distributed.initialize()`` in every process before anything
else (see README.md); each process then optimises its share of the layers and all
processes end with the same state. Results on 1 and N devices agree to float
tolerance: each layer's PRNG key and minibatches do not depend on where it runs.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def local_devices(devices: Optional[Sequence[Any]] = None) -> List[Any]:
  """``devices`` as a list, or every device of this process (``jax.local_devices()``)."""
  found = list(jax.local_devices() if devices is None else devices)
  if not found:
    raise ValueError('devices is empty: pass at least one jax device (or None for all).')
  return found


def batch_sharding(devices: Sequence[Any]) -> NamedSharding:
  """Splits the first axis over ``devices`` (a 1-D mesh named 'data')."""
  return NamedSharding(Mesh(np.asarray(devices), ('data',)), PartitionSpec('data'))


def padded_batches(images: np.ndarray, batch_size: int, devices: Sequence[Any],
                   dtype: Optional[Any] = np.float32) -> Iterator[Tuple[Any, int]]:
  """``(batch, n_valid)`` over ``images`` (cast to ``dtype`` unless None): every batch
  has one size (the last one zero-padded, so a jitted consumer compiles once), a
  multiple of the device count, and on several devices is split over them."""
  n_dev = len(devices)
  size = min(batch_size, len(images))
  size = -(-size // n_dev) * n_dev
  sharding = batch_sharding(devices) if n_dev > 1 else None
  for start in range(0, len(images), size):
    batch = np.asarray(images[start:start + size], dtype)
    n = len(batch)
    if n < size:
      batch = np.concatenate([batch, np.zeros((size - n,) + batch.shape[1:], batch.dtype)])
    yield (jax.device_put(batch, sharding) if sharding is not None else batch), n


def map_over_devices(fn: Callable[[Any, Any], Any], items: Sequence[Any],
                     devices: Sequence[Any]) -> Iterator[Tuple[int, Any]]:
  """Yields ``(i, fn(items[i], device))`` with item ``i`` on ``devices[i % n]``, one
  host thread per device (so the devices compute at the same time), in order."""
  if len(devices) == 1:
    for i, item in enumerate(items):
      yield i, fn(item, devices[0])
    return
  with concurrent.futures.ThreadPoolExecutor(len(devices)) as pool:
    futures = [pool.submit(_on_device, fn, item, devices[i % len(devices)])
               for i, item in enumerate(items)]
    for i, future in enumerate(futures):
      yield i, future.result()


def _on_device(fn, item, device):
  with jax.default_device(device):
    return fn(item, device)


def process_share(n_items: int) -> List[int]:
  """The item indices this process handles (round-robin over ``jax.process_count()``)."""
  return list(range(jax.process_index(), n_items, jax.process_count()))


def allgather_owned(trees: Sequence[Any], owner: Sequence[int]) -> List[Any]:
  """Across processes: item ``i``'s tree as computed by process ``owner[i]``.

  Every process passes a full list (placeholders of the right shapes where it did not
  compute the item); one ``process_allgather`` exchanges them. A no-op on one process.
  """
  if jax.process_count() == 1:
    return list(trees)
  from jax.experimental import multihost_utils
  gathered = multihost_utils.process_allgather(list(trees))
  return [jax.tree.map(lambda leaf, o=o: np.asarray(leaf)[o], tree)
          for tree, o in zip(gathered, owner)]
