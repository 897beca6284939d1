"""``ptq_jax.quantize``: prepare -> ranges -> [AdaQuant] -> [attention matmuls], as one call.

The keywords map onto a :class:`~ptq_jax.spec.QuantSpec`, whose stages are the
:func:`ptq_jax.recipes.ptq` recipe: it checks the calibration images, traces the model
and folds its BatchNorms, sets every layer's bit widths (the first/last-layer policy,
then per-layer overrides), calibrates the quantizer ranges and, with
``method='adaquant'``, reconstructs every layer. The whole pipelines (BN and bias
tuning, mixed precision) are :func:`ptq_jax.run_pipeline`.
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Optional, Sequence, Union

import jax

from ptq_jax import recipes
from ptq_jax.mixed_precision import reports_of
from ptq_jax.quantized_model import QuantizedModel, quantized_model
from ptq_jax.spec import QuantSpec
from ptq_jax.stages.adaquant import AdaQuantConfig, AdaQuantRuntime
from ptq_jax.stages.prepare import prepare, run_stages
from ptq_jax.stages.ranges import Bits, RangeConfig
from ptq_jax.validate import check_key

METHODS = ('ptq', 'adaquant')


def quantize(model: Any, variables: Optional[Mapping[str, Any]] = None, calib: Any = None, *,
             w_bits: Bits = 4, a_bits: Bits = 4, first_last_bits: Bits = 8,
             overrides: Optional[Mapping[str, Mapping[str, Bits]]] = None,
             ranges: Union[str, RangeConfig] = RangeConfig(), method: str = 'ptq',
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
    ranges: how quantizer ranges are initialised (a :class:`RangeConfig`, or a range
      method name such as 'mse').
    method: 'ptq' (calibrated ranges only) or 'adaquant' (then per-layer
      reconstruction from those ranges; docs/method.md).
    mode: AdaQuant's 'parallel' (float inputs per layer) or 'sequential' (inputs
      from the quantized prefix).
    adaquant, runtime: AdaQuant's hyper-parameters and runtime settings.
    key: PRNG key for AdaQuant's minibatches (default ``jax.random.key(0)``).
    devices: AdaQuant's capture passes are split over them and, in parallel mode, its
      layers dealt to them (default: all local devices; see ptq_jax.distributed).
    progress: show progress bars (the stages' one switch, ``Prepared.progress``).
    input_shape, model_name: the per-example input shape to check the calibration
      data against, and the registry name recorded with the saved model (optional).
    unsupported: what to do with a parameter-carrying operation that is not an
      ``nn.Conv`` / ``nn.Dense`` layer called once: 'error' (the default: raises
      ``UnsupportedLayerError`` naming it) or 'keep_float' (it stays float32, with a
      warning, counted at 32 bits in ``size_bits``).
    quantize_matmuls: also quantize every activation x activation matmul at ``a_bits``:
      attention modules' Q·Kᵀ and attention·V and any other (``ptq_jax.matmul_sites``;
      ``ptq_jax.stages.attention``).
  """
  if method not in METHODS:
    raise ValueError(f'method={method!r} is not one of {METHODS}.')
  check_key(key)
  spec = QuantSpec(w_bits, a_bits, first_last_bits, overrides, ranges,
                   (adaquant or AdaQuantConfig()) if method == 'adaquant' else None, mode,
                   runtime or AdaQuantRuntime(), devices, quantize_matmuls=quantize_matmuls)
  start = time.time()
  prepared = prepare(model, variables, calib, input_shape, model_name, unsupported,
                     quantize_matmuls, progress)
  if spec.adaquant is not None:
    spec.adaquant.holdout_size(len(prepared.images))   # (a bad holdout fails before the work)
  timings = {'prepare_seconds': time.time() - start}
  state, reports = prepared.float_state, []
  for stage, state, report, seconds in run_stages(prepared, recipes.ptq(spec),
                                                  jax.random.key(0) if key is None else key):
    timings[f'{stage}_seconds'] = seconds
    reports += reports_of(report)
  return quantized_model(prepared, state, spec.settings(len(prepared.images)), timings, reports)
