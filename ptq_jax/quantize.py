"""``ptq_jax.quantize``: prepare -> ranges -> [AdaQuant], as one call.

The facade over the first stages (:mod:`ptq_jax.stages`): it checks the calibration
images, traces the model and folds its BatchNorms, sets every layer's bit widths
(the first/last-layer policy, then per-layer overrides), calibrates the quantizer
ranges and, with ``method='adaquant'``, reconstructs every layer. The whole
pipelines (BN and bias tuning, mixed precision) are :func:`ptq_jax.run_pipeline`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

import jax

from ptq_jax.quant.interceptor import QState
from ptq_jax.quantized_model import QuantizedModel
from ptq_jax.stages.adaquant import MODES, AdaQuantConfig, AdaQuantRuntime, run_adaquant
from ptq_jax.stages.attention import attention_matmuls
from ptq_jax.stages.prepare import Prepared, prepare
from ptq_jax.stages.ranges import Bits, RangeConfig, assign_bits, calibrate_ranges
from ptq_jax.validate import check_key

METHODS = ('ptq', 'adaquant')


def quantized_model(prepared: Prepared, qstate: QState, options: Dict[str, Any],
                    timings: Optional[Dict[str, float]] = None,
                    layer_reports: Optional[List[Dict[str, Any]]] = None) -> QuantizedModel:
  """A :class:`QuantizedModel` of ``prepared`` with ``qstate``."""
  if prepared.model_name and 'model' not in options:
    options = dict(options, model=prepared.model_name)
  return QuantizedModel(prepared.model, dict(prepared.variables), list(prepared.layers),
                        dict(qstate), options, prepared.input_shape, dict(timings or {}),
                        list(layer_reports or []), list(prepared.float_ops))


def quantize(model: Any, variables: Optional[Mapping[str, Any]] = None, calib: Any = None, *,
             w_bits: Bits = 4, a_bits: Bits = 4, first_last_bits: Bits = 8,
             overrides: Optional[Mapping[str, Mapping[str, Bits]]] = None,
             ranges: RangeConfig = RangeConfig(), method: str = 'ptq',
             mode: str = 'parallel', adaquant: Optional[AdaQuantConfig] = None,
             runtime: Optional[AdaQuantRuntime] = None, key: Optional[jax.Array] = None,
             devices: Optional[Sequence[Any]] = None, progress: bool = True,
             input_shape: Optional[Sequence[int]] = None,
             model_name: Optional[str] = None, unsupported: str = 'error',
             quantize_matmuls: bool = False) -> QuantizedModel:
  """Post-training quantization: calibrated ranges (baseline PTQ), then optionally AdaQuant.

  Args:
    model, variables: an unmodified Flax Linen module and its ``{'params',
      'batch_stats'}``, or an NNX module alone (it carries its own state:
      ``quantize(module, calib=images)``).
    calib: preprocessed float calibration images (N, ...) or a ``CalibrationSet``.
    w_bits, a_bits: default weight / layer-input bit widths, 2..8, or None for float.
    first_last_bits: bits of the first and last layer (the paper's 8), or None to
      treat them like every other layer.
    overrides: ``{layer_path: {'w_bits': b, 'a_bits': b}}`` for individual layers.
    ranges: how quantizer ranges are initialised (:class:`RangeConfig`).
    method: 'ptq' (calibrated ranges only) or 'adaquant' (then per-layer
      reconstruction from those ranges; docs/method.md).
    mode: AdaQuant's 'parallel' (float inputs per layer) or 'sequential' (inputs
      from the quantized prefix).
    adaquant, runtime: AdaQuant's hyper-parameters and runtime settings.
    key: PRNG key for AdaQuant's minibatches (default ``jax.random.key(0)``).
    devices: AdaQuant's capture passes are split over them and, in parallel mode, its
      layers dealt to them (default: all local devices; see ptq_jax.distributed).
    progress: show a progress bar during AdaQuant.
    input_shape: the per-example input shape the model expects, to check the
      calibration data against (optional).
    model_name: registry name recorded with the saved model (optional).
    unsupported: what to do with a parameter-carrying operation that is not an
      ``nn.Conv`` / ``nn.Dense`` layer called once: 'error' (the default: raises
      ``UnsupportedLayerError`` naming it) or 'keep_float' (it stays float32, with a
      warning, counted at 32 bits in ``size_bits``).
    quantize_matmuls: also quantize the two activation x activation matmuls of every
      attention module (Q·Kᵀ and attention·V; per-tensor operand quantizers at
      ``a_bits``, calibrated after the layers and, with AdaQuant, optimised; see
      ``ptq_jax.stages.attention``).
  """
  if method not in METHODS:
    raise ValueError(f'method={method!r} is not one of {METHODS}.')
  if mode not in MODES:
    raise ValueError(f'mode={mode!r} is not one of {MODES}.')
  check_key(key)
  if not isinstance(ranges, RangeConfig):
    raise TypeError(f'ranges must be a ptq_jax.RangeConfig, got {type(ranges).__name__}.')
  if quantize_matmuls and a_bits is None:
    raise ValueError('quantize_matmuls=True quantizes attention operands at a_bits; a_bits=None '
                     'leaves activations in float.')
  start = time.time()
  prepared = prepare(model, variables, calib, input_shape, model_name, unsupported,
                     quantize_matmuls)
  if method == 'adaquant' and adaquant is not None:
    adaquant.holdout_size(len(prepared.images))   # (a bad holdout fails before the work)
  bits = assign_bits(prepared.layers, w_bits, a_bits, first_last_bits, overrides)
  qstate = calibrate_ranges(prepared, bits, ranges)
  timings = {'calibrate_seconds': time.time() - start}
  reports: List[Dict[str, Any]] = []
  options = {'w_bits': w_bits, 'a_bits': a_bits, 'range_method': ranges.method,
             'weight_range_method': ranges.weights, 'first_last_bits': first_last_bits,
             'overrides': {k: dict(v) for k, v in (overrides or {}).items()},
             'symmetric': ranges.symmetric, 'per_channel_inputs': ranges.per_channel_inputs,
             'percentile': ranges.percentile, 'smooth_alpha': ranges.smooth_alpha,
             'calib_size': len(prepared.images),
             'method': method}
  if method == 'adaquant':
    start = time.time()
    adaquant = adaquant or AdaQuantConfig()
    qstate, reports = run_adaquant(prepared.model, prepared.variables, prepared.layers, qstate,
                                   prepared.images, mode, adaquant, key, progress, devices,
                                   runtime or AdaQuantRuntime())
    timings['adaquant_seconds'] = time.time() - start
    options.update(mode=mode, adaquant=dataclasses.asdict(adaquant))
  if quantize_matmuls:
    start = time.time()
    qstate, site_reports = attention_matmuls(
        a_bits, ranges, adaquant if method == 'adaquant' else None).apply(
        prepared, qstate, jax.random.key(0) if key is None else key)
    reports = list(reports) + list(site_reports or [])
    timings['attention_seconds'] = time.time() - start
  options['quantize_matmuls'] = quantize_matmuls
  return quantized_model(prepared, qstate, options, timings, reports)
