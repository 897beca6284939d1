"""safetensors files read into numpy (no torch): a header of names, dtypes and offsets,
then raw bytes, so nothing can execute."""

from __future__ import annotations

import os
from typing import Dict

import numpy as np


def read_safetensors(path: str | os.PathLike) -> Dict[str, np.ndarray]:
  """The tensors of a ``.safetensors`` file as ``{name: array}``."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'No safetensors file at {path}.')
  try:
    from safetensors.numpy import load_file
  except ImportError as e:  # pragma: no cover - requirements.txt installs it
    raise ImportError('Reading safetensors needs the safetensors package: '
                      'pip install -r requirements.txt') from e
  try:
    return dict(load_file(path))
  except Exception as e:  # safetensors raises its own error types for corrupt headers
    raise ValueError(f'{path} is not a valid safetensors file: {e}') from e
