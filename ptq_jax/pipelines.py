"""The paper's pipelines as ordered lists of stages (docs/method.md, "Pipelines").

* ``light``:      calibrated ranges at each option -> dL -> IP -> BN tuning
* ``advanced``:   parallel AdaQuant at each option -> dL -> IP -> BN tuning -> bias tuning
* ``sequential``: fixed bit width: ranges -> sequential AdaQuant -> BN tuning -> bias tuning

``light`` and ``advanced`` without a budget run at the fixed bit widths instead
(``w_bits``/``a_bits``, ``first_last_bits`` for the first and last layer): ranges ->
[parallel AdaQuant ->] BN tuning [-> bias tuning]. Every stage has the signature
``(prepared, qstate, key) -> (qstate, report)`` (:mod:`ptq_jax.stages.prepare`);
:func:`pipeline_stages` lists them and :func:`run_pipeline` runs them, keeping the
model after every stage so a caller can evaluate each stage's contribution. The
per-option states of a light/advanced run (``result.mixed``) can be handed to the
next run, so a fixed-bit and a mixed-precision run share one AdaQuant pass.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import jax
import numpy as np

from ptq_jax.mixed_precision import MixedPrecision, mixed_precision_of
from ptq_jax.quant.interceptor import QState
from ptq_jax.quant.quantizer import option_name, parse_option
from ptq_jax.quantize import quantized_model
from ptq_jax.quantized_model import QuantizedModel
from ptq_jax.stages.adaquant import AdaQuantConfig, AdaQuantRuntime, adaquant
from ptq_jax.stages.allocation import Allocation
from ptq_jax.stages.attention import attention_matmuls
from ptq_jax.stages.bias_tuning import bias_tuning
from ptq_jax.stages.bn_tuning import bn_tuning
from ptq_jax.stages.prepare import Prepared, Stage, prepare, run_stages
from ptq_jax.stages.ranges import (RangeConfig, as_range_config, assign_bits, range_options,
                                   ranges)
from ptq_jax.stages.sensitivity import DEFAULT_OPTIONS, SensitivityTable
from ptq_jax.stages.stage_guard import GuardReport, guarded
from ptq_jax.validate import check_int, check_key

PIPELINES = ('light', 'advanced', 'sequential')
# The stages stage_guard=True may drop: each only refines a quantized state. Stages that
# choose the bits or calibrate new quantizers (ranges, mixed_precision, the attention
# matmuls' stages) always stand: dropping one would leave operations float.
GUARDED_STAGES = ('adaquant', 'bn_tuning', 'bias_tuning')


def parse_run(entry: str) -> Tuple[str, Optional[float]]:
  """'advanced' -> ('advanced', None); 'advanced@13' -> ('advanced', 13.0)."""
  name, _, size = str(entry).partition('@')
  if name not in PIPELINES:
    raise ValueError(f'pipeline run {entry!r}: {name!r} is not one of '
                     f'{PIPELINES} (write e.g. "advanced" or "advanced@13").')
  if not size:
    return name, None
  try:
    size_pct = float(size.rstrip('%'))
  except ValueError:
    raise ValueError(f'pipeline run {entry!r}: the size budget after "@" must be a '
                     'number (% of the FP32 weight size), e.g. "advanced@13".') from None
  if name == 'sequential':
    raise ValueError(f'pipeline run {entry!r}: the sequential pipeline has fixed bit '
                     'widths; budgets belong to light and advanced.')
  return name, size_pct


def run_label(pipeline: str, size_pct: Optional[float], w_bits: int, a_bits: int) -> str:
  """'advanced W4A4' (fixed bits) or 'advanced 13%' (mixed at 13% size)."""
  if size_pct is not None:
    return f'{pipeline} {size_pct:g}%'
  return f'{pipeline} W{w_bits}A{a_bits}'


@dataclasses.dataclass
class StageResult:
  """One stage's output model, wall time and report."""

  name: str
  model: QuantizedModel
  seconds: float
  report: Any = None
  guard: Optional[GuardReport] = None   # with stage_guard=True (its .report is None here)

  @property
  def kept(self) -> bool:
    """False when the stage guard dropped this stage's state (``model`` is then the
    previous stage's)."""
    return self.guard is None or self.guard.kept


@dataclasses.dataclass
class PipelineResult:
  pipeline: str
  stages: List[StageResult]
  allocation: Optional[Allocation] = None
  table: Optional[SensitivityTable] = None
  mixed: Optional[MixedPrecision] = None   # the per-option states a light/advanced run used

  @property
  def model(self) -> QuantizedModel:
    """The final quantized model."""
    return self.stages[-1].model

  def timings(self) -> Dict[str, float]:
    return {f'{s.name}_seconds': s.seconds for s in self.stages}


def pipeline_stages(pipeline: str, result: PipelineResult, *, w_bits: int = 4,
                    a_bits: int = 4, first_last_bits: Optional[int] = 8,
                    size_pct: Optional[float] = None, bops_pct: Optional[float] = None,
                    options: Sequence[Any] = DEFAULT_OPTIONS, range_method: Any = 'minmax',
                    adaquant_config: Optional[AdaQuantConfig] = None,
                    runtime: Optional[AdaQuantRuntime] = None, bias_steps: int = 800,
                    cache_dir: Optional[str] = None, mixed: Optional[MixedPrecision] = None,
                    bn_target: str = 'data', progress: bool = True,
                    quantize_matmuls: bool = False, stage_guard: bool = False) -> List[Stage]:
  """The ordered stages of ``pipeline`` (see :func:`run_pipeline` for the arguments).
  The mixed-precision stages record the allocation, table and per-option states they
  used in ``result``."""
  if pipeline not in PIPELINES:
    raise ValueError(f'pipeline={pipeline!r} is not one of {PIPELINES}.')
  budget = size_pct is not None or bops_pct is not None
  if pipeline == 'sequential' and budget:
    raise ValueError('The sequential pipeline has fixed bit widths (w_bits, a_bits); budgets '
                     'belong to the light and advanced pipelines.')
  check_int(bias_steps, 'bias_steps')
  if not isinstance(stage_guard, bool):
    raise TypeError(f'stage_guard must be True or False, got {stage_guard!r}.')
  method = 'adaquant' if pipeline == 'advanced' else 'ptq'
  fixed = [parse_option((w_bits, a_bits))]
  if first_last_bits is not None:
    fixed.append(parse_option((first_last_bits, first_last_bits)))
  wanted = [parse_option(o) for o in options]

  def states_for(prepared: Prepared, needed, key) -> MixedPrecision:
    """Per-option states: ``mixed`` if given, else computed (all of ``options`` when
    they include ``needed``, so a later mixed run can reuse them)."""
    if mixed is not None:
      if mixed.method != method or any(o not in mixed.option_states for o in needed):
        raise ValueError(f'mixed= holds {mixed.method} states for '
                         f'{[option_name(o) for o in mixed.table.options]}; the {pipeline} '
                         f'pipeline needs {method} states for '
                         f'{[option_name(o) for o in needed]}.')
      result.mixed = mixed
    else:
      computed = wanted if all(o in wanted for o in needed) else needed
      result.mixed = mixed_precision_of(prepared, options=computed, method=method,
                                        range_method=range_method, adaquant=adaquant_config,
                                        key=key, cache_dir=cache_dir, progress=progress,
                                        runtime=runtime)
    return result.mixed

  def mixed_stage(prepared: Prepared, qstate: QState, key: jax.Array):
    mp = states_for(prepared, [], key)
    result.allocation = mp.solve(size_pct=size_pct, bops_pct=bops_pct)
    result.table = mp.table
    return mp.state(result.allocation), result.allocation

  def option_adaquant_stage(prepared: Prepared, qstate: QState, key: jax.Array):
    """Parallel AdaQuant at the fixed bits, taken from the per-option states."""
    mp = states_for(prepared, fixed, key)
    allocation = mp.uniform(fixed[0], fixed[1] if len(fixed) > 1 else None)
    return mp.state(allocation), mp.layer_reports(allocation)

  fixed_ranges = _fixed_ranges(w_bits, a_bits, first_last_bits, as_range_config(range_method))
  heads = {  # what precedes BN tuning at fixed bit widths
      'light': [fixed_ranges],
      'advanced': [fixed_ranges, Stage('adaquant', option_adaquant_stage)],
      'sequential': [fixed_ranges, adaquant('sequential', adaquant_config, runtime, progress)]}
  head = [Stage('mixed_precision', mixed_stage)] if budget else heads[pipeline]
  if quantize_matmuls:
    # Calibrated after the layers' ranges (the operands their quantized layers produce),
    # and again, then optimised, after AdaQuant (which returns the layers' states only).
    config = as_range_config(range_method)
    optimised = adaquant_config or AdaQuantConfig()
    with_matmuls = []
    for stage in head:
      with_matmuls.append(stage)
      if stage.name in ('ranges', 'mixed_precision') and (pipeline == 'light'
                                                          or stage.name == 'ranges'):
        with_matmuls.append(attention_matmuls(a_bits, config, None, 'matmul_ranges'))
      elif stage.name in ('adaquant', 'mixed_precision'):
        with_matmuls.append(attention_matmuls(a_bits, config, optimised, 'matmul_adaquant'))
    head = with_matmuls
  tail = [bn_tuning(bn_target, progress=progress)]
  if pipeline != 'light' and bias_steps:
    tail.append(bias_tuning(bias_steps, progress=progress))
  stages = head + tail
  if stage_guard:   # never around a stage that quantizes more (the matmuls' ranges)
    stages = [guarded(s) if s.name in GUARDED_STAGES else s for s in stages]
  return stages


def _fixed_ranges(w_bits, a_bits, first_last_bits, config: RangeConfig) -> Stage:
  """The ranges stage at fixed bit widths (the bits are assigned once the layers are
  known)."""
  def apply(prepared: Prepared, qstate: QState, key: jax.Array):
    bits = assign_bits(prepared.layers, w_bits, a_bits, first_last_bits, None)
    return ranges(bits, config).apply(prepared, qstate, key)
  return Stage('ranges', apply)


def run_pipeline(model: Any, variables: Optional[Mapping[str, Any]] = None, calib: Any = None,
                 pipeline: str = 'advanced', *, w_bits: int = 4, a_bits: int = 4,
                 first_last_bits: Optional[int] = 8, size_pct: Optional[float] = None,
                 bops_pct: Optional[float] = None, options: Sequence[Any] = DEFAULT_OPTIONS,
                 range_method: Union[str, RangeConfig] = 'minmax',
                 adaquant: Optional[AdaQuantConfig] = None,
                 runtime: Optional[AdaQuantRuntime] = None,
                 bias_steps: int = 800, key: Optional[jax.Array] = None,
                 cache_dir: Optional[str] = None, model_name: str = 'model',
                 mixed: Optional[MixedPrecision] = None, bn_target: str = 'data',
                 unsupported: str = 'error', quantize_matmuls: bool = False,
                 stage_guard: bool = False, progress: bool = True) -> PipelineResult:
  """Runs one pipeline; see the module docstring.

  Args:
    pipeline: 'light' or 'advanced' (mixed precision when ``size_pct`` and/or
      ``bops_pct``, percentages of the FP32 model, are given; fixed bit widths
      otherwise) or 'sequential' (fixed bit widths).
    w_bits, a_bits, first_last_bits: the fixed bit widths (``first_last_bits`` for the
      first and last layer; None: like the others).
    options: the bit options the integer program mixes (a fixed-bit advanced run
      computes these too when they include its bit widths, so ``result.mixed`` can
      serve a later mixed run; otherwise only the ones it needs).
    range_method: 'minmax', 'mse', 'percentile', or a RangeConfig (smoothing, say).
    adaquant, runtime: AdaQuant's hyper-parameters and runtime settings.
    bias_steps: KD bias-tuning steps (minibatch 50, SGD lr 0.1, the reference's).
    mixed: a previous run's ``result.mixed`` (same model, images and method) to reuse
      its per-option states and sensitivity table instead of recomputing them.
    bn_target: BN tuning's 'data' (re-estimate the statistics on the calibration
      images, the paper's) or 'fp' (match the FP network's statistics on them: for
      calibration data unlike the training data; see ptq_jax.stages.bn_tuning).
    unsupported: 'error' or 'keep_float' for operations ptq_jax cannot quantize
      (see :func:`ptq_jax.quantize`; fixed-bit pipelines only).
    quantize_matmuls: also quantize the attention matmuls at ``a_bits`` (a stage after
      the layers' bits are set; optimised in the advanced and sequential pipelines).
    stage_guard: keep AdaQuant, BN tuning and bias tuning (``GUARDED_STAGES``) only
      where they lower the KL divergence of the network's outputs to FP32's on the
      calibration images, otherwise go on from the state before the stage
      (:mod:`ptq_jax.stages.stage_guard`; each stage's ``guard`` says what it measured).
  """
  check_key(key)
  result = PipelineResult(pipeline, [])
  stages = pipeline_stages(pipeline, result, w_bits=w_bits, a_bits=a_bits,
                           first_last_bits=first_last_bits, size_pct=size_pct,
                           bops_pct=bops_pct, options=options, range_method=range_method,
                           adaquant_config=adaquant, runtime=runtime, bias_steps=bias_steps,
                           cache_dir=cache_dir, mixed=mixed, bn_target=bn_target,
                           progress=progress, quantize_matmuls=quantize_matmuls,
                           stage_guard=stage_guard)
  prepared = prepare(model, variables, calib, model_name=model_name, unsupported=unsupported,
                     quantize_matmuls=quantize_matmuls)
  if mixed is not None and not np.array_equal(mixed.prepared.images, prepared.images):
    raise ValueError('mixed= was computed on other calibration images than this run\'s; pass '
                     'the same images (or leave mixed=None to compute the states).')
  if adaquant is not None and pipeline != 'light':
    adaquant.holdout_size(len(prepared.images))   # (a bad holdout fails before the work)
  key = jax.random.key(0) if key is None else key
  base = _base_options(pipeline, w_bits, a_bits, first_last_bits, range_method,
                       len(prepared.images))
  names: List[str] = []
  for name, state, report, seconds in run_stages(prepared, stages, key):
    guard = None
    if isinstance(report, GuardReport):
      guard, report = report._replace(report=None), report.report
    kept = guard is None or guard.kept
    if kept:
      names.append(name)
    if name == 'mixed_precision':
      options = result.mixed.options(result.allocation)
    else:
      options = dict(result.stages[0].model.options if result.stages else base)
    options['stages'] = list(names)
    options['quantize_matmuls'] = quantize_matmuls
    qm = quantized_model(prepared, state, options,
                         layer_reports=report if name == 'adaquant' and kept else None)
    result.stages.append(StageResult(name, qm, seconds, report, guard))
  for stage in result.stages:
    stage.model.timings.update(result.timings())
    if stage.name != 'adaquant':  # later stages keep the AdaQuant reports they started from
      stage.model.layer_reports = list(_adaquant_reports(result.stages, stage))
  return result


def _adaquant_reports(stages: List[StageResult], stage: StageResult) -> list:
  for s in stages[:stages.index(stage)]:
    if s.name == 'adaquant' and s.kept:
      return s.report or []
  return []


def _base_options(pipeline: str, w_bits, a_bits, first_last_bits, range_method,
                  calib_size: int) -> Dict[str, Any]:
  return {'w_bits': w_bits, 'a_bits': a_bits, **range_options(as_range_config(range_method)),
          'first_last_bits': first_last_bits, 'overrides': {}, 'calib_size': calib_size,
          'method': 'ptq', 'pipeline': pipeline}
