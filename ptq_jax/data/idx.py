"""Reader for the IDX format of (Fashion-)MNIST, with validation of every header."""

from __future__ import annotations

import gzip
import os
import zlib
from typing import Union

import numpy as np

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype('>i2'),
               0x0C: np.dtype('>i4'), 0x0D: np.dtype('>f4'), 0x0E: np.dtype('>f8')}
# The largest data an IDX file may declare (the Fashion-MNIST training images are 47 MB).
MAX_IDX_BYTES = 1 << 30


class IdxFormatError(ValueError):
  """The file is not a valid (optionally gzipped) IDX file."""


def read_idx(path: Union[str, os.PathLike]) -> np.ndarray:
  """Reads an IDX file (``.gz`` or raw) into an array of its declared shape and dtype.

  The header is read first and at most the declared size (itself capped at
  ``MAX_IDX_BYTES``) is read after it, so a small file that inflates without end, or a
  header declaring gigabytes, costs no more memory than a real dataset file."""
  path = os.fspath(path)
  opener = gzip.open if path.endswith('.gz') else open
  try:
    with opener(path, 'rb') as f:
      magic = f.read(4)
      if len(magic) < 4 or magic[0] != 0 or magic[1] != 0 or magic[2] not in _IDX_DTYPES:
        raise IdxFormatError(f'{path} is not an IDX file (bad magic number {magic!r}).')
      dtype, ndim = np.dtype(_IDX_DTYPES[magic[2]]), magic[3]
      dims = f.read(4 * ndim)
      if len(dims) < 4 * ndim:
        raise IdxFormatError(f'{path} is truncated inside its header.')
      shape = tuple(int(d) for d in np.frombuffer(dims, dtype='>u4'))
      expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
      if expected > MAX_IDX_BYTES:
        raise IdxFormatError(f'{path} declares shape {shape} ({expected} bytes), more than the '
                             f'{MAX_IDX_BYTES} bytes an IDX dataset file may hold here.')
      data = f.read(expected + 1)
  except (OSError, EOFError, zlib.error) as e:
    raise IdxFormatError(f'Cannot read IDX file {path}: {e}. Reinstall it '
                         '(apt-get install --reinstall dataset-fashion-mnist).') from e
  if len(data) != expected:
    raise IdxFormatError(f'{path} holds {"more than " if len(data) > expected else ""}'
                         f'{len(data)} bytes of data but its header declares shape {shape} '
                         f'({expected} bytes): the file is corrupt.')
  array = np.frombuffer(data, dtype=dtype).reshape(shape)
  return array.astype(dtype.newbyteorder('='), copy=True)
