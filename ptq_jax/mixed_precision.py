"""Mixed precision: every layer's state at every bit option, their sensitivity table,
and the integer program that mixes them (docs/method.md, "Bit allocation").

    mp = ptq_jax.mixed_precision(model, variables, calib, method='adaquant')
    qm, allocation = mp.quantize(size_pct=13)      # solved in well under a second
    qm, allocation = mp.quantize(bops_pct=2, size_pct=16)

Each option's states come from the same stages as a fixed-bit run (calibrated ranges
for the light pipeline, then parallel AdaQuant for the advanced one), every layer at
that option. With ``cache_dir`` the states and the table are kept on disk
(:mod:`ptq_jax.option_cache`). In a pipeline, :func:`mixed_precision_stage` solves the
budget and :func:`uniform_option_stage` takes the fixed bits from the same states; both
return a :class:`MixedReport`, from which a later run can reuse the states.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import jax
import numpy as np

from ptq_jax.calling import inference_kwargs
from ptq_jax.float_ops import UnsupportedLayerError
from ptq_jax.option_cache import load_option_states, save_option_states
from ptq_jax.quant.interceptor import LayerQuant, QState
from ptq_jax.quant.quantizer import Option, option_name, parse_option
from ptq_jax.quantized_model import QuantizedModel, quantized_model
from ptq_jax.spec import QuantSpec
from ptq_jax.stages import allocation as alloc
from ptq_jax.stages.adaquant import AdaQuantConfig, AdaQuantRuntime, adaquant_stage
from ptq_jax.stages.prepare import Prepared, Stage, prepare, run_stages
from ptq_jax.stages.ranges import ranges_stage
from ptq_jax.stages.sensitivity import (DEFAULT_OPTIONS, SensitivityTable, cache_key,
                                        program_text, sensitivity_table)
from ptq_jax.validate import check_key

OPTION_METHODS = ('ptq', 'adaquant')
log = logging.getLogger(__name__)


@dataclasses.dataclass
class MixedPrecision:
  """Per-option quantization states of every layer and their sensitivity table."""

  prepared: Prepared                          # the traced, folded model and its images
  option_states: Dict[Option, Dict[str, LayerQuant]]
  table: SensitivityTable
  method: str                                 # how each option's states were made
  timings: Dict[str, float]
  from_cache: bool = False                    # states and table read from cache_dir
  # Per-layer AdaQuant reports of each option, when computed in this process (not cached).
  option_reports: Dict[Option, list] = dataclasses.field(default_factory=dict)
  spec: QuantSpec = QuantSpec()               # the settings the states were made with

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

  def settings(self, allocation: alloc.Allocation) -> Dict[str, Any]:
    """The settings a mixed model of ``allocation`` records."""
    return self.spec.settings(len(self.prepared.images), allocation=allocation,
                              option_method=self.method)

  def build(self, allocation: alloc.Allocation) -> QuantizedModel:
    """The mixed model: each layer's state from its chosen option."""
    return quantized_model(self.prepared, self.state(allocation), self.settings(allocation),
                           self.timings)

  def quantize(self, **budgets) -> Tuple[QuantizedModel, alloc.Allocation]:
    """``solve(**budgets)`` then ``build``."""
    allocation = self.solve(**budgets)
    return self.build(allocation), allocation


class MixedReport(NamedTuple):
  """The report of a stage that picks layers' states from the per-option states."""

  mixed: MixedPrecision            # the states and table (reusable by a later run)
  allocation: alloc.Allocation     # what each layer got
  layer_reports: list              # AdaQuant's report of each layer at its pick ([]: none)

  @property
  def table(self) -> SensitivityTable:
    return self.mixed.table


def mixed_precision(model: Any, variables: Optional[Mapping[str, Any]] = None,
                    calib: Any = None, *, options: Sequence[Any] = DEFAULT_OPTIONS,
                    method: str = 'ptq', ranges: Any = 'minmax',
                    adaquant: Optional[AdaQuantConfig] = None,
                    runtime: Optional[AdaQuantRuntime] = None,
                    labels: Optional[np.ndarray] = None, key: Optional[jax.Array] = None,
                    cache_dir: Optional[str] = None, batch_size: int = 250,
                    model_name: str = 'model', progress: bool = True) -> MixedPrecision:
  """Every option's state and the sensitivity table (or both from the cache) for
  ``model`` on the calibration images ``calib``.

  Args:
    options: (w_bits, a_bits) pairs, or names such as 'W4A4'.
    method: 'ptq' (calibrated ranges: the light pipeline) or 'adaquant' (parallel
      AdaQuant per option: the advanced pipeline).
    ranges: a :class:`RangeConfig` or a range method name; adaquant, runtime: as for
      :func:`ptq_jax.quantize`.
    labels: calibration labels, only to use the cross-entropy loss instead of the
      label-free KL divergence from the FP outputs.
    cache_dir: where to keep the states and the table (keyed by weights, images,
      options and settings) and, unless ``runtime`` names another ``resume_dir``,
      AdaQuant's finished layers, so a killed run resumes.
  """
  if method not in OPTION_METHODS:
    raise ValueError(f'method={method!r} is not one of {OPTION_METHODS}.')
  spec = QuantSpec(ranges=ranges, runtime=(runtime or AdaQuantRuntime()).resuming_in(cache_dir),
                   adaquant=(adaquant or AdaQuantConfig()) if method == 'adaquant' else None)
  check_key(key)
  prepared = prepare(model, variables, calib, model_name=model_name, progress=progress)
  return option_states(prepared, spec, options, method, key, cache_dir, labels, batch_size)


def option_states(prepared: Prepared, spec: QuantSpec, options: Sequence[Any] = DEFAULT_OPTIONS,
                  method: str = 'ptq', key: Optional[jax.Array] = None,
                  cache_dir: Optional[str] = None, labels: Optional[np.ndarray] = None,
                  batch_size: int = 250) -> MixedPrecision:
  """Every option's state (``spec``'s ranges, then with ``method='adaquant'`` its
  AdaQuant in parallel mode) and the sensitivity table of a prepared model, or both
  from ``cache_dir``."""
  check_key(key)
  _check_mixable(prepared, method)
  options = tuple(dict.fromkeys(parse_option(o) for o in options))
  if not options:
    raise ValueError('Give at least one bit option, e.g. options=("W8A8", "W4A4").')
  labels = _checked_labels(prepared, labels)
  adaquant = spec.adaquant or AdaQuantConfig()
  digest = _digest(prepared, spec, options, method, adaquant, labels, key) if cache_dir else None
  cached = load_option_states(cache_dir, digest, prepared, options) if cache_dir else None
  start, timings, reports = time.time(), {}, {}
  if cached is not None:
    states, table = cached
  else:
    states = {}
    for option in options:
      states[option], reports[option] = _one_option(prepared, spec, option, method, adaquant,
                                                    key)
      log.info('%s states ready (%.0fs)', option_name(option), time.time() - start)
  timings['option_states_seconds'] = time.time() - start
  start = time.time()
  if cached is None:
    table = sensitivity_table(prepared, states, labels, batch_size=batch_size)
    if cache_dir:
      save_option_states(cache_dir, digest, states, table)
  timings['sensitivity_seconds'] = time.time() - start
  return MixedPrecision(prepared, states, table, method, timings, from_cache=cached is not None,
                        option_reports={o: r for o, r in reports.items() if r},
                        spec=spec.replace(adaquant=adaquant if method == 'adaquant' else None))


def _one_option(prepared: Prepared, spec: QuantSpec, option: Option, method: str,
                adaquant: AdaQuantConfig, key: Optional[jax.Array]) -> Tuple[QState, list]:
  """Every layer at ``option`` (first and last included, so any mix is valid)."""
  stages = [ranges_stage(spec.replace(w_bits=option[0], a_bits=option[1], first_last_bits=None,
                                      overrides=None).bits, spec.ranges)]
  if method == 'adaquant':
    stages.append(adaquant_stage('parallel', adaquant, spec.runtime))
  *_, (_, state, report, _) = run_stages(prepared, stages,
                                         jax.random.key(0) if key is None else key)
  return state, (report or [])


def _check_mixable(prepared: Prepared, method: str) -> None:
  if prepared.float_ops:
    raise UnsupportedLayerError(
        f'Mixed precision cannot yet budget operations kept in float32 '
        f'({", ".join(op.path or "<top level>" for op in prepared.float_ops[:5])}): its '
        'size and BOPs budgets cover the quantized layers only. Quantize at fixed bit widths '
        "(ptq_jax.quantize(..., unsupported='keep_float')) instead.")
  if method not in OPTION_METHODS:
    raise ValueError(f'method={method!r} is not one of {OPTION_METHODS}.')


def _checked_labels(prepared: Prepared, labels: Optional[np.ndarray]) -> Optional[np.ndarray]:
  """``labels`` as class indices, one per calibration image, or a clear error (checked
  abstractly against the model's output count, before any state is computed)."""
  if labels is None:
    return None
  labels, n = np.asarray(labels), len(prepared.images)
  if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f'labels must be {n} integer class indices (one per calibration image), '
                     f'got {labels.dtype} of shape {labels.shape}.')
  if labels.min() < 0:
    raise ValueError(f'labels must be class indices >= 0, got {int(labels.min())}.')
  model, variables = prepared.model, prepared.variables
  classes = jax.eval_shape(lambda x: model.apply(variables, x, **inference_kwargs(model)),
                           prepared.images[:1]).shape[-1]
  if labels.max() >= classes:
    raise ValueError(f'labels hold class {int(labels.max())}, but the model has {classes} '
                     'outputs: pass class indices below that.')
  return labels


def _digest(prepared: Prepared, spec: QuantSpec, options, method: str,
            adaquant: AdaQuantConfig, labels, key) -> str:
  """The cache file's key: the traced program, weights, images, options and settings."""
  extra = {'ranges': dataclasses.asdict(spec.ranges), 'loss': 'kl' if labels is None else 'ce',
           'labels': None if labels is None else labels.tolist(),
           'adaquant': dataclasses.asdict(adaquant) if method == 'adaquant' else None,
           'key': None if key is None else np.asarray(jax.random.key_data(key)).tolist()}
  return cache_key(prepared.model_name or 'model', prepared.variables, prepared.images, options,
                   method, extra, program=program_text(prepared.model, prepared.variables,
                                                       prepared.images[:1]))


def _states_for(prepared: Prepared, spec: QuantSpec, options: Sequence[Option],
                needed: Sequence[Option], method: str, reuse: Optional[MixedPrecision],
                cache_dir: Optional[str], key: jax.Array) -> MixedPrecision:
  """``reuse`` if given (checked to hold ``needed``), else the states of ``options``
  (or of ``needed`` alone, when ``options`` lack them)."""
  if reuse is not None:
    if reuse.method != method or any(o not in reuse.option_states for o in needed):
      pipeline = 'advanced' if method == 'adaquant' else 'light'
      raise ValueError(f'mixed= holds {reuse.method} states for '
                       f'{[option_name(o) for o in reuse.table.options]}; the {pipeline} '
                       f'pipeline needs {method} states for '
                       f'{[option_name(o) for o in needed]}.')
    return reuse
  computed = options if all(o in options for o in needed) else needed
  return option_states(prepared, spec, computed, method, key, cache_dir)


def mixed_precision_stage(spec: QuantSpec, options: Sequence[Any], method: str,
                          size_pct: Optional[float] = None, bops_pct: Optional[float] = None,
                          reuse: Optional[MixedPrecision] = None,
                          cache_dir: Optional[str] = None) -> Stage:
  """The 'mixed_precision' stage: per-option states (``method`` 'ptq' or 'adaquant';
  ``reuse``: a previous run's), then the integer program at the budgets; its report is
  a :class:`MixedReport`."""
  options = [parse_option(o) for o in options]

  def apply(prepared: Prepared, qstate: QState, key: jax.Array):
    del qstate   # every layer's state comes from its option
    mp = _states_for(prepared, spec, options, [], method, reuse, cache_dir, key)
    allocation = mp.solve(size_pct=size_pct, bops_pct=bops_pct)
    return mp.state(allocation), MixedReport(mp, allocation, mp.layer_reports(allocation))
  return Stage('mixed_precision', apply)


def uniform_option_stage(spec: QuantSpec, options: Sequence[Any],
                         reuse: Optional[MixedPrecision] = None,
                         cache_dir: Optional[str] = None) -> Stage:
  """The advanced pipeline's 'adaquant' stage at fixed bits: parallel AdaQuant at
  ``spec``'s bits (the first and last layer at ``first_last_bits``), taken from the
  per-option states, which also cover ``options`` when they include those bits (so a
  later mixed run can reuse them); its report is a :class:`MixedReport`."""
  fixed = [parse_option((spec.w_bits, spec.a_bits))]
  if spec.first_last_bits is not None:
    fixed.append(parse_option((spec.first_last_bits, spec.first_last_bits)))
  options = [parse_option(o) for o in options]

  def apply(prepared: Prepared, qstate: QState, key: jax.Array):
    del qstate
    mp = _states_for(prepared, spec, options, fixed, 'adaquant', reuse, cache_dir, key)
    allocation = mp.uniform(fixed[0], fixed[1] if len(fixed) > 1 else None)
    return mp.state(allocation), MixedReport(mp, allocation, mp.layer_reports(allocation))
  return Stage('adaquant', apply)


def reports_of(report: Any) -> List[Any]:
  """The per-layer (or per-site) reports a stage's report holds ([] if none)."""
  if isinstance(report, MixedReport):
    return list(report.layer_reports)
  return list(report) if isinstance(report, list) else []
