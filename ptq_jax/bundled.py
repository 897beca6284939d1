"""The trained checkpoints shipped inside the package, with their model cards."""

from __future__ import annotations

import json
import os
from typing import Any, Dict

CHECKPOINT_DIR = os.path.join(os.path.dirname(__file__), 'checkpoints')


def bundled_checkpoints() -> Dict[str, str]:
  """Maps bundled checkpoint names (e.g. 'resnet20_fashion_mnist') to file paths."""
  if not os.path.isdir(CHECKPOINT_DIR):
    return {}
  return {f[:-len('.msgpack')]: os.path.join(CHECKPOINT_DIR, f)
          for f in sorted(os.listdir(CHECKPOINT_DIR)) if f.endswith('.msgpack')}


def model_card(name: str) -> Dict[str, Any]:
  """The JSON model card of a bundled checkpoint."""
  path = os.path.join(CHECKPOINT_DIR, f'{name}.json')
  if not os.path.isfile(path):
    raise KeyError(f'No bundled model card {name!r}; choose one of {sorted(bundled_checkpoints())}.')
  with open(path) as f:
    return json.load(f)


def resolve_checkpoint(name_or_path: str) -> str:
  """A bundled checkpoint name or a file path -> a file path (clear error otherwise)."""
  bundled = bundled_checkpoints()
  if name_or_path in bundled:
    return bundled[name_or_path]
  if os.path.isfile(os.path.expanduser(name_or_path)):
    return os.path.expanduser(name_or_path)
  raise FileNotFoundError(f'Checkpoint {name_or_path!r} is neither a bundled checkpoint '
                          f'({sorted(bundled)}) nor an existing file.')
