"""The public entry point: ``ptq_jax.quantize(model, variables, calib, **options)``.

It traces the model, folds its BatchNorms, sets every layer's bit widths (with
the first/last-layer policy and per-layer overrides), calibrates the quantizer
ranges and returns a :class:`QuantizedModel` whose ``.apply(x)`` runs the
quantized network, whose ``.report`` is the per-layer table, and which saves
and loads. Later pipeline stages (AdaQuant, bit allocation, BN and bias tuning)
extend this same entry point.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ptq_jax import adaquant as adaquant_lib
from ptq_jax import checkpoint as ckpt
from ptq_jax.adaquant import AdaQuantConfig
from ptq_jax.evaluation import batched_predict
from ptq_jax.quant import calibrate
from ptq_jax.quant.folding import fold_batchnorm
from ptq_jax.quant.qmodel import LayerQuant, QState, apply_quantized, quantized_weight
from ptq_jax.quant.quantizer import RANGE_METHODS, QuantizerState, check_bits
from ptq_jax.trace import LayerInfo, trace

Bits = Optional[int]
METHODS = ('ptq', 'adaquant')


def _check_calibration(images: Any, input_shape: Optional[Tuple[int, ...]] = None) -> np.ndarray:
  images = np.asarray(getattr(images, 'images', images))
  if images.ndim == 0 or len(images) == 0:
    raise ValueError('The calibration set is empty: pass at least one image '
                     '(e.g. ptq_jax.calibration_set("fashion_mnist", n=1000)).')
  if not np.issubdtype(images.dtype, np.floating):
    raise ValueError(f'Calibration images must be preprocessed floats, got dtype {images.dtype} '
                     '(use ptq_jax.preprocess or ptq_jax.calibration_set).')
  if input_shape is not None and tuple(images.shape[1:]) != tuple(input_shape):
    raise ValueError(f'Calibration images have shape {images.shape[1:]} per example; the model '
                     f'expects {tuple(input_shape)}.')
  bad = ~np.isfinite(images)
  if bad.any():
    which = np.unique(np.nonzero(bad.reshape(len(images), -1))[0])
    raise ValueError(f'The calibration set holds NaN or Inf values in {len(which)} image(s) '
                     f'(first indices {which[:5].tolist()}); clean or drop them.')
  return images.astype(np.float32)


def assign_bits(layers: Sequence[LayerInfo], w_bits: Bits, a_bits: Bits,
                first_last_bits: Bits, overrides: Optional[Mapping[str, Mapping[str, Bits]]]
                ) -> Dict[str, Tuple[Bits, Bits]]:
  """(w_bits, a_bits) per layer path: the default, the first/last policy, then overrides."""
  w_bits, a_bits = check_bits(w_bits, 'w_bits'), check_bits(a_bits, 'a_bits')
  first_last_bits = check_bits(first_last_bits, 'first_last_bits')
  bits = {l.path: (w_bits, a_bits) for l in layers}
  if first_last_bits is not None and layers:
    for layer in (layers[0], layers[-1]):
      bits[layer.path] = (first_last_bits if w_bits is not None else None,
                          first_last_bits if a_bits is not None else None)
  for path, option in (overrides or {}).items():
    if path not in bits:
      raise KeyError(f'Override names layer {path!r}, which the model does not have. Layers: '
                     f'{list(bits)}')
    unknown = set(option) - {'w_bits', 'a_bits'}
    if unknown:
      raise KeyError(f'Override for {path!r} has unknown keys {sorted(unknown)}; use w_bits '
                     'and/or a_bits.')
    w, a = bits[path]
    bits[path] = (check_bits(option.get('w_bits', w), f'{path} w_bits'),
                  check_bits(option.get('a_bits', a), f'{path} a_bits'))
  return bits


@functools.partial(jax.jit, static_argnums=(0, 3))
def _quantized_forward(model: nn.Module, variables, qstate, folded_bns: frozenset,
                       x: jnp.ndarray) -> jnp.ndarray:
  """One jitted forward for all quantized models (the Flax module and the folded BN
  paths are static: modules hash by their configuration)."""
  return apply_quantized(model, variables, qstate, folded_bns, x)


@dataclasses.dataclass
class QuantizedModel:
  """A quantized view of an unmodified Flax model."""

  model: nn.Module
  variables: Dict[str, Any]
  layers: List[LayerInfo]
  qstate: QState
  options: Dict[str, Any]
  input_shape: Tuple[int, ...]
  timings: Dict[str, float] = dataclasses.field(default_factory=dict)
  # Per-layer optimisation records (AdaQuant: reconstruction error before/after, time).
  layer_reports: List[Dict[str, Any]] = dataclasses.field(default_factory=list)

  @property
  def folded_bns(self) -> frozenset:
    return frozenset(l.bn_path for l in self.layers if l.bn_path)

  def apply(self, x: jnp.ndarray) -> jnp.ndarray:
    """Quantized model output on a batch ``x``, jit-compiled once per model, bit widths
    and shape: every quantized model of a pipeline with the same bits (its stages, say)
    runs the same program."""
    x = jnp.asarray(x, jnp.float32)
    try:
      hash(self.model)
    except TypeError:  # a module with an unhashable field (a list, say): its own program
      return self._own_forward(self.variables, self.qstate, x)
    return _quantized_forward(self.model, self.variables, self.qstate, self.folded_bns, x)

  @functools.cached_property
  def _own_forward(self):
    return jax.jit(lambda variables, qstate, x: apply_quantized(
        self.model, variables, qstate, self.folded_bns, x))

  def predict(self, images: np.ndarray, batch_size: int = 500,
              devices: Optional[Sequence[Any]] = None) -> np.ndarray:
    """Outputs on a whole array of images, batched (the last batch padded), each batch
    split over ``devices`` (default: all local devices)."""
    return batched_predict(self.apply, images, batch_size, devices)

  def bits(self) -> Dict[str, Tuple[Bits, Bits]]:
    """(w_bits, a_bits) per layer."""
    return {p: (lq.w_quant.bits if lq.w_quant else None, lq.a_quant.bits if lq.a_quant else None)
            for p, lq in self.qstate.items()}

  @property
  def report(self) -> List[Dict[str, Any]]:
    """Per-layer table: shape, folding, activation, bits, size, MACs, weight error."""
    rows, bits = [], self.bits()
    for layer in self.layers:
      lq = self.qstate[layer.path]
      w, a = bits[layer.path]
      err = jnp.sum((quantized_weight(lq) - lq.kernel)**2) / jnp.maximum(
          jnp.sum(lq.kernel**2), 1e-30)
      rows.append({'path': layer.path, 'kind': layer.kind,
                   'kernel_shape': 'x'.join(map(str, layer.kernel_shape)), 'groups': layer.groups,
                   'folded_bn': layer.bn_path or '', 'activation': layer.activation,
                   'w_bits': w, 'a_bits': a, 'params': layer.params, 'macs': layer.macs,
                   'weight_bits_total': layer.params * (w or 32),
                   'weight_rel_mse': float(err)})
    return rows

  def size_bits(self) -> int:
    """Weight storage of all quantized layers, in bits."""
    bits = self.bits()
    return sum(l.params * (bits[l.path][0] or 32) for l in self.layers)

  def save(self, path: str) -> None:
    """Writes the original variables, the quantization state and the options atomically."""
    qtree = {p: _layer_to_tree(lq) for p, lq in self.qstate.items()}
    meta = {'kind': 'quantized', 'options': self.options, 'input_shape': list(self.input_shape),
            'bits': {p: list(b) for p, b in self.bits().items()},
            'symmetric': self.options.get('symmetric', False)}
    if 'model' in self.options:
      meta['model'] = self.options['model']
    ckpt.save_checkpoint(path, {'variables': self.variables, 'qstate': qtree}, meta)

  @classmethod
  def load(cls, path: str, model: nn.Module) -> 'QuantizedModel':
    """Reloads a saved quantized model for ``model`` (the same module that was quantized)."""
    tree, meta = ckpt.load_checkpoint(path)
    if meta.get('kind') != 'quantized':
      raise ckpt.CheckpointError(f'{path} is a float checkpoint, not a quantized model; use '
                                 'ptq_jax.load_model / load_checkpoint for it.')
    variables = tree['variables']
    input_shape = tuple(meta['input_shape'])
    try:
      layers = trace(model, variables, jnp.zeros((1,) + input_shape))
    except Exception as e:  # The saved variables do not fit this module at all.
      raise ckpt.CheckpointError(f'{path} was saved from another model: {type(e).__name__}: '
                                 f'{str(e)[:200]}') from e
    paths = {l.path for l in layers}
    if paths != set(tree['qstate']):
      raise ckpt.CheckpointError(f'{path} was saved from another model: its layers '
                                 f'{sorted(set(tree["qstate"]) ^ paths)[:5]} do not match.')
    qstate = {p: _layer_from_tree(tree['qstate'][p], *meta['bits'][p], meta['symmetric'])
              for p in (l.path for l in layers)}
    return cls(model, variables, layers, qstate, meta['options'], input_shape)


def _layer_to_tree(lq: LayerQuant) -> Dict[str, Any]:
  tree = {'kernel': lq.kernel, 'bias': lq.bias}
  for name, q in (('w_quant', lq.w_quant), ('a_quant', lq.a_quant)):
    if q is not None:
      tree[name] = {'range': q.range, 'low': q.low}
  return tree


def _layer_from_tree(tree: Mapping[str, Any], w_bits: Bits, a_bits: Bits,
                     symmetric: bool) -> LayerQuant:
  def quantizer(name, bits):
    if bits is None:
      return None
    return QuantizerState(jnp.asarray(tree[name]['range']), jnp.asarray(tree[name]['low']),
                          int(bits), bool(symmetric))
  return LayerQuant(jnp.asarray(tree['kernel']), jnp.asarray(tree['bias']),
                    quantizer('w_quant', w_bits), quantizer('a_quant', a_bits))


def quantize(model: nn.Module, variables: Mapping[str, Any], calib: Any, *,
             w_bits: Bits = 4, a_bits: Bits = 4, range_method: str = 'minmax',
             weight_range_method: Optional[str] = None, first_last_bits: Bits = 8,
             overrides: Optional[Mapping[str, Mapping[str, Bits]]] = None,
             symmetric: bool = False, per_channel_inputs: bool = False,
             percentile: float = 99.99, batch_size: int = 100,
             method: str = 'ptq', mode: str = 'parallel',
             adaquant: Optional[AdaQuantConfig] = None, key: Optional[jax.Array] = None,
             progress: bool = True, input_shape: Optional[Sequence[int]] = None,
             model_name: Optional[str] = None, pipeline: Optional[str] = None,
             size_pct: Optional[float] = None, bops_pct: Optional[float] = None,
             devices: Optional[Sequence[Any]] = None) -> QuantizedModel:
  """Post-training quantization: calibrated ranges (baseline PTQ), then optionally AdaQuant.

  With ``pipeline`` ('light', 'advanced' or 'sequential') it runs that whole pipeline
  instead (:func:`ptq_jax.pipelines.run_pipeline`; ``size_pct`` / ``bops_pct`` are
  the mixed-precision budgets of the first two) and returns its final model.

  Args:
    model, variables: an unmodified Flax module and its ``{'params', 'batch_stats'}``.
    calib: preprocessed float calibration images (N, ...) or a ``CalibrationSet``.
    w_bits, a_bits: default weight / layer-input bit widths, 2..8, or None for float.
    range_method: 'minmax' (the reference), 'mse' or 'percentile', for activations
      and (unless ``weight_range_method`` says otherwise) weights.
    first_last_bits: bits of the first and last layer (the paper's 8), or None to
      treat them like every other layer.
    overrides: ``{layer_path: {'w_bits': b, 'a_bits': b}}`` for individual layers.
    symmetric: symmetric instead of asymmetric quantizers.
    per_channel_inputs: one input quantizer per input channel instead of per tensor
      (more accurate; not expressible in the integer export).
    percentile: the upper percentile for ``range_method='percentile'``.
    batch_size: calibration batch size for activation statistics.
    method: 'ptq' (calibrated ranges only) or 'adaquant' (then per-layer
      reconstruction from those ranges, DESIGN.md §2.3).
    mode: AdaQuant's 'parallel' (float inputs per layer) or 'sequential' (inputs
      from the quantized prefix) mode.
    adaquant: AdaQuant settings (iterations, minibatch, learning rates, ...).
    key: PRNG key for AdaQuant's minibatches (default ``jax.random.key(0)``).
    progress: show a progress bar during AdaQuant.
    input_shape: the per-example input shape the model expects, to check the
      calibration data against (optional).
    model_name: registry name recorded with the saved model (optional).
    devices: AdaQuant's capture passes are split over them and, in parallel mode, its
      layers dealt to them (default: all local devices; see ptq_jax.distributed).
  """
  if pipeline is not None:
    from ptq_jax.pipelines import run_pipeline
    return run_pipeline(model, variables, calib, pipeline, w_bits=w_bits, a_bits=a_bits,
                        first_last_bits=first_last_bits, size_pct=size_pct, bops_pct=bops_pct,
                        range_method=range_method, adaquant=adaquant, key=key,
                        model_name=model_name or 'model', progress=progress).model
  if size_pct is not None or bops_pct is not None:
    raise ValueError('size_pct / bops_pct are budgets of the light and advanced pipelines: pass '
                     "pipeline='light' or 'advanced' (or use ptq_jax.mixed_precision).")
  start = time.time()
  if method not in METHODS:
    raise ValueError(f'method={method!r} is not one of {METHODS}.')
  if mode not in adaquant_lib.MODES:
    raise ValueError(f'mode={mode!r} is not one of {adaquant_lib.MODES}.')
  images = _check_calibration(calib, None if input_shape is None else tuple(input_shape))
  for name, value in (('range_method', range_method),
                      ('weight_range_method', weight_range_method or range_method)):
    if value not in RANGE_METHODS:
      raise ValueError(f'{name}={value!r} is not one of {RANGE_METHODS}.')
  try:
    layers = trace(model, variables, jnp.asarray(images[:1]))
  except Exception as e:  # Flax reports a shape clash deep inside the model.
    raise ValueError(f'The model cannot run on calibration images of shape {images.shape[1:]}: '
                     f'{type(e).__name__}: {str(e)[:300]}') from e
  if not layers:
    raise ValueError('The model has no nn.Conv or nn.Dense layer to quantize.')
  bits = assign_bits(layers, w_bits, a_bits, first_last_bits, overrides)
  folded = fold_batchnorm(layers, variables)
  folded_bns = frozenset(l.bn_path for l in layers if l.bn_path)
  wmethod = weight_range_method or range_method
  a_quants = calibrate.activation_quantizers(
      model, variables, folded, folded_bns, images, {p: b[1] for p, b in bits.items()},
      range_method, symmetric, percentile, batch_size, per_channel_inputs)
  w_quants = calibrate.weight_quantizers(folded, {p: b[0] for p, b in bits.items()}, wmethod,
                                         symmetric, percentile)
  qstate = {l.path: LayerQuant(folded[l.path].kernel, folded[l.path].bias,
                               w_quants.get(l.path), a_quants.get(l.path)) for l in layers}
  timings = {'calibrate_seconds': time.time() - start}
  layer_reports: List[Dict[str, Any]] = []
  if method == 'adaquant':
    start = time.time()
    adaquant = adaquant or AdaQuantConfig()
    qstate, layer_reports = adaquant_lib.run_adaquant(model, variables, layers, qstate, images,
                                                      mode, adaquant, key, progress, devices)
    timings['adaquant_seconds'] = time.time() - start
  options = {'w_bits': w_bits, 'a_bits': a_bits, 'range_method': range_method,
             'weight_range_method': wmethod, 'first_last_bits': first_last_bits,
             'overrides': {k: dict(v) for k, v in (overrides or {}).items()},
             'symmetric': symmetric, 'per_channel_inputs': per_channel_inputs,
             'percentile': percentile, 'calib_size': len(images), 'method': method}
  if method == 'adaquant':
    options.update(mode=mode, adaquant=dataclasses.asdict(adaquant))
  if model_name:
    options['model'] = model_name
  return QuantizedModel(model, dict(variables), layers, qstate, options,
                        tuple(images.shape[1:]), timings, layer_reports)
