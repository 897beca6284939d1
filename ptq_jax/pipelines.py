"""The paper's pipelines as compositions of the pure stages (DESIGN.md §2.8).

* ``light``:      calibrated ranges at each option -> dL -> IP -> BN tuning
* ``advanced``:   parallel AdaQuant at each option -> dL -> IP -> BN tuning -> bias tuning
* ``sequential``: fixed bit width: ranges -> sequential AdaQuant -> BN tuning -> bias tuning

``light`` and ``advanced`` without a budget run at the fixed bit widths instead
(``w_bits``/``a_bits``, ``first_last_bits`` for the first and last layer): ranges ->
[parallel AdaQuant ->] BN tuning [-> bias tuning]. Each stage takes and returns a
quantization state; :func:`run_pipeline` keeps the model after every stage, so a
caller can evaluate each stage's contribution. The per-option states of an advanced
run (``result.mixed``) can be handed to the next run, so a fixed-bit and a
mixed-precision run share one AdaQuant pass.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

import flax.linen as nn
import jax

from ptq_jax.adaquant import AdaQuantConfig, run_adaquant
from ptq_jax.allocation import Allocation
from ptq_jax.api import QuantizedModel, _check_calibration, quantize
from ptq_jax.bn_tuning import bn_tune
from ptq_jax.distill import kd_tune
from ptq_jax.sensitivity import DEFAULT_OPTIONS, SensitivityTable, option_name, parse_option

PIPELINES = ('light', 'advanced', 'sequential')


@dataclasses.dataclass
class Stage:
  """One stage's output model and its wall time."""

  name: str
  model: QuantizedModel
  seconds: float
  report: Any = None


@dataclasses.dataclass
class PipelineResult:
  pipeline: str
  stages: List[Stage]
  allocation: Optional[Allocation] = None
  table: Optional[SensitivityTable] = None
  mixed: Any = None   # the MixedPrecision states a light/advanced run used

  @property
  def model(self) -> QuantizedModel:
    """The final quantized model."""
    return self.stages[-1].model

  def timings(self) -> Dict[str, float]:
    return {f'{s.name}_seconds': s.seconds for s in self.stages}


def _with_state(qm: QuantizedModel, state, stage: str) -> QuantizedModel:
  options = dict(qm.options, stages=list(qm.options.get('stages', [])) + [stage])
  return QuantizedModel(qm.model, qm.variables, qm.layers, dict(state), options, qm.input_shape,
                        dict(qm.timings), list(qm.layer_reports))


def run_pipeline(model: nn.Module, variables: Mapping[str, Any], calib: Any,
                 pipeline: str = 'advanced', *, w_bits: int = 4, a_bits: int = 4,
                 first_last_bits: Optional[int] = 8, size_pct: Optional[float] = None,
                 bops_pct: Optional[float] = None, options: Sequence[Any] = DEFAULT_OPTIONS,
                 range_method: str = 'minmax', adaquant: Optional[AdaQuantConfig] = None,
                 bias_steps: int = 800, key: Optional[jax.Array] = None,
                 cache_dir: Optional[str] = None, model_name: str = 'model',
                 mixed: Any = None, bn_target: str = 'data',
                 progress: bool = True) -> PipelineResult:
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
    bias_steps: KD bias-tuning steps (minibatch 50, SGD lr 0.1, the reference's).
    mixed: a previous run's ``result.mixed`` (same model, images and method) to reuse
      its per-option states and sensitivity table instead of recomputing them.
    bn_target: BN tuning's 'data' (re-estimate the statistics on the calibration
      images, the paper's) or 'fp' (match the FP network's statistics on them: for
      calibration data unlike the training data; see ptq_jax.bn_tuning).
  """
  from ptq_jax.mixed import mixed_precision  # mixed imports api; keep imports acyclic
  if pipeline not in PIPELINES:
    raise ValueError(f'pipeline={pipeline!r} is not one of {PIPELINES}.')
  budget = size_pct is not None or bops_pct is not None
  if pipeline == 'sequential' and budget:
    raise ValueError('The sequential pipeline has fixed bit widths (w_bits, a_bits); budgets '
                     'belong to the light and advanced pipelines.')
  if bias_steps < 0:
    raise ValueError(f'bias_steps must be >= 0, got {bias_steps}.')
  images = _check_calibration(calib)
  key = jax.random.key(0) if key is None else key
  stages: List[Stage] = []
  result = PipelineResult(pipeline, stages)
  method = 'adaquant' if pipeline == 'advanced' else 'ptq'
  fixed = [parse_option((w_bits, a_bits))]
  if first_last_bits is not None:
    fixed.append(parse_option((first_last_bits, first_last_bits)))

  def states_for(needed):
    if mixed is not None:
      if mixed.method != method or any(o not in mixed.option_states for o in needed):
        raise ValueError(f'mixed= holds {mixed.method} states for '
                         f'{[option_name(o) for o in mixed.table.options]}; the {pipeline} '
                         f'pipeline needs {method} states for '
                         f'{[option_name(o) for o in needed]}.')
      return mixed
    wanted = [parse_option(o) for o in options]
    computed = wanted if all(o in wanted for o in needed) else needed
    return mixed_precision(model, variables, images, options=computed, method=method,
                           range_method=range_method, adaquant=adaquant, key=key,
                           cache_dir=cache_dir, model_name=model_name, progress=progress)

  start = time.time()
  if budget:
    mp = result.mixed = states_for([])
    allocation = mp.solve(size_pct=size_pct, bops_pct=bops_pct)
    qm = mp.build(allocation)
    qm = _with_state(qm, qm.qstate, 'mixed_precision')
    result.allocation, result.table = allocation, mp.table
    stages.append(Stage('mixed_precision', qm, time.time() - start, allocation))
  else:
    qm = quantize(model, variables, images, w_bits=w_bits, a_bits=a_bits,
                  first_last_bits=first_last_bits, range_method=range_method,
                  progress=progress, model_name=model_name)
    qm = _with_state(qm, qm.qstate, 'ranges')
    stages.append(Stage('ranges', qm, time.time() - start))
    start = time.time()
    if pipeline == 'sequential':
      state, reports = run_adaquant(model, qm.variables, qm.layers, qm.qstate, images,
                                    'sequential', adaquant or AdaQuantConfig(), key, progress)
    elif pipeline == 'advanced':
      mp = result.mixed = states_for(fixed)
      allocation = mp.uniform(fixed[0], fixed[1] if len(fixed) > 1 else None)
      state, reports = mp.build(allocation).qstate, mp.layer_reports(allocation)
    if pipeline != 'light':
      qm = _with_state(qm, state, 'adaquant')
      qm.layer_reports = reports or []
      stages.append(Stage('adaquant', qm, time.time() - start, reports))
  start = time.time()
  state, report = bn_tune(model, qm.variables, qm.layers, qm.qstate, images, progress=progress,
                          target=bn_target)
  qm = _with_state(qm, state, 'bn_tuning')
  stages.append(Stage('bn_tuning', qm, time.time() - start, report))
  if pipeline in ('advanced', 'sequential') and bias_steps:
    start = time.time()
    state, report = kd_tune(model, qm.variables, qm.qstate, qm.folded_bns, images, target='bias',
                            steps=bias_steps, key=jax.random.fold_in(key, 1), progress=progress)
    stages.append(Stage('bias_tuning', _with_state(qm, state, 'bias_tuning'),
                        time.time() - start, report))
  for stage in stages:
    stage.model.timings.update(result.timings())
  return result
