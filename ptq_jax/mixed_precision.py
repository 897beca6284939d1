"""Mixed precision end to end: per-option states, sensitivity table, IP, mixed model.

    mp = ptq_jax.mixed_precision(model, variables, calib, method='adaquant')
    qm, allocation = mp.quantize(size_pct=13)      # solved in well under a second
    qm, allocation = mp.quantize(bops_pct=2, size_pct=16)

Each option's state is computed once for every layer (baseline ranges for the light
pipeline, parallel AdaQuant for the advanced one). With ``cache_dir`` the states and
the table are cached on disk in one checksummed file, keyed by the model's traced
program, the weights, calibration images, options and settings, so a later run with a
new budget costs only the integer program; a cache file is verified before it is used.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import jax
import numpy as np

from ptq_jax import checkpoint as ckpt
from ptq_jax.calling import inference_kwargs
from ptq_jax.quant.interceptor import LayerQuant
from ptq_jax.quant.quantizer import Option, option_name, parse_option
from ptq_jax.quantize import quantized_model
from ptq_jax.float_ops import UnsupportedLayerError
from ptq_jax.io import clean_stale_temps
from ptq_jax.quantized_model import QuantizedModel, checked_layer, layer_to_tree
from ptq_jax.stages import allocation as alloc
from ptq_jax.stages.adaquant import AdaQuantConfig, AdaQuantRuntime, run_adaquant
from ptq_jax.stages.prepare import Prepared, prepare
from ptq_jax.stages.ranges import (RangeConfig, as_range_config, assign_bits, calibrate_ranges,
                                   range_options)
from ptq_jax.validate import check_key
from ptq_jax.stages.sensitivity import (DEFAULT_OPTIONS, SensitivityTable, cache_key,
                                        program_text, sensitivity_table)

OPTION_METHODS = ('ptq', 'adaquant')


@dataclasses.dataclass
class MixedPrecision:
  """Per-option quantization states of every layer and their sensitivity table."""

  prepared: Prepared                          # the traced, folded model and its images
  option_states: Dict[Option, Dict[str, LayerQuant]]
  table: SensitivityTable
  method: str
  timings: Dict[str, float]
  from_cache: bool = False                    # states and table read from cache_dir
  # Per-layer AdaQuant reports of each option, when computed in this process (not cached).
  option_reports: Dict[Option, list] = dataclasses.field(default_factory=dict)
  range_method: RangeConfig = RangeConfig()

  def solve(self, size_pct: Optional[float] = None, bops_pct: Optional[float] = None,
            size_bits: Optional[float] = None, bops: Optional[float] = None,
            loss: Optional[float] = None, objective: str = 'loss') -> alloc.Allocation:
    """The integer program for these budgets (percentages are of the FP32 model)."""
    pct = alloc.budgets_from_pct(self.table, size_pct, bops_pct)
    return alloc.allocate(self.table, size_bits=size_bits if size_bits is not None
                          else pct['size_bits'], bops=bops if bops is not None else pct['bops'],
                          loss=loss, objective=objective)

  def uniform(self, option: Any, first_last: Any = None) -> alloc.Allocation:
    """Every layer at ``option`` (a reference point); with ``first_last`` (e.g. 'W8A8')
    the first and last layer at that option instead, the usual fixed-bit policy."""
    picks = [self._option_index(option)] * len(self.table.paths)
    if first_last is not None and picks:
      picks[0] = picks[-1] = self._option_index(first_last)
    return alloc.allocation_of(self.table, picks)

  def layer_reports(self, allocation: alloc.Allocation) -> list:
    """Each layer's AdaQuant report at its chosen option (empty when the states came
    from the cache or from calibrated ranges)."""
    by_layer = {(r['path'], option): r for option, reports in self.option_reports.items()
                for r in reports}
    picked = [by_layer.get((p, allocation.choice[p])) for p in self.table.paths]
    return [] if None in picked else picked

  def _option_index(self, option: Any) -> int:
    option = parse_option(option)
    if option not in self.table.options:
      raise ValueError(f'{option_name(option)} is not among the computed options '
                       f'{[option_name(o) for o in self.table.options]}.')
    return self.table.options.index(option)

  def state(self, allocation: alloc.Allocation) -> Dict[str, LayerQuant]:
    """Each layer's state from its chosen option."""
    return {p: self.option_states[allocation.choice[p]][p] for p in self.table.paths}

  def options(self, allocation: alloc.Allocation) -> Dict[str, Any]:
    """The options a mixed model of ``allocation`` records."""
    return {'w_bits': None, 'a_bits': None, **range_options(self.range_method),
            'first_last_bits': None, 'overrides': allocation.overrides(),
            'calib_size': len(self.prepared.images),
            'method': 'mixed_precision', 'option_method': self.method,
            'allocation': allocation.counts(), 'budgets': allocation.budgets}

  def build(self, allocation: alloc.Allocation) -> QuantizedModel:
    """The mixed model: each layer's state from its chosen option."""
    return quantized_model(self.prepared, self.state(allocation), self.options(allocation),
                           self.timings)

  def quantize(self, **budgets) -> Tuple[QuantizedModel, alloc.Allocation]:
    """``solve(**budgets)`` then ``build``."""
    allocation = self.solve(**budgets)
    return self.build(allocation), allocation


def mixed_precision(model: Any, variables: Optional[Mapping[str, Any]] = None, calib: Any = None, *,
                    model_name: str = 'model', **kwargs: Any) -> MixedPrecision:
  """Computes every option's state and the sensitivity table (or loads it from cache)
  for ``model`` on the calibration images ``calib``; see :func:`mixed_precision_of`
  for the options."""
  return mixed_precision_of(prepare(model, variables, calib, model_name=model_name), **kwargs)


def mixed_precision_of(prepared: Prepared, *,
                       options: Sequence[Any] = DEFAULT_OPTIONS, method: str = 'ptq',
                       range_method: Union[str, RangeConfig] = 'minmax',
                       adaquant: Optional[AdaQuantConfig] = None,
                       labels: Optional[np.ndarray] = None, key: Optional[jax.Array] = None,
                       cache_dir: Optional[str] = None,
                       batch_size: int = 250, progress: bool = True,
                       runtime: Optional[AdaQuantRuntime] = None) -> MixedPrecision:
  """Every option's state and the sensitivity table of a prepared model (or both
  from the cache).

  Args:
    options: (w_bits, a_bits) pairs, or names such as 'W4A4'.
    method: 'ptq' (calibrated ranges: the light pipeline) or 'adaquant' (parallel
      AdaQuant per option: the advanced pipeline).
    labels: calibration labels, only to use the cross-entropy loss instead of the
      label-free KL divergence from the FP outputs.
    cache_dir: where to keep the states and the table (keyed by weights, images,
      options and settings).
  """
  check_key(key)
  if prepared.float_ops:
    raise UnsupportedLayerError(
        f'Mixed precision cannot yet budget operations kept in float32 '
        f'({", ".join(op.path or "<top level>" for op in prepared.float_ops[:5])}): its '
        'size and BOPs budgets cover the quantized layers only. Quantize at fixed bit widths '
        "(ptq_jax.quantize(..., unsupported='keep_float')) instead.")
  if method not in OPTION_METHODS:
    raise ValueError(f'method={method!r} is not one of {OPTION_METHODS}.')
  options = tuple(dict.fromkeys(parse_option(o) for o in options))
  if not options:
    raise ValueError('Give at least one bit option, e.g. options=("W8A8", "W4A4").')
  range_config = as_range_config(range_method)
  images, model, variables = prepared.images, prepared.model, prepared.variables
  model_name = prepared.model_name or 'model'
  if labels is not None:
    labels = np.asarray(labels)
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(f'labels must be {len(images)} integer class indices (one per '
                       f'calibration image), got {labels.dtype} of shape {labels.shape}.')
    if labels.min() < 0:
      raise ValueError(f'labels must be class indices >= 0, got {int(labels.min())}.')
    classes = jax.eval_shape(
        lambda x: model.apply(variables, x, **inference_kwargs(model)), images[:1]).shape[-1]
    if labels.max() >= classes:   # (checked abstractly, before any state is computed)
      raise ValueError(f'labels hold class {int(labels.max())}, but the model has {classes} '
                       'outputs: pass class indices below that.')
  adaquant = adaquant or AdaQuantConfig()
  timings: Dict[str, float] = {}
  extra = {'ranges': dataclasses.asdict(range_config), 'loss': 'kl' if labels is None else 'ce',
           'labels': None if labels is None else np.asarray(labels).tolist(),
           'adaquant': dataclasses.asdict(adaquant) if method == 'adaquant' else None,
           'key': None if key is None else np.asarray(jax.random.key_data(key)).tolist()}
  digest = (cache_key(model_name, variables, images, options, method, extra,
                       program=program_text(model, variables, images[:1]))
            if cache_dir else None)
  cached = _load_cache(cache_dir, digest, prepared, options) if cache_dir else None
  start = time.time()
  hit = cached is not None
  reports = {}   # per option, AdaQuant's layer reports (only when computed here)
  table = None
  if hit:
    states, table = cached
  else:
    states = {}
    for option in options:
      # Every layer at this option, first and last included: any mix is then valid.
      bits = assign_bits(prepared.layers, option[0], option[1], None, None)
      state = calibrate_ranges(prepared, bits, range_config)
      if method == 'adaquant':
        state, reports[option] = run_adaquant(
            prepared.model, prepared.variables, prepared.layers, state, images, 'parallel',
            adaquant, key, progress, None, runtime or AdaQuantRuntime())
      states[option] = state
      if progress:
        print(f'  {option_name(option)} states ready ({time.time() - start:.0f}s)', flush=True)
  timings['option_states_seconds'] = time.time() - start
  start = time.time()
  if table is None:
    table = sensitivity_table(model, variables, prepared.layers, prepared.float_state, states,
                              images, labels, batch_size=batch_size, progress=progress)
    if cache_dir:
      _save_cache(cache_dir, digest, states, table)
  timings['sensitivity_seconds'] = time.time() - start
  return MixedPrecision(prepared, states, table, method, timings, from_cache=hit,
                        option_reports=reports, range_method=range_config)


def _states_path(cache_dir: str, digest: str) -> str:
  return os.path.join(cache_dir, f'mixed-{digest}.msgpack')


def _save_cache(cache_dir: str, digest: str, states: Mapping[Option, Mapping[str, LayerQuant]],
                table: SensitivityTable) -> None:
  """The option states and the table in one checksummed file: they can never disagree."""
  tree = {option_name(o): {p: layer_to_tree(lq) for p, lq in s.items()}
          for o, s in states.items()}
  ckpt.save_checkpoint(_states_path(cache_dir, digest), tree,
                       {'kind': 'mixed_states', 'table': table.to_json()})


def _load_cache(cache_dir: str, digest: str, prepared: Prepared, options: Sequence[Option]
                ) -> Optional[Tuple[Dict[Option, Dict[str, LayerQuant]], SensitivityTable]]:
  """The cached states and table, or None; a damaged or foreign file is a CheckpointError."""
  clean_stale_temps(cache_dir)   # temporary files of killed writers
  path = _states_path(cache_dir, digest)
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
    states[o] = {p: checked_layer(layer_trees[p], layers[p], o, False, path, fix) for p in layers}
  return states, table
