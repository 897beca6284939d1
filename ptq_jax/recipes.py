"""Recipes: plain functions from a :class:`~ptq_jax.spec.QuantSpec` to the ordered
stages that carry it out, the way optax builds ``adam`` from ``chain(...)``
(docs/method.md, "Pipelines").

* :func:`ptq`:        ranges -> [AdaQuant] -> [attention matmuls] (``ptq_jax.quantize``)
* :func:`light`:      ranges at each option -> dL -> IP -> BN tuning
* :func:`advanced`:   parallel AdaQuant at each option -> dL -> IP -> BN tuning -> bias tuning
* :func:`sequential`: ranges -> sequential AdaQuant -> BN tuning -> bias tuning

``light`` and ``advanced`` without a budget run at the spec's fixed bit widths instead:
ranges -> [parallel AdaQuant ->] BN tuning [-> bias tuning]. Run the stages with
:func:`ptq_jax.stages.run_stages`, or through ``ptq_jax.run_pipeline``, which keeps the
model after every stage.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence

from ptq_jax.mixed_precision import MixedPrecision, mixed_precision_stage, uniform_option_stage
from ptq_jax.quant.quantizer import parse_option
from ptq_jax.spec import QuantSpec
from ptq_jax.stages.adaquant import AdaQuantConfig, adaquant_stage
from ptq_jax.stages.attention import attention_stage
from ptq_jax.stages.bias_tuning import bias_tuning_stage
from ptq_jax.stages.bn_tuning import bn_tuning_stage
from ptq_jax.stages.prepare import Stage
from ptq_jax.stages.ranges import ranges_stage
from ptq_jax.stages.sensitivity import DEFAULT_OPTIONS
from ptq_jax.stages.stage_guard import guarded

PIPELINES = ('light', 'advanced', 'sequential')
# The stages stage_guard=True may drop: each only refines a quantized state. Stages that
# choose the bits or calibrate new quantizers (ranges, mixed_precision, the attention
# matmuls' stages) always stand: dropping one would leave operations float.
GUARDED_STAGES = ('adaquant', 'bn_tuning', 'bias_tuning')


def ptq(spec: QuantSpec) -> List[Stage]:
  """Calibrated ranges, then (with ``spec.adaquant``) AdaQuant in ``spec.mode``, then
  (with ``spec.quantize_matmuls``) the attention matmuls, optimised after AdaQuant."""
  stages = [ranges_stage(spec.bits, spec.ranges)]
  if spec.adaquant is not None:
    stages.append(adaquant_stage(spec.mode, spec.adaquant, spec.runtime, spec.devices))
  if spec.quantize_matmuls:
    stages.append(attention_stage(spec.a_bits, spec.ranges, spec.adaquant))
  return _guarded(spec, stages)


def light(spec: QuantSpec, options: Sequence[Any] = DEFAULT_OPTIONS,
          size_pct: Optional[float] = None, bops_pct: Optional[float] = None,
          reuse: Optional[MixedPrecision] = None, cache_dir: Optional[str] = None
          ) -> List[Stage]:
  """The light pipeline: mixed precision from calibrated ranges at the budgets (fixed
  bits without one), then BN tuning."""
  if size_pct is None and bops_pct is None:
    head = [ranges_stage(spec.bits, spec.ranges)]
  else:
    head = [mixed_precision_stage(spec, options, 'ptq', size_pct, bops_pct, reuse, cache_dir)]
  return _guarded(spec, _with_matmuls(spec, head, optimise=False) + _tail(spec, bias=False))


def advanced(spec: QuantSpec, options: Sequence[Any] = DEFAULT_OPTIONS,
             size_pct: Optional[float] = None, bops_pct: Optional[float] = None,
             reuse: Optional[MixedPrecision] = None, cache_dir: Optional[str] = None
             ) -> List[Stage]:
  """The advanced pipeline: mixed precision from parallel AdaQuant at each option
  (fixed bits without a budget, taken from the same states), BN and bias tuning."""
  if size_pct is None and bops_pct is None:
    head = [ranges_stage(spec.bits, spec.ranges),
            uniform_option_stage(spec, options, reuse, cache_dir)]
  else:
    head = [mixed_precision_stage(spec, options, 'adaquant', size_pct, bops_pct, reuse,
                                  cache_dir)]
  return _guarded(spec, _with_matmuls(spec, head, optimise=True) + _tail(spec, bias=True))


def sequential(spec: QuantSpec) -> List[Stage]:
  """The fixed-bit pipeline: ranges, sequential AdaQuant, BN and bias tuning."""
  head = [ranges_stage(spec.bits, spec.ranges),
          adaquant_stage('sequential', spec.adaquant, spec.runtime, spec.devices)]
  return _guarded(spec, _with_matmuls(spec, head, optimise=True) + _tail(spec, bias=True))


def pipeline(name: str, spec: QuantSpec, options: Sequence[Any] = DEFAULT_OPTIONS,
             size_pct: Optional[float] = None, bops_pct: Optional[float] = None,
             reuse: Optional[MixedPrecision] = None, cache_dir: Optional[str] = None
             ) -> List[Stage]:
  """The stages of the pipeline ``name`` ('light', 'advanced' or 'sequential')."""
  if name not in PIPELINES:
    raise ValueError(f'pipeline={name!r} is not one of {PIPELINES}.')
  if name == 'sequential' and (size_pct is not None or bops_pct is not None):
    raise ValueError('The sequential pipeline has fixed bit widths (w_bits, a_bits); budgets '
                     'belong to the light and advanced pipelines.')
  parse_option((spec.w_bits, spec.a_bits))   # fixed bits are whole options (no None)
  if spec.first_last_bits is not None:
    parse_option((spec.first_last_bits, spec.first_last_bits))
  if name == 'sequential':
    return sequential(spec)
  recipe = light if name == 'light' else advanced
  return recipe(spec, options, size_pct, bops_pct, reuse, cache_dir)


def _with_matmuls(spec: QuantSpec, head: List[Stage], optimise: bool) -> List[Stage]:
  """``head`` with the attention matmuls' stages (``spec.quantize_matmuls``): calibrated
  after the layers' ranges (the operands their quantized layers produce) and again,
  then optimised, after AdaQuant (which returns the layers' states only)."""
  if not spec.quantize_matmuls:
    return head
  out = []
  for stage in head:
    out.append(stage)
    if stage.name == 'ranges' or (stage.name == 'mixed_precision' and not optimise):
      out.append(attention_stage(spec.a_bits, spec.ranges, None, 'matmul_ranges'))
    elif stage.name in ('adaquant', 'mixed_precision'):
      out.append(attention_stage(spec.a_bits, spec.ranges, spec.adaquant or AdaQuantConfig(),
                                 'matmul_adaquant'))
  return out


def _tail(spec: QuantSpec, bias: bool) -> List[Stage]:
  tail = [bn_tuning_stage(spec.bn_target)]
  if bias and spec.bias_steps:
    tail.append(bias_tuning_stage(spec.bias_steps, optimizer=spec.bias_optimizer))
  return tail


def _guarded(spec: QuantSpec, stages: List[Stage]) -> List[Stage]:
  """With ``spec.stage_guard``, the refining stages wrapped by the stage guard (never a
  stage that quantizes more, such as the matmuls' ranges)."""
  if not spec.stage_guard:
    return stages
  return [guarded(s) if s.name in GUARDED_STAGES else s for s in stages]
