"""``run_pipeline``: one of the paper's pipelines (:mod:`ptq_jax.recipes`), run stage by
stage, keeping the quantized model after every stage so a caller can evaluate what
each stage bought. The per-option states of a light/advanced run (``result.mixed``)
can be handed to the next run, so a fixed-bit and a mixed-precision run share one
AdaQuant pass.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import jax
import numpy as np

from ptq_jax import recipes
from ptq_jax.mixed_precision import MixedPrecision, MixedReport, reports_of
from ptq_jax.quantized_model import QuantizedModel, quantized_model
from ptq_jax.recipes import GUARDED_STAGES, PIPELINES
from ptq_jax.spec import QuantSpec
from ptq_jax.stages.adaquant import AdaQuantConfig, AdaQuantRuntime
from ptq_jax.stages.allocation import Allocation
from ptq_jax.stages.prepare import Prepared, Stage, prepare, run_stages
from ptq_jax.stages.sensitivity import DEFAULT_OPTIONS, SensitivityTable
from ptq_jax.stages.stage_guard import GuardReport
from ptq_jax.validate import check_key

__all__ = ['PIPELINES', 'GUARDED_STAGES', 'PipelineResult', 'StageResult', 'parse_run',
           'run_label', 'run_pipeline', 'run_recipe']


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
  """Every stage's result, in order; the mixed-precision choice read from their reports."""

  pipeline: str
  stages: List[StageResult]

  @property
  def model(self) -> QuantizedModel:
    """The final quantized model."""
    return self.stages[-1].model

  @property
  def mixed(self) -> Optional[MixedPrecision]:
    """The per-option states a light/advanced run used (reusable: ``run_pipeline(mixed=)``)."""
    return next((s.report.mixed for s in self.stages if isinstance(s.report, MixedReport)), None)

  @property
  def allocation(self) -> Optional[Allocation]:
    """The mixed-precision stage's allocation (None at fixed bits)."""
    report = self._mixed_stage_report()
    return None if report is None else report.allocation

  @property
  def table(self) -> Optional[SensitivityTable]:
    """The sensitivity table the mixed-precision stage solved (None at fixed bits)."""
    report = self._mixed_stage_report()
    return None if report is None else report.table

  def _mixed_stage_report(self) -> Optional[MixedReport]:
    return next((s.report for s in self.stages if s.name == 'mixed_precision'), None)

  def timings(self) -> Dict[str, float]:
    return {f'{s.name}_seconds': s.seconds for s in self.stages}


def run_pipeline(model: Any, variables: Optional[Mapping[str, Any]] = None, calib: Any = None,
                 pipeline: str = 'advanced', *, w_bits: int = 4, a_bits: int = 4,
                 first_last_bits: Optional[int] = 8, size_pct: Optional[float] = None,
                 bops_pct: Optional[float] = None, options: Sequence[Any] = DEFAULT_OPTIONS,
                 ranges: Any = 'minmax', adaquant: Optional[AdaQuantConfig] = None,
                 runtime: Optional[AdaQuantRuntime] = None,
                 bias_steps: int = 800, key: Optional[jax.Array] = None,
                 cache_dir: Optional[str] = None, model_name: str = 'model',
                 mixed: Optional[MixedPrecision] = None, bn_target: str = 'data',
                 unsupported: str = 'error', quantize_matmuls: bool = False,
                 stage_guard: bool = False, bias_optimizer: str = 'sgd',
                 progress: bool = True) -> PipelineResult:
  """Runs one pipeline (the keywords map onto a :class:`~ptq_jax.spec.QuantSpec`).

  Args:
    pipeline: 'light' or 'advanced' (mixed precision when ``size_pct`` and/or
      ``bops_pct``, percentages of the FP32 model, are given; fixed bit widths
      otherwise) or 'sequential' (fixed bit widths).
    w_bits, a_bits, first_last_bits: the fixed bit widths (``first_last_bits`` for the
      first and last layer; None: like the others).
    options: the bit options the integer program mixes (a fixed-bit advanced run
      computes these too when they include its bit widths, so ``result.mixed`` can
      serve a later mixed run; otherwise only the ones it needs).
    ranges: 'minmax', 'mse', 'percentile', or a RangeConfig (smoothing, say).
    adaquant, runtime: AdaQuant's hyper-parameters and runtime settings.
    cache_dir: where the mixed-precision states are cached and, unless ``runtime``
      names another ``resume_dir``, where AdaQuant saves each finished layer or block,
      so a killed run started again with the same inputs resumes from there.
    bias_steps: KD bias-tuning steps (minibatch 50).
    bias_optimizer: bias tuning's optimiser: 'sgd' (lr 0.1, the reference's) or 'adam'
      (lr 1e-3; for ImageNet-size networks, where SGD's steps overshoot).
    mixed: a previous run's ``result.mixed`` (same model, images and method) to reuse
      its per-option states and sensitivity table instead of recomputing them.
    bn_target: BN tuning's 'data' (re-estimate the statistics on the calibration
      images, the paper's) or 'fp' (match the FP network's statistics on them: for
      calibration data unlike the training data; see ptq_jax.stages.bn_tuning).
    unsupported: 'error' or 'keep_float' for operations ptq_jax cannot quantize
      (see :func:`ptq_jax.quantize`; fixed-bit pipelines only).
    quantize_matmuls: also quantize the activation matmuls at ``a_bits`` (a stage after
      the layers' bits are set; optimised in the advanced and sequential pipelines).
    stage_guard: keep AdaQuant, BN tuning and bias tuning (``GUARDED_STAGES``) only
      where they lower the KL divergence of the network's outputs to FP32's on the
      calibration images, otherwise go on from the state before the stage
      (:mod:`ptq_jax.stages.stage_guard`; each stage's ``guard`` says what it measured).
  """
  check_key(key)
  runtime = (runtime or AdaQuantRuntime()).resuming_in(cache_dir)
  spec = QuantSpec(w_bits, a_bits, first_last_bits, None, ranges,
                   None if pipeline == 'light' else adaquant or AdaQuantConfig(),
                   'sequential' if pipeline == 'sequential' else 'parallel',
                   runtime, None, bn_target, bias_steps,
                   quantize_matmuls, stage_guard, bias_optimizer)
  stages = recipes.pipeline(pipeline, spec, options, size_pct, bops_pct, mixed, cache_dir)
  prepared = prepare(model, variables, calib, model_name=model_name, unsupported=unsupported,
                     quantize_matmuls=quantize_matmuls, progress=progress)
  if mixed is not None and not np.array_equal(mixed.prepared.images, prepared.images):
    raise ValueError('mixed= was computed on other calibration images than this run\'s; pass '
                     'the same images (or leave mixed=None to compute the states).')
  if spec.adaquant is not None:
    spec.adaquant.holdout_size(len(prepared.images))   # (a bad holdout fails before the work)
  return run_recipe(prepared, spec, pipeline, stages, key)


def run_recipe(prepared: Prepared, spec: QuantSpec, name: str, stages: Sequence[Stage],
               key: Optional[jax.Array] = None) -> PipelineResult:
  """Runs ``stages`` (a recipe of ``spec``) and keeps the model after each: its settings
  from the spec (the stages kept so far; a mixed model's allocation), its per-layer
  reports from the last kept AdaQuant stage."""
  key = jax.random.key(0) if key is None else key
  result, kept, mixed = PipelineResult(name, []), [], None
  for stage, state, report, seconds in run_stages(prepared, stages, key):
    guard = None
    if isinstance(report, GuardReport):
      guard, report = report._replace(report=None), report.report
    if guard is None or guard.kept:
      kept.append(stage)
    if stage == 'mixed_precision':
      mixed = report
    settings = spec.settings(len(prepared.images), name, kept,
                             mixed and mixed.allocation, mixed and mixed.mixed.method)
    reports = reports_of(report) if stage == 'adaquant' and kept[-1:] == [stage] else None
    result.stages.append(StageResult(stage, quantized_model(prepared, state, settings,
                                                            layer_reports=reports),
                                     seconds, report, guard))
  for stage in result.stages:
    stage.model.timings.update(result.timings())
    if stage.name != 'adaquant':  # later stages keep the AdaQuant reports they started from
      stage.model.layer_reports = _adaquant_reports(result.stages, stage)
  return result


def _adaquant_reports(stages: List[StageResult], stage: StageResult) -> list:
  for s in stages[:stages.index(stage)]:
    if s.name == 'adaquant' and s.kept:
      return reports_of(s.report)
  return []
