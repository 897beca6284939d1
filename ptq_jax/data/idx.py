"""Reader for the IDX format of (Fashion-)MNIST, with validation of every header."""

from __future__ import annotations

import gzip
import os
from typing import Union

import numpy as np

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype('>i2'),
               0x0C: np.dtype('>i4'), 0x0D: np.dtype('>f4'), 0x0E: np.dtype('>f8')}


class IdxFormatError(ValueError):
  """The file is not a valid (optionally gzipped) IDX file."""


def read_idx(path: Union[str, os.PathLike]) -> np.ndarray:
  """Reads an IDX file (``.gz`` or raw) into an array of its declared shape and dtype."""
  path = os.fspath(path)
  opener = gzip.open if path.endswith('.gz') else open
  try:
    with opener(path, 'rb') as f:
      data = f.read()
  except (OSError, EOFError) as e:
    raise IdxFormatError(f'Cannot read IDX file {path}: {e}. Reinstall it '
                         '(apt-get install --reinstall dataset-fashion-mnist).') from e
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
    raise IdxFormatError(f'{path} is not an IDX file (bad magic number {data[:4]!r}).')
  dtype = np.dtype(_IDX_DTYPES[data[2]])
  ndim = data[3]
  header = 4 + 4 * ndim
  if len(data) < header:
    raise IdxFormatError(f'{path} is truncated inside its header.')
  shape = tuple(int(d) for d in np.frombuffer(data, dtype='>u4', count=ndim, offset=4))
  expected = int(np.prod(shape)) * dtype.itemsize
  if len(data) - header != expected:
    raise IdxFormatError(f'{path} holds {len(data) - header} bytes of data but its header '
                         f'declares shape {shape} ({expected} bytes): the file is corrupt.')
  array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
  return array.astype(dtype.newbyteorder('='), copy=True)
