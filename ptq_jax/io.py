"""Atomic file writes: a file is either its old content or its whole new content, never half.

Every output of the library and the command line (checkpoints, caches, results,
figures) is written through here, its location checked first: a temporary file in the same directory, fsync,
then ``os.replace``. A killed writer's temporary file is removed by the next run
(:func:`clean_stale_temps`).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from typing import Any, List

# Temporary files are named '.<name>.tmp<pid>.<random>': a later run can tell a killed
# writer's leftovers (its process is gone) from a live writer's file.
_TEMP = re.compile(r'^\..+\.tmp(\d+)\.[A-Za-z0-9_]+$')


def atomic_write_bytes(path: str, data: bytes) -> None:
  """Writes ``data`` to ``path`` via a temporary file and rename: never half-written.
  A path that cannot be a file is a ValueError naming it (:func:`check_output_file`)."""
  check_output_file(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f'.{os.path.basename(path)}.tmp{os.getpid()}.',
                             dir=directory)
  umask = os.umask(0)
  os.umask(umask)
  try:
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def atomic_write_json(path: str, obj: Any) -> None:
  """Writes ``obj`` as indented JSON, atomically."""
  atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + '\n').encode())


def process_alive(pid: int) -> bool:
  """Whether a process with this id exists (on this machine)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def clean_stale_temps(directory: str) -> List[str]:
  """Removes the temporary files of killed writers in ``directory``; returns their names."""
  removed = []
  if not os.path.isdir(directory):
    return removed
  for name in os.listdir(directory):
    match = _TEMP.match(name)
    if match and not process_alive(int(match.group(1))):
      try:
        os.unlink(os.path.join(directory, name))
        removed.append(name)
      except OSError:
        pass
  return removed


def check_output_dir(path: str, what: str = 'output directory') -> None:
  """Raises ValueError unless ``path`` is (or can be created as) a writable directory.

  Nothing is created: the deepest existing ancestor must be a writable directory."""
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f'{what} {path} is a file, not a directory: pass another path.')
  _check_writable_ancestor(path, path, what)


def check_output_file(path: str, what: str = 'output file') -> None:
  """Raises ValueError unless ``path`` can be written as a file: not a directory, and
  its directory exists or can be created and written (nothing is created)."""
  full = os.path.abspath(os.path.expanduser(path))
  if os.path.isdir(full):
    raise ValueError(f'{what} {path} is a directory: pass a file path inside it, e.g. '
                     f'{os.path.join(path, "quantized.msgpack")}.')
  _check_writable_ancestor(os.path.dirname(full), path, what)


def _check_writable_ancestor(directory: str, path: str, what: str) -> None:
  """The deepest existing ancestor of ``directory`` (itself included) must be a writable
  directory; the error names ``path``."""
  probe = directory
  while not os.path.exists(probe) and os.path.dirname(probe) != probe:
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe):
    raise ValueError(f'{what} {path} lies under {probe}, which is a file: pass another path.')
  if not os.access(probe, os.W_OK | os.X_OK):
    raise ValueError(f'{what} {path} cannot be written ({probe} is not writable): pass a '
                     'writable path.')
