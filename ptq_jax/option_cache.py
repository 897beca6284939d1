"""The mixed-precision cache: every option's per-layer states and their sensitivity
table in one checksummed file, so a later run with a new budget costs only the integer
program. The file's name is a digest of everything that decides its content
(:func:`ptq_jax.stages.sensitivity.cache_key`); a file is verified before it is used.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from ptq_jax import checkpoint as ckpt
from ptq_jax.io import check_output_dir, clean_stale_temps
from ptq_jax.quant.interceptor import LayerQuant
from ptq_jax.quant.quantizer import Option, option_name
from ptq_jax.quantized_model import checked_layer, layer_to_tree
from ptq_jax.stages.sensitivity import SensitivityTable


def states_path(cache_dir: str, digest: str) -> str:
  return os.path.join(cache_dir, f'mixed-{digest}.msgpack')


def save_option_states(cache_dir: str, digest: str, states: Mapping[Option, Mapping[str, LayerQuant]],
                table: SensitivityTable) -> None:
  """The option states and the table in one checksummed file: they can never disagree."""
  tree = {option_name(o): {p: layer_to_tree(lq) for p, lq in s.items()}
          for o, s in states.items()}
  ckpt.save_checkpoint(states_path(cache_dir, digest), tree,
                       {'kind': 'mixed_states', 'table': table.to_json(),
                        'symmetric': list(_symmetry(states))})


def _symmetry(states: Mapping[Option, Mapping[str, LayerQuant]]) -> Tuple[bool, bool]:
  """(weights symmetric, inputs symmetric), as the states' quantizers are."""
  quants = [lq for s in states.values() for lq in s.values()]
  first = lambda qs: next((bool(q.symmetric) for q in qs if q is not None), False)
  return first(lq.w_quant for lq in quants), first(lq.a_quant for lq in quants)


def load_option_states(cache_dir: str, digest: str, prepared: Any, options: Sequence[Option]
                ) -> Optional[Tuple[Dict[Option, Dict[str, LayerQuant]], SensitivityTable]]:
  """The cached states and table, or None; a damaged or foreign file is a CheckpointError."""
  check_output_dir(cache_dir, 'cache_dir')
  clean_stale_temps(cache_dir)   # temporary files of killed writers
  path = states_path(cache_dir, digest)
  if not os.path.isfile(path):
    return None
  fix = 'delete it to recompute'
  tree, meta = ckpt.load_checkpoint(path, fix=fix)
  names = [option_name(o) for o in options]
  if meta.get('kind') != 'mixed_states' or set(tree) != set(names):
    raise ckpt.CheckpointError(f'{path} is not a mixed-precision cache for options {names}; '
                               f'{fix}.')
  try:
    table = SensitivityTable.from_json(meta['table'])
  except (KeyError, TypeError, ValueError) as e:
    raise ckpt.CheckpointError(f'{path} has a malformed sensitivity table ({e}); {fix}.') from e
  layers = {l.path: l for l in prepared.layers}
  if (table.paths != tuple(layers) or table.options != tuple(options)
      or table.delta.shape != (len(layers), len(options))
      or not np.all(np.isfinite(table.delta)) or not np.isfinite(table.base_loss)):
    raise ckpt.CheckpointError(f'{path} holds a sensitivity table that does not fit this model '
                               f'and these options, or non-finite entries; {fix}.')
  states = {}
  for o in options:
    layer_trees = tree[option_name(o)]
    if set(layer_trees) != set(layers):
      raise ckpt.CheckpointError(f'{path}: the {option_name(o)} states do not cover this '
                                 f'model\'s layers; {fix}.')
    symmetric = tuple(bool(b) for b in meta.get('symmetric', (False, False)))
    states[o] = {p: checked_layer(layer_trees[p], layers[p], o, symmetric, path, fix)
                 for p in layers}
  return states, table
