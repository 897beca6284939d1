"""What AdaQuant reports for each unit it optimised (a layer, a shared layer, a block)."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional


@dataclasses.dataclass
class UnitReport:
  """One optimised unit: its reconstruction error before and after, and how the guard
  chose the kept state. Errors are over the guard's examples (all calibration inputs,
  or the held-out ones with ``guard_holdout``); ``rel_error_*`` are relative to the
  float target's energy. Read as attributes, or by name like a dict (``r['mse_after']``,
  ``r.get('device', 'host')``) for tables."""

  path: str                        # the layer path, or the block's label
  activation: Optional[str]        # 'relu', 'relu6' or 'identity' after a layer (None: block)
  w_bits: Optional[int]
  a_bits: Optional[int]
  mse_before: float
  mse_after: float
  rel_error_before: float
  rel_error_after: float
  rel_error_last_step: float       # the last state's error (kept or not)
  kept_iteration: int              # the iteration whose state was kept (0: the start)
  guard_acted: bool                # True: an earlier state than the last was kept
  iterations: int
  guard_examples: Optional[int] = None
  seconds: float = 0.0
  mode: Optional[str] = None       # 'parallel' or 'sequential'
  unit: str = 'layer'              # 'layer', 'shared' (called at several sites) or 'block'
  rounding: str = 'free'           # or 'learned'
  hard_fraction: Optional[float] = None   # learned rounding: share of decided variables
  sites: int = 1                   # call sites of a shared layer
  block: Optional[int] = None      # a block's index, its layers and how many it trained
  paths: Optional[List[str]] = None
  layers: Optional[int] = None
  device: Optional[str] = None     # layer-parallel over devices: where it ran
  process: Optional[int] = None    # multi-host: which process optimised it

  def __getitem__(self, name: str) -> Any:
    if name not in _FIELDS:
      raise KeyError(name)
    return getattr(self, name)

  def get(self, name: str, default: Any = None) -> Any:
    """The field, or ``default`` where it is unset (None: not applicable to this unit)."""
    value = getattr(self, name) if name in _FIELDS else None
    return default if value is None else value

  def to_dict(self) -> Dict[str, Any]:
    return dataclasses.asdict(self)


_FIELDS = frozenset(f.name for f in dataclasses.fields(UnitReport))


def guard_outcome(checks, kept_at: int) -> Dict[str, Any]:
  """``kept_iteration`` and ``guard_acted`` from the guard's check steps and the index of
  the kept check (-1: the starting state)."""
  return {'kept_iteration': 0 if kept_at < 0 else checks[kept_at],
          'guard_acted': kept_at != len(checks) - 1}
