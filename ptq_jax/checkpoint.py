"""Checkpoints: a Flax variable tree plus metadata in one msgpack file, written atomically.

The file holds ``{'format', 'version', 'metadata', 'variables'}`` serialised with
``flax.serialization``. ``metadata`` names the registry model and its kwargs, so
``load_model`` can rebuild the module; loading checks the tree against the
model's own structure and shapes, so a checkpoint of another model is refused
with a message that says which leaf differs.
"""

from __future__ import annotations

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
from ptq_jax.models import create_model, get_model_spec

FORMAT = 'ptq_jax.checkpoint'
VERSION = 1


class CheckpointError(ValueError):
  """A checkpoint is missing, corrupt, or does not fit the model it is loaded into."""


def save_checkpoint(path: str, variables: Dict[str, Any],
                    metadata: Optional[Dict[str, Any]] = None) -> None:
  """Saves a variable tree (``{'params', 'batch_stats', ...}``) and JSON-able metadata."""
  host = jax.tree.map(lambda a: a if isinstance(a, str) else np.asarray(a),
                      serialization.to_state_dict(variables))
  payload = {'format': FORMAT, 'version': VERSION,
             'metadata': json.dumps(metadata or {}), 'variables': host}
  atomic_write_bytes(path, serialization.msgpack_serialize(payload))


def load_checkpoint(path: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """Returns ``(variables, metadata)``; raises :class:`CheckpointError` on a bad file."""
  if not os.path.isfile(path):
    raise CheckpointError(f'Checkpoint {path} does not exist. Pass the path of a file written '
                          'by ptq_jax.save_checkpoint (bundled ones are listed by '
                          'ptq_jax.bundled_checkpoints()).')
  with open(path, 'rb') as f:
    data = f.read()
  try:
    payload = serialization.msgpack_restore(data)
  except Exception as e:  # msgpack raises several unrelated types on garbage.
    raise CheckpointError(f'Checkpoint {path} is corrupt or truncated ({type(e).__name__}: {e}).'
                          ' Re-create it with the command in its model card.') from e
  if not isinstance(payload, dict) or payload.get('format') != FORMAT:
    raise CheckpointError(f'{path} is not a ptq_jax checkpoint (no {FORMAT!r} header).')
  if payload.get('version') != VERSION:
    raise CheckpointError(f'{path} has checkpoint version {payload.get("version")}; this '
                          f'ptq_jax reads version {VERSION}.')
  variables = jax.tree.map(lambda a: a if isinstance(a, str) else jnp.asarray(a),
                           payload['variables'])
  return variables, json.loads(payload['metadata'])


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
  try:
    spec = get_model_spec(name)
  except KeyError as e:
    raise CheckpointError(f'{path}: {e.args[0]}') from e
  model = create_model(name, **metadata.get('model_kwargs', {}))
  template = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1,) + spec.input_shape), train=False))
  check_variables_match(template, variables, what=f'checkpoint {path}')
  return model, variables, metadata
