"""The paper's pipelines as compositions of the pure stages (DESIGN.md §2.8).

* ``light``:      calibrated ranges at each option -> dL -> IP -> BN tuning
* ``advanced``:   parallel AdaQuant at each option -> dL -> IP -> BN tuning -> bias tuning
* ``sequential``: fixed bit width: ranges -> sequential AdaQuant -> BN tuning -> bias tuning

Each stage takes and returns a quantization state; :func:`run_pipeline` keeps the
model after every stage, so a caller can evaluate each stage's contribution.
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
from ptq_jax.sensitivity import DEFAULT_OPTIONS, SensitivityTable

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
                 progress: bool = True) -> PipelineResult:
  """Runs one pipeline; see the module docstring.

  Args:
    pipeline: 'light', 'advanced' (both mixed precision: give ``size_pct`` and/or
      ``bops_pct``, percentages of the FP32 model) or 'sequential' (fixed
      ``w_bits``/``a_bits`` with ``first_last_bits`` for the first and last layer).
    options: the bit options the integer program mixes.
    bias_steps: KD bias-tuning steps (minibatch 50, SGD lr 0.1, the reference's).
  """
  from ptq_jax.mixed import mixed_precision  # mixed imports api; keep imports acyclic
  if pipeline not in PIPELINES:
    raise ValueError(f'pipeline={pipeline!r} is not one of {PIPELINES}.')
  mixed = pipeline in ('light', 'advanced')
  if mixed and size_pct is None and bops_pct is None:
    raise ValueError(f'The {pipeline} pipeline allocates bits by integer programming: give '
                     'size_pct and/or bops_pct (e.g. size_pct=13).')
  if not mixed and (size_pct is not None or bops_pct is not None):
    raise ValueError('The sequential pipeline has fixed bit widths (w_bits, a_bits); budgets '
                     'belong to the light and advanced pipelines.')
  if bias_steps < 0:
    raise ValueError(f'bias_steps must be >= 0, got {bias_steps}.')
  images = _check_calibration(calib)
  key = jax.random.key(0) if key is None else key
  stages: List[Stage] = []
  result = PipelineResult(pipeline, stages)
  start = time.time()
  if mixed:
    mp = mixed_precision(model, variables, images, options=options,
                         method='adaquant' if pipeline == 'advanced' else 'ptq',
                         range_method=range_method, adaquant=adaquant, key=key,
                         cache_dir=cache_dir, model_name=model_name, progress=progress)
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
    state, reports = run_adaquant(model, qm.variables, qm.layers, qm.qstate, images,
                                  'sequential', adaquant or AdaQuantConfig(), key, progress)
    qm = _with_state(qm, state, 'adaquant')
    qm.layer_reports = reports
    stages.append(Stage('adaquant', qm, time.time() - start, reports))
  start = time.time()
  state, report = bn_tune(model, qm.variables, qm.layers, qm.qstate, images, progress=progress)
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
