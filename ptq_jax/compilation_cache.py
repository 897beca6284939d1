"""JAX's persistent compilation cache, turned on for ptq_jax's command line.

Why: on a GPU most of a cold whole-model AdaQuant run is compilation, and a later run
reads the programs back instead (cold and warm rows: results/resnet50_gpu.md). Every
program AdaQuant runs depends only on a layer's geometry, shapes and bit widths, so
a second model, bit width or calibration size with the same shapes reuses them.

This sets JAX's own configuration (``jax_compilation_cache_dir``); call it once, before
the first compilation, from the program's entry point (``run.py`` does), never from
library code.
"""

from __future__ import annotations

import os
from typing import Optional

import jax

DEFAULT_DIR = os.path.join('~', '.cache', 'ptq_jax', 'xla')


def enable_compilation_cache(directory: Optional[str] = None,
                             min_compile_seconds: float = 0.5) -> str:
  """Stores compiled programs in ``directory`` (default ``~/.cache/ptq_jax/xla``) and
  reads them back in later processes; programs that compiled faster than
  ``min_compile_seconds`` are not stored. Returns the absolute directory."""
  if min_compile_seconds < 0:
    raise ValueError(f'min_compile_seconds must be >= 0, got {min_compile_seconds}.')
  path = os.path.abspath(os.path.expanduser(directory or DEFAULT_DIR))
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise ValueError(f'Cannot create the compilation cache directory {path!r} ({e}); pass '
                     'another directory, or turn the cache off.') from None
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', float(min_compile_seconds))
  return path


def cache_setting(value: str) -> Optional[str]:
  """The directory a ``--compilation_cache`` value asks for: ``'auto'`` = the default
  directory on GPU/TPU and no cache on CPU, ``'off'`` = none, anything else = that
  directory."""
  if value == 'off':
    return None
  if value == 'auto':
    return DEFAULT_DIR if jax.default_backend() != 'cpu' else None
  return value
