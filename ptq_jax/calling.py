"""How a model is called for inference, whatever its ``__call__`` signature.

Flax models differ: ``__call__(x, train=False)``, ``__call__(x, deterministic=True)``,
or just ``__call__(x)``. Every inference pass of the library (tracing, calibration,
evaluation, the quantized forward) calls the model through :func:`inference_kwargs`, so
``train=False`` / ``deterministic=True`` is passed only where the model takes it, and a
model whose default is training mode still runs in inference mode.
"""

from __future__ import annotations

import inspect
from typing import Any, Dict


def inference_kwargs(model: Any) -> Dict[str, bool]:
  """``{'train': False}`` and/or ``{'deterministic': True}`` as ``model.__call__`` takes
  them (both for a ``**kwargs`` signature: no), else ``{}``."""
  try:
    parameters = inspect.signature(type(model).__call__).parameters
  except (TypeError, ValueError):   # a builtin or C-level callable: pass nothing
    return {}
  kwargs = {}
  if 'train' in parameters:
    kwargs['train'] = False
  if 'deterministic' in parameters:
    kwargs['deterministic'] = True
  return kwargs
