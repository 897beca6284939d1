"""Checkpoints: a Flax variable tree plus metadata in one msgpack file, written
atomically and verified on load.

The file holds ``{'format', 'version', 'sha256', 'body'}``; ``body`` is the
``flax.serialization`` msgpack of ``{'metadata', 'variables'}`` and ``sha256`` its
digest, so a flipped bit or a truncated copy is refused instead of loaded.
``metadata`` names the registry model and its kwargs, so ``load_model`` can rebuild
the module; loading checks the tree against the model's own structure, shapes and
dtypes and checks the values (finite, BatchNorm variances >= 0), so a checkpoint of
another model or a damaged one is refused with a message naming the leaf.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization
from flax.traverse_util import flatten_dict

from ptq_jax.io import atomic_write_bytes
from ptq_jax.models import create_model, get_model_spec, init_variables

FORMAT = 'ptq_jax.checkpoint'
VERSION = 2
# What to do about a bad file, by what the file is (the error names the fix).
RECREATE = 're-create it with the command in its model card'


class CheckpointError(ValueError):
  """A checkpoint is missing, corrupt, or does not fit the model it is loaded into."""


def _host_tree(variables: Any) -> Any:
  return jax.tree.map(lambda a: a if isinstance(a, str) else np.asarray(a),
                      serialization.to_state_dict(variables))


def save_checkpoint(path: str, variables: Dict[str, Any],
                    metadata: Optional[Dict[str, Any]] = None) -> None:
  """Saves a variable tree (``{'params', 'batch_stats', ...}``) and JSON-able metadata,
  with a SHA-256 of the content that :func:`load_checkpoint` verifies."""
  body = serialization.msgpack_serialize(
      {'metadata': json.dumps(metadata or {}, allow_nan=False), 'variables': _host_tree(variables)})
  payload = {'format': FORMAT, 'version': VERSION, 'sha256': hashlib.sha256(body).hexdigest(),
             'body': body}
  atomic_write_bytes(path, serialization.msgpack_serialize(payload))


def load_checkpoint(path: str, fix: str = RECREATE) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """Returns ``(variables, metadata)`` after verifying the checksum; raises
  :class:`CheckpointError` (whose message ends with ``fix``) on a bad file."""
  if not isinstance(path, (str, os.PathLike)):
    raise TypeError(f'path must be a file path, got {path!r} ({type(path).__name__}).')
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise CheckpointError(f'Checkpoint {path} does not exist. Pass the path of a file written '
                          'by ptq_jax (bundled ones are listed by ptq_jax.bundled_checkpoints()).')
  with open(path, 'rb') as f:
    data = f.read()
  payload = _restore(data, path, fix)
  if not isinstance(payload, dict) or payload.get('format') != FORMAT:
    raise CheckpointError(f'{path} is not a ptq_jax checkpoint (no {FORMAT!r} header).')
  version = payload.get('version')
  if version == 1:
    raise CheckpointError(f'{path} was written by an older ptq_jax (checkpoint version 1, no '
                          'checksum); rewrite it once with ptq_jax.checkpoint.upgrade_checkpoint'
                          f'({path!r}) if you trust it, or {fix}.')
  if version != VERSION:
    raise CheckpointError(f'{path} has checkpoint version {version!r}; this ptq_jax reads '
                          f'version {VERSION}.')
  body = payload.get('body')
  if not isinstance(body, bytes) or payload.get('sha256') != hashlib.sha256(body).hexdigest():
    raise CheckpointError(f'{path} fails its checksum: the file was damaged or edited after '
                          f'it was written; {fix}.')
  return _unpack(_restore(body, path, fix), path, fix)


def _restore(data: bytes, path: str, fix: str) -> Any:
  try:
    return serialization.msgpack_restore(data)
  except Exception as e:  # msgpack raises several unrelated types on garbage.
    raise CheckpointError(f'Checkpoint {path} is corrupt or truncated ({type(e).__name__}: '
                          f'{str(e)[:120]}); {fix}.') from e


def _unpack(body: Any, path: str, fix: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """The variables (numeric arrays) and the metadata (a JSON object) of a body."""
  try:
    metadata = json.loads(body['metadata'])
    variables = body['variables']
  except (TypeError, KeyError, ValueError) as e:
    raise CheckpointError(f'{path} has malformed contents ({type(e).__name__}: {e}); '
                          f'{fix}.') from e
  if not isinstance(metadata, dict) or not isinstance(variables, dict):
    raise CheckpointError(f'{path} has malformed contents (metadata or variables not a '
                          f'mapping); {fix}.')
  for key, leaf in flatten_dict(variables).items():
    if not (isinstance(leaf, str)
            or isinstance(leaf, (np.ndarray, np.generic)) and leaf.dtype.kind in 'biuf'):
      raise CheckpointError(f'{path}: {"/".join(map(str, key))} is not a numeric array '
                            f'({type(leaf).__name__}); {fix}.')
  return jax.tree.map(lambda a: a if isinstance(a, str) else jnp.asarray(a), variables), metadata


def upgrade_checkpoint(path: str, output: Optional[str] = None) -> None:
  """Rewrites a version-1 checkpoint (no checksum) of a source you trust as version 2."""
  with open(path, 'rb') as f:
    payload = _restore(f.read(), path, RECREATE)
  if not isinstance(payload, dict) or payload.get('format') != FORMAT or payload.get(
      'version') != 1:
    raise CheckpointError(f'{path} is not a version-1 ptq_jax checkpoint.')
  variables, metadata = _unpack(payload, path, RECREATE)
  check_values(variables, path)
  save_checkpoint(output or path, variables, metadata)


def check_values(variables: Any, path: str, fix: str = RECREATE) -> None:
  """Raises :class:`CheckpointError` unless every leaf is a finite float array and every
  BatchNorm variance (a ``var`` leaf) is >= 0."""
  for key, leaf in flatten_dict(serialization.to_state_dict(variables)).items():
    name = '/'.join(map(str, key))
    leaf = np.asarray(leaf)
    if not np.issubdtype(leaf.dtype, np.floating):
      raise CheckpointError(f'{path}: {name} has dtype {leaf.dtype}, expected a float array; '
                            f'{fix}.')
    if not np.all(np.isfinite(leaf)):
      raise CheckpointError(f'{path}: {name} holds NaN or infinite values; {fix}.')
    if key[-1] == 'var' and np.any(leaf < 0):
      raise CheckpointError(f'{path}: {name} is a BatchNorm variance with negative entries; '
                            f'{fix}.')


def check_variables_match(expected: Any, actual: Any, what: str = 'checkpoint') -> None:
  """Raises :class:`CheckpointError` naming the first leaf whose path or shape differs."""
  exp = {'/'.join(k): v for k, v in flatten_dict(serialization.to_state_dict(expected)).items()}
  act = {'/'.join(k): v for k, v in flatten_dict(serialization.to_state_dict(actual)).items()}
  missing, extra = sorted(set(exp) - set(act)), sorted(set(act) - set(exp))
  if missing or extra:
    raise CheckpointError(
        f'The {what} does not fit the model: missing {missing[:5]}{"..." if len(missing) > 5 else ""}'
        f', unexpected {extra[:5]}{"..." if len(extra) > 5 else ""}. Was it saved from '
        'another model or configuration?')
  for key in exp:
    if tuple(np.shape(exp[key])) != tuple(np.shape(act[key])):
      raise CheckpointError(f'The {what} does not fit the model: {key} has shape '
                            f'{np.shape(act[key])}, the model expects {np.shape(exp[key])}.')


def load_model(path: str) -> Tuple[nn.Module, Dict[str, Any], Dict[str, Any]]:
  """Rebuilds the registry model named in a checkpoint and returns (model, variables, metadata)."""
  variables, metadata = load_checkpoint(path)
  name = metadata.get('model')
  if name is None:
    raise CheckpointError(f'{path} does not name its model (metadata key "model"); build the '
                          'module yourself and use load_checkpoint + check_variables_match.')
  kwargs = metadata.get('model_kwargs', {})
  if not isinstance(name, str) or not isinstance(kwargs, dict):
    raise CheckpointError(f'{path}: metadata "model" must be a name and "model_kwargs" a '
                          f'mapping, got {name!r} and {kwargs!r}; {RECREATE}.')
  try:
    get_model_spec(name)
  except KeyError as e:
    raise CheckpointError(f'{path}: {e.args[0]}') from e
  try:
    model = create_model(name, **kwargs)
    template = jax.eval_shape(lambda: init_variables(name, jax.random.key(0), **kwargs))
  except (TypeError, ValueError) as e:
    raise CheckpointError(f'{path}: model {name!r} cannot be built with model_kwargs '
                          f'{kwargs!r} ({type(e).__name__}: {str(e)[:160]}); {RECREATE}.') from e
  check_variables_match(template, variables, what=f'checkpoint {path}')
  check_values(variables, path)
  return model, variables, metadata
