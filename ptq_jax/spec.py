"""What to do, in one frozen value: :class:`QuantSpec`.

Every entry point (``quantize``, ``run_pipeline``, ``mixed_precision``) maps its keywords
onto one spec; the recipes (:mod:`ptq_jax.recipes`) turn a spec into stages; and the
spec alone writes the settings a quantized model records (``QuantizedModel.settings``),
so two entry points given the same settings record the same thing.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from ptq_jax.stages.adaquant import MODES, AdaQuantConfig, AdaQuantRuntime
from ptq_jax.stages.allocation import Allocation
from ptq_jax.stages.bias_tuning import bias_optimizer
from ptq_jax.stages.bn_tuning import TARGETS
from ptq_jax.stages.ranges import Bits, BitsRule, RangeConfig, as_range_config, range_options
from ptq_jax.validate import check_int


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """The settings of one quantization run (all validated on construction).

  Bits rule: ``w_bits`` / ``a_bits`` for every layer (None: float), ``first_last_bits``
  for the first and last layer (None: like the others), ``overrides`` per layer path.
  ``ranges``: how quantizer ranges start (a :class:`RangeConfig` or a method name).
  ``adaquant``: AdaQuant's hyper-parameters, or None for calibrated ranges only;
  ``mode``: its 'parallel' or 'sequential' inputs; ``runtime`` and ``devices``: where
  and how fast it runs. ``bn_target``, ``bias_steps`` and ``bias_optimizer``: BN and bias
  tuning (the pipelines). ``quantize_matmuls``: also the activation x activation matmuls.
  ``stage_guard``: keep a refining stage only if it lowers the KL to FP32.
  """

  w_bits: Bits = 4
  a_bits: Bits = 4
  first_last_bits: Bits = 8
  overrides: Optional[Mapping[str, Mapping[str, Bits]]] = None
  ranges: RangeConfig = RangeConfig()
  adaquant: Optional[AdaQuantConfig] = None
  mode: str = 'parallel'
  runtime: AdaQuantRuntime = AdaQuantRuntime()
  devices: Optional[Tuple[Any, ...]] = None
  bn_target: str = 'data'
  bias_steps: int = 800
  quantize_matmuls: bool = False
  stage_guard: bool = False
  bias_optimizer: str = 'sgd'

  def __post_init__(self):
    BitsRule(self.w_bits, self.a_bits, self.first_last_bits, self.overrides)  # (checks them)
    set_ = lambda name, value: object.__setattr__(self, name, value)
    set_('ranges', as_range_config(self.ranges))
    if self.overrides is not None:
      set_('overrides', {k: dict(v) for k, v in self.overrides.items()})
    if self.devices is not None:
      set_('devices', tuple(self.devices))
    if self.adaquant is not None and not isinstance(self.adaquant, AdaQuantConfig):
      raise TypeError(f'adaquant must be a ptq_jax.AdaQuantConfig or None, got '
                      f'{type(self.adaquant).__name__}.')
    if not isinstance(self.runtime, AdaQuantRuntime):
      raise TypeError(f'runtime must be a ptq_jax.AdaQuantRuntime, got '
                      f'{type(self.runtime).__name__}.')
    if self.mode not in MODES:
      raise ValueError(f'mode={self.mode!r} is not one of {MODES}.')
    if self.bn_target not in TARGETS:
      raise ValueError(f'bn_target={self.bn_target!r} is not one of {TARGETS}.')
    check_int(self.bias_steps, 'bias_steps')
    bias_optimizer(self.bias_optimizer)   # (checks the name)
    for name in ('quantize_matmuls', 'stage_guard'):
      if not isinstance(getattr(self, name), bool):
        raise TypeError(f'{name} must be True or False, got {getattr(self, name)!r}.')
    if self.quantize_matmuls and self.a_bits is None:
      raise ValueError('quantize_matmuls=True quantizes attention operands at a_bits; a_bits=None '
                       'leaves activations in float.')

  @property
  def bits(self) -> BitsRule:
    """The bits rule (which bits each layer gets once the layers are known)."""
    return BitsRule(self.w_bits, self.a_bits, self.first_last_bits, self.overrides)

  @property
  def method(self) -> str:
    """'adaquant' when AdaQuant runs, else 'ptq' (calibrated ranges only)."""
    return 'ptq' if self.adaquant is None else 'adaquant'

  def replace(self, **changes: Any) -> 'QuantSpec':
    """A copy with ``changes`` (validated again)."""
    return dataclasses.replace(self, **changes)

  def settings(self, calib_size: int, pipeline: Optional[str] = None,
               stages: Optional[Sequence[str]] = None,
               allocation: Optional[Allocation] = None,
               option_method: Optional[str] = None) -> Dict[str, Any]:
    """The settings a quantized model of this spec records (``QuantizedModel.settings``):
    with ``pipeline``, the pipeline's and the stages it kept; with ``allocation``, the
    mixed-precision model's per-layer choice (its bits then come from the allocation)."""
    meta = {'w_bits': self.w_bits, 'a_bits': self.a_bits,
            'first_last_bits': self.first_last_bits,
            'overrides': {k: dict(v) for k, v in (self.overrides or {}).items()},
            **range_options(self.ranges), 'calib_size': calib_size, 'method': self.method,
            'quantize_matmuls': self.quantize_matmuls}
    if self.adaquant is not None:
      meta.update(mode=self.mode, adaquant=dataclasses.asdict(self.adaquant))
    if pipeline is not None:
      meta.update(pipeline=pipeline, stages=list(stages or []), bn_target=self.bn_target,
                  bias_steps=self.bias_steps, bias_optimizer=self.bias_optimizer,
                  stage_guard=self.stage_guard)
    if allocation is not None:
      meta.update(w_bits=None, a_bits=None, first_last_bits=None,
                  overrides=allocation.overrides(), method='mixed_precision',
                  option_method=option_method or self.method,
                  allocation=allocation.counts(), budgets=allocation.budgets)
    return meta
