"""A run's outputs as one consistent set: staged, then committed with a manifest.

A job writes every output into a staging directory inside the work dir
(``.staging-<pid>-<random>``). :meth:`RunOutputs.commit` then removes the previous
``manifest.json``, moves each staged file into the work dir and writes a new
``manifest.json`` last, naming the run (id, job, time) and every file with its size
and SHA-256. A run killed at any point leaves either the previous set with its
manifest untouched, or files with no manifest: :func:`verify_outputs` tells which,
and says whether a file was changed or mixed in from another run. Staging
directories and temporary files left by killed runs are removed at the next run's
start (only those whose process is gone).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from typing import Any, Dict, List, Optional

from ptq_jax.io import atomic_write_json, clean_stale_temps, process_alive

MANIFEST = 'manifest.json'
_STAGING = '.staging-'


class OutputsError(ValueError):
  """A work dir's outputs are incomplete or not one run's consistent set."""


def clean_stale_outputs(directory: str) -> List[str]:
  """Removes staging directories and temporary files of runs that were killed; returns
  what was removed."""
  removed = clean_stale_temps(directory)
  if not os.path.isdir(directory):
    return removed
  for name in os.listdir(directory):
    if not name.startswith(_STAGING):
      continue
    pid = name[len(_STAGING):].split('-', 1)[0]
    if pid.isdigit() and not process_alive(int(pid)):
      shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
      removed.append(name)
  return removed


class RunOutputs:
  """The outputs of one run: ``path(name)`` gives where to write ``name`` while the run
  works; ``commit()`` publishes them all with a manifest."""

  def __init__(self, workdir: str, job: str, extra: Optional[Dict[str, Any]] = None):
    self.workdir = os.path.abspath(workdir)
    os.makedirs(self.workdir, exist_ok=True)
    clean_stale_outputs(self.workdir)
    self.run_id = uuid.uuid4().hex[:12]
    self.job, self.extra = job, dict(extra or {})
    self.staging = tempfile.mkdtemp(prefix=f'{_STAGING}{os.getpid()}-', dir=self.workdir)
    self.names: List[str] = []

  def path(self, name: str) -> str:
    """The staged path for output ``name`` (a plain file name in the work dir)."""
    if os.path.basename(name) != name or name in (MANIFEST, '') or name.startswith('.'):
      raise ValueError(f'Output name {name!r} must be a plain file name other than {MANIFEST}.')
    if name not in self.names:
      self.names.append(name)
    return os.path.join(self.staging, name)

  def commit(self) -> Dict[str, Any]:
    """Moves the staged files into the work dir and writes the manifest last."""
    files = {}
    for name in self.names:
      staged = os.path.join(self.staging, name)
      if not os.path.isfile(staged):
        raise OutputsError(f'Output {name} was announced but never written.')
      files[name] = {'bytes': os.path.getsize(staged), 'sha256': file_sha256(staged)}
    manifest_path = os.path.join(self.workdir, MANIFEST)
    previous = _previous_files(manifest_path)
    if os.path.exists(manifest_path):
      os.unlink(manifest_path)   # from here on, the directory says "incomplete"
    for name in previous - set(self.names):   # the last run's outputs this run does not make
      if os.path.isfile(os.path.join(self.workdir, name)):
        os.unlink(os.path.join(self.workdir, name))
    for name in self.names:
      os.replace(os.path.join(self.staging, name), os.path.join(self.workdir, name))
    manifest = {'run_id': self.run_id, 'job': self.job,
                'finished': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
                **self.extra, 'files': files}
    atomic_write_json(manifest_path, manifest)
    shutil.rmtree(self.staging, ignore_errors=True)
    return manifest

  def discard(self) -> None:
    """Drops the staged files (the run failed): the work dir keeps its previous set."""
    shutil.rmtree(self.staging, ignore_errors=True)

  def __enter__(self) -> 'RunOutputs':
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.commit()
    else:
      self.discard()


def _previous_files(manifest_path: str) -> set:
  try:
    with open(manifest_path) as f:
      names = set(json.load(f)['files'])
  except (OSError, ValueError, KeyError, TypeError):
    return set()
  return {n for n in names if isinstance(n, str) and os.path.basename(n) == n
          and n != MANIFEST and not n.startswith('.')}


def file_sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      h.update(block)
  return h.hexdigest()


def verify_outputs(workdir: str) -> Dict[str, Any]:
  """The manifest of ``workdir`` after checking every file it names; raises
  :class:`OutputsError` if the set is incomplete, changed or mixed."""
  manifest_path = os.path.join(workdir, MANIFEST)
  if not os.path.isfile(manifest_path):
    raise OutputsError(f'{workdir} has no {MANIFEST}: its run did not finish (or was killed '
                       'while publishing); run the job again.')
  try:
    with open(manifest_path) as f:
      manifest = json.load(f)
    files = manifest['files']
    items = list(files.items())
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise OutputsError(f'{manifest_path} is malformed ({e}); run the job again.') from e
  for name, entry in items:
    path = os.path.join(workdir, name)
    if not os.path.isfile(path) or file_sha256(path) != entry.get('sha256'):
      raise OutputsError(f'{path} is missing or not the file run {manifest.get("run_id")} wrote '
                         '(changed, or from another run); run the job again.')
  return manifest
