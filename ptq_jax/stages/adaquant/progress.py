"""Resumable AdaQuant: each finished unit (a layer, a shared layer or a block) saved as
it ends, so a long reconstruction that is killed goes on from its last finished unit.

With ``AdaQuantRuntime(resume_dir=...)`` a run keeps one checksummed file in that
directory, named by a digest of everything that decides its result (mode, the
hyper-parameters, the PRNG key, the calibration images, the starting state, the
model's variables and its traced program) and the process index. A run that finds its file
restores the units in it and optimises only the others: each unit's key and inputs
are those of an unbroken run (the sequential inputs are recomputed from the restored
prefix), so the result is the same. A finished run's file stays, so running it again
costs only the forward passes; delete the directory to reclaim the space.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from ptq_jax import checkpoint as ckpt
from ptq_jax.io import clean_stale_temps
from ptq_jax.stages.adaquant.config import AdaQuantConfig
from ptq_jax.stages.adaquant.report import UnitReport
from ptq_jax.stages.prepare import Prepared
from ptq_jax.stages.sensitivity import program_text

log = logging.getLogger(__name__)
KIND = 'adaquant_progress'
VERSION = 1
FIX = 'delete it to start this reconstruction again'


def _key_bytes(key: jax.Array) -> bytes:
  data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
  return np.asarray(data).tobytes()


def _hash_tree(h: Any, tree: Any) -> None:
  leaves, treedef = jax.tree.flatten(tree)
  h.update(str(treedef).encode())
  for leaf in leaves:
    a = np.asarray(leaf)
    h.update(f'{a.dtype}{a.shape}'.encode())
    h.update(np.ascontiguousarray(a).tobytes())


def progress_digest(prepared: Prepared, qstate: Mapping[str, Any], mode: str,
                    config: AdaQuantConfig, key: jax.Array) -> str:
  """A digest of everything that decides a reconstruction's result."""
  h = hashlib.sha256(f'{KIND}/{VERSION}|{mode}|{config!r}'.encode())
  h.update(_key_bytes(key))
  h.update(np.ascontiguousarray(prepared.images).tobytes())
  for path in sorted(qstate):
    h.update(path.encode())
    _hash_tree(h, qstate[path])
  _hash_tree(h, prepared.variables)
  # The model's computation (changing its code changes this even with the same weights).
  h.update(program_text(prepared.model, prepared.variables, prepared.images[:1]).encode())
  return h.hexdigest()[:24]


def _report_to_json(report: UnitReport) -> Dict[str, Any]:
  """The report's fields, non-finite floats as strings (the metadata is strict JSON)."""
  return {k: (repr(v) if isinstance(v, float) and not math.isfinite(v) else v)
          for k, v in report.to_dict().items()}


def _report_from_json(fields: Mapping[str, Any]) -> UnitReport:
  names = {f.name: f for f in dataclasses.fields(UnitReport)}
  out = {}
  for k, v in fields.items():
    if k not in names:
      raise ValueError(f'unknown report field {k!r}')
    out[k] = float(v) if isinstance(v, str) and v in ('nan', 'inf', '-inf') else v
  return UnitReport(**out)


class Progress:
  """The finished units of one reconstruction, and the file they are saved in."""

  def __init__(self, path: str, qstate: Mapping[str, Any]):
    self.path, self.qstate = path, qstate
    self.units: Dict[str, Tuple[Dict[str, Any], UnitReport]] = {}

  @classmethod
  def open(cls, directory: Optional[str], prepared: Prepared, qstate: Mapping[str, Any],
           mode: str, config: AdaQuantConfig, key: jax.Array) -> Optional['Progress']:
    """The run's progress, restored from its file if there is one; None without a
    directory. A damaged or foreign file is a CheckpointError naming the fix."""
    if directory is None:
      return None
    directory = os.path.expanduser(directory)   # (checked by AdaQuantRuntime)
    clean_stale_temps(directory)
    digest = progress_digest(prepared, qstate, mode, config, key)
    progress = cls(os.path.join(directory, f'adaquant-{digest}-p{jax.process_index()}.msgpack'),
                   qstate)
    if os.path.isfile(progress.path):
      progress._load()
      log.info('AdaQuant resumes from %s: %d unit(s) finished by an earlier run.',
               progress.path, len(progress.units))
    return progress

  def _load(self) -> None:
    tree, meta = ckpt.load_checkpoint(self.path, fix=FIX)
    if meta.get('kind') != KIND or not isinstance(meta.get('units'), list):
      raise ckpt.CheckpointError(f'{self.path} is not an AdaQuant progress file; {FIX}.')
    for i, unit in enumerate(meta['units']):
      try:
        name, paths, report = unit['name'], unit['paths'], _report_from_json(unit['report'])
        states = {p: self._restored(p, tree[f'u{i}'][str(k)]) for k, p in enumerate(paths)}
      except (KeyError, TypeError, ValueError) as e:
        raise ckpt.CheckpointError(f'{self.path}: unit {i} does not fit this run ({e}); '
                                   f'{FIX}.') from e
      self.units[name] = (states, report)

  def _restored(self, path: str, saved: Mapping[str, Any]) -> Any:
    """``path``'s saved leaves in the structure of its starting state, checked."""
    leaves, treedef = jax.tree.flatten(self.qstate[path])
    if len(saved) != len(leaves):
      raise ValueError(f'{path} has {len(saved)} arrays, its state {len(leaves)}')
    out = []
    for k, leaf in enumerate(leaves):
      a = np.asarray(saved[str(k)])
      if a.shape != np.shape(leaf) or a.dtype != np.asarray(leaf).dtype:
        raise ValueError(f'{path} array {k} is {a.dtype}{a.shape}, its state '
                         f'{np.asarray(leaf).dtype}{np.shape(leaf)}')
      if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
        raise ValueError(f'{path} array {k} holds NaN or Inf')
      out.append(jnp.asarray(a))
    return jax.tree.unflatten(treedef, out)

  def __contains__(self, name: str) -> bool:
    return name in self.units

  def restored(self, name: str) -> Tuple[Dict[str, Any], UnitReport]:
    """A finished unit's states (by layer path) and report."""
    return self.units[name]

  def record(self, name: str, states: Mapping[str, Any], report: UnitReport) -> None:
    """Adds a finished unit and rewrites the file (atomically: a kill leaves the last
    complete one)."""
    self.units[name] = (dict(states), report)
    tree, units = {}, []
    for i, (unit, (unit_states, unit_report)) in enumerate(self.units.items()):
      paths = list(unit_states)
      tree[f'u{i}'] = {str(k): {str(j): np.asarray(leaf)
                                for j, leaf in enumerate(jax.tree.leaves(unit_states[p]))}
                       for k, p in enumerate(paths)}
      units.append({'name': unit, 'paths': paths, 'report': _report_to_json(unit_report)})
    ckpt.save_checkpoint(self.path, tree, {'kind': KIND, 'units': units})
