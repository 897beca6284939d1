"""Whole splits as portable ``.npz`` files, for machines without TFDS.

A split loaded through TFDS (in TFDS's order, so calibration indices and "the
first N test images" mean the same thing everywhere) is exported once with

    python scripts/export_arrays.py --out=DIR          # fashion_mnist train + test

and read back wherever ``$PTQ_JAX_ARRAYS_DIR`` (or ``load_split(arrays_dir=...)``)
points at ``DIR``: GPU images and cluster nodes that lack TFDS or the Debian
package then see identical data.
"""

from __future__ import annotations

import dataclasses
import io
import os
import zipfile
from typing import Optional

import numpy as np

from ptq_jax.io import atomic_write_bytes

ARRAYS_DIR_ENV = 'PTQ_JAX_ARRAYS_DIR'


class DatasetNotFoundError(FileNotFoundError):
  """The requested data is not on this machine; the message says how to get it."""


@dataclasses.dataclass(frozen=True)
class ArraySplit:
  """One split held in memory: raw uint8 images (N, H, W, C) and int32 labels (N,)."""

  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)


def arrays_path(arrays_dir: str, dataset: str, split: str) -> str:
  """Where the exported ``split`` of ``dataset`` lives in ``arrays_dir``."""
  return os.path.join(arrays_dir, f'{dataset}-{split}.npz')


def save_split(path: str, data: ArraySplit, compressed: bool = True) -> None:
  """Writes ``data`` to ``path`` (``.npz``, compressed unless asked not to: uncompressed
  reads back several times faster), atomically."""
  buffer = io.BytesIO()
  save = np.savez_compressed if compressed else np.savez
  save(buffer, images=np.asarray(data.images, np.uint8),
       labels=np.asarray(data.labels, np.int32))
  atomic_write_bytes(path, buffer.getvalue())


def load_saved_split(arrays_dir: str, dataset: str, split: str) -> ArraySplit:
  """Reads a split written by :func:`save_split`; clear errors for missing or bad files."""
  path = arrays_path(arrays_dir, dataset, split)
  if not os.path.isfile(path):
    raise DatasetNotFoundError(
        f'{path} does not exist (${ARRAYS_DIR_ENV} / arrays_dir={arrays_dir!r}). Export the '
        f'split on a machine with the data: `python scripts/export_arrays.py --dataset={dataset} '
        f'--splits={split} --out={arrays_dir}`, or unset ${ARRAYS_DIR_ENV} to read through TFDS.')
  try:
    with np.load(path) as f:
      images, labels = f['images'], f['labels']
  except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
    raise ValueError(f'{path} is not a split written by ptq_jax.data.arrays ({e}); export it '
                     f'again.') from e
  if images.dtype != np.uint8 or images.ndim != 4 or labels.shape != images.shape[:1]:
    raise ValueError(f'{path} holds images {images.dtype}{images.shape} and labels '
                     f'{labels.shape}; expected uint8 (N, H, W, C) and (N,). Export it again.')
  return ArraySplit(images, labels.astype(np.int32))


def default_arrays_dir() -> Optional[str]:
  """``$PTQ_JAX_ARRAYS_DIR`` if set, else None (read through TFDS)."""
  return os.environ.get(ARRAYS_DIR_ENV) or None
