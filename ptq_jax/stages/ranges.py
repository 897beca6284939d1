"""Range calibration (baseline PTQ): bit widths per layer, then every quantizer's range.

Weights get per-output-channel quantizers from the folded kernels; layer inputs get
per-tensor (or per-input-channel) quantizers from what the float model feeds each
layer on the calibration images. This stage starts from the float state whatever
state it is given: it is where quantization begins.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from ptq_jax.quant import calibrate
from ptq_jax.quant.folding import FoldedLayer
from ptq_jax.quant.interceptor import LayerQuant, QState, site_key
from ptq_jax.quant.quantizer import RANGE_METHODS, check_bits
from ptq_jax.stages.prepare import Prepared, Stage
from ptq_jax.trace import LayerInfo

Bits = Optional[int]
LayerBits = Dict[str, Tuple[Bits, Bits]]


@dataclasses.dataclass(frozen=True)
class RangeConfig:
  """How quantizer ranges are initialised (docs/method.md, "Quantizer").

  ``method``: 'minmax' (the reference), 'mse' or 'percentile', for activations and,
  unless ``weight_method`` says otherwise, weights. ``per_channel_inputs``: one input
  quantizer per input channel (not expressible in the integer export).
  ``batch_size``: images per activation-statistics batch.
  """

  method: str = 'minmax'
  weight_method: Optional[str] = None
  symmetric: bool = False
  weight_symmetric: Optional[bool] = None   # None: as ``symmetric``
  per_channel_inputs: bool = False
  percentile: float = 99.99
  batch_size: int = 100
  # SmoothQuant's migration for dense layers: per input channel j, inputs are divided
  # and kernel rows multiplied by s_j = max|x_j|^alpha / max|W_j|^(1 - alpha) (exact in
  # float), moving activation outliers into the weights. None: off.
  smooth_alpha: Optional[float] = None

  def __post_init__(self):
    if self.smooth_alpha is not None and (
        isinstance(self.smooth_alpha, bool) or not isinstance(self.smooth_alpha, (int, float))
        or not 0.0 < float(self.smooth_alpha) < 1.0):
      raise ValueError(f'RangeConfig smooth_alpha must be in (0, 1) or None, got '
                       f'{self.smooth_alpha!r}.')
    for name, value in (('method', self.method), ('weight_method', self.weights)):
      if value not in RANGE_METHODS:
        raise ValueError(f'RangeConfig {name}={value!r} is not one of {RANGE_METHODS}.')
    if self.weight_symmetric not in (None, True, False):
      raise ValueError(f'RangeConfig weight_symmetric must be True, False or None, got '
                       f'{self.weight_symmetric!r}.')
    if not 0 < self.percentile <= 100:
      raise ValueError(f'RangeConfig percentile must be in (0, 100], got {self.percentile}.')
    if self.batch_size < 1:
      raise ValueError(f'RangeConfig batch_size must be >= 1, got {self.batch_size}.')

  @property
  def weights(self) -> str:
    """The weights' range method."""
    return self.weight_method or self.method

  @property
  def symmetric_weights(self) -> bool:
    """Whether the weights' quantizers are symmetric."""
    return self.symmetric if self.weight_symmetric is None else bool(self.weight_symmetric)


def as_range_config(value: Any) -> RangeConfig:
  """A :class:`RangeConfig` from one, or from a range method name ('minmax', ...)."""
  if isinstance(value, RangeConfig):
    return value
  if isinstance(value, str):
    return RangeConfig(value)
  raise TypeError(f'ranges must be a range method name such as "minmax" or a '
                  f'ptq_jax.RangeConfig, got {value!r}.')


def range_options(config: RangeConfig) -> Dict[str, Any]:
  """The range settings a quantized model records (``QuantizedModel.settings``)."""
  return {'range_method': config.method, 'weight_range_method': config.weights,
          'symmetric': config.symmetric, 'weight_symmetric': config.symmetric_weights,
          'per_channel_inputs': config.per_channel_inputs,
          'percentile': config.percentile, 'smooth_alpha': config.smooth_alpha}


@dataclasses.dataclass(frozen=True)
class BitsRule:
  """Which bits each layer gets: ``w_bits`` / ``a_bits`` (None: float), the first and
  last layer at ``first_last_bits`` (None: like the others), then per-layer
  ``overrides`` ``{path: {'w_bits': b, 'a_bits': b}}``. Checked on construction; the
  override paths once the layers are known (:meth:`assign`)."""

  w_bits: Bits = 4
  a_bits: Bits = 4
  first_last_bits: Bits = 8
  overrides: Optional[Mapping[str, Mapping[str, Bits]]] = None

  def __post_init__(self):
    check_bits(self.w_bits, 'w_bits'), check_bits(self.a_bits, 'a_bits')
    check_bits(self.first_last_bits, 'first_last_bits')
    if self.overrides is not None and not isinstance(self.overrides, Mapping):
      raise TypeError(f'overrides must be a dict {{layer_path: {{"w_bits": b, "a_bits": b}}}}, '
                      f'got {type(self.overrides).__name__}.')
    for path, option in (self.overrides or {}).items():
      if not isinstance(option, Mapping):
        raise TypeError(f'overrides[{path!r}] must be a dict such as {{"w_bits": 4}}, got '
                        f'{option!r}.')

  def assign(self, layers: Sequence[LayerInfo]) -> 'LayerBits':
    """(w_bits, a_bits) per layer path (:func:`assign_bits`)."""
    return assign_bits(layers, self.w_bits, self.a_bits, self.first_last_bits, self.overrides)


def assign_bits(layers: Sequence[LayerInfo], w_bits: Bits, a_bits: Bits,
                first_last_bits: Bits, overrides: Optional[Mapping[str, Mapping[str, Bits]]]
                ) -> LayerBits:
  """(w_bits, a_bits) per layer path: the default, the first/last policy, then overrides."""
  w_bits, a_bits = check_bits(w_bits, 'w_bits'), check_bits(a_bits, 'a_bits')
  first_last_bits = check_bits(first_last_bits, 'first_last_bits')
  bits = {l.path: (w_bits, a_bits) for l in layers}
  if first_last_bits is not None and layers:
    for layer in (layers[0], layers[-1]):
      bits[layer.path] = (first_last_bits if w_bits is not None else None,
                          first_last_bits if a_bits is not None else None)
  if overrides is not None and not isinstance(overrides, Mapping):
    raise TypeError(f'overrides must be a dict {{layer_path: {{"w_bits": b, "a_bits": b}}}}, '
                    f'got {type(overrides).__name__}.')
  for path, option in (overrides or {}).items():
    if not isinstance(option, Mapping):
      raise TypeError(f'overrides[{path!r}] must be a dict such as {{"w_bits": 4}}, got '
                      f'{option!r}.')
    if path not in bits:
      raise ValueError(f'Override names layer {path!r}, which the model does not have. Layers: '
                     f'{list(bits)}')
    unknown = set(option) - {'w_bits', 'a_bits'}
    if unknown:
      raise ValueError(f'Override for {path!r} has unknown keys {sorted(unknown)}; use w_bits '
                     'and/or a_bits.')
    w, a = bits[path]
    bits[path] = (check_bits(option.get('w_bits', w), f'{path} w_bits'),
                  check_bits(option.get('a_bits', a), f'{path} a_bits'))
  return bits


def calibrate_ranges(prepared: Prepared, bits: LayerBits,
                     config: RangeConfig = RangeConfig()) -> QState:
  """The quantization state with every layer's quantizers at ``bits`` (None: float)."""
  folded = {p: FoldedLayer(lq.kernel, lq.bias) for p, lq in prepared.float_state.items()}
  smooth = smoothing_scales(prepared, bits, config, folded)
  sites = {l.path: l.sites for l in prepared.layers}
  a_quants = calibrate.activation_quantizers(   # (each call site of a shared layer apart)
      prepared, {site_key(p, s): b[1] for p, b in bits.items() for s in range(sites[p])},
      config, divisors=smooth)
  weights = {p: FoldedLayer(f.kernel * smooth[p][:, None], f.bias) if p in smooth else f
             for p, f in folded.items()}
  w_quants = calibrate.weight_quantizers(weights, {p: b[0] for p, b in bits.items()},
                                         config.weights, config.symmetric_weights,
                                         config.percentile)
  return {l.path: LayerQuant(folded[l.path].kernel, folded[l.path].bias,
                             w_quants.get(l.path), a_quants.get(l.path), smooth.get(l.path),
                             tuple(a_quants.get(site_key(l.path, s)) for s in range(1, l.sites)),
                             l.kernel_view)
          for l in prepared.layers}


def smoothing_scales(prepared: Prepared, bits: LayerBits, config: RangeConfig,
                     folded: Dict[str, FoldedLayer]) -> Dict[str, jnp.ndarray]:
  """SmoothQuant's per-input-channel scales of every dense layer whose weights and
  inputs are both quantized (empty unless ``config.smooth_alpha``)."""
  if config.smooth_alpha is None:
    return {}
  paths = [l.path for l in prepared.layers if l.kind == 'dense' and l.sites == 1
           and bits[l.path][0] is not None and bits[l.path][1] is not None]
  x_max = calibrate.input_channel_absmax(prepared, paths, config.batch_size)
  alpha, scales = float(config.smooth_alpha), {}
  for p in paths:
    w_max = np.max(np.abs(np.asarray(folded[p].kernel)), axis=1)
    ok = (x_max[p] > 0) & (w_max > 0)
    s = np.where(ok, np.maximum(x_max[p], 1e-12)**alpha / np.maximum(w_max, 1e-12)**(1 - alpha),
                 1.0)
    scales[p] = jnp.asarray(np.clip(s, 1e-5, 1e5), jnp.float32)
  return scales


def ranges_stage(bits: Union[BitsRule, LayerBits] = BitsRule(),
                 config: RangeConfig = RangeConfig()) -> Stage:
  """The range-calibration stage ('ranges'): every layer's quantizers at ``bits`` (a
  :class:`BitsRule`, applied once the layers are known, or per-layer bits from
  :func:`assign_bits`), ranges initialised as ``config`` says."""
  if not isinstance(config, RangeConfig):
    raise TypeError(f'ranges must be a ptq_jax.RangeConfig, got {type(config).__name__}.')

  def apply(prepared: Prepared, qstate: QState, key: jax.Array) -> Tuple[QState, Any]:
    del qstate, key  # quantization starts from the float state
    layer_bits = bits.assign(prepared.layers) if isinstance(bits, BitsRule) else bits
    return calibrate_ranges(prepared, layer_bits, config), None
  return Stage('ranges', apply)
