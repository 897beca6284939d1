"""The result of quantizing: :class:`QuantizedModel`, a quantized view of an
unmodified Flax model that runs, reports, saves and loads.

It holds the original variables, the traced layer table and the quantization state
(one :class:`~ptq_jax.quant.interceptor.LayerQuant` per layer); ``apply`` runs the
model under the interceptor that swaps each layer's computation for its quantized one.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ptq_jax import checkpoint as ckpt
from ptq_jax.evaluation import batched_predict
from ptq_jax.quant.attention import OPERANDS, AttentionQuant
from ptq_jax.quant.matmuls import OPERANDS as MATMUL_OPERANDS, MatmulQuant
from ptq_jax.quant.bias_grid import integer_biases
from ptq_jax.quant.interceptor import (LayerQuant, QState, apply_quantized, layer_states,
                                       quantized_weight, smoothed_kernel)
from ptq_jax.quant.quantizer import QuantizerState, check_bits
from ptq_jax.float_ops import FloatOp
from ptq_jax.nnx_bridge import from_nnx, is_nnx
from ptq_jax.trace import LayerInfo, trace_model

Bits = Optional[int]


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
  settings: Dict[str, Any]         # what made it (QuantSpec.settings): bits, ranges, stages
  input_shape: Tuple[int, ...]
  timings: Dict[str, float] = dataclasses.field(default_factory=dict)
  # Per-layer optimisation records (AdaQuant: reconstruction error before/after, time).
  layer_reports: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
  # Parameter-carrying operations kept in float32 (unsupported='keep_float').
  float_ops: List[FloatOp] = dataclasses.field(default_factory=list)

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

  def with_integer_biases(self) -> 'QuantizedModel':
    """This model with every bias on its accumulator grid ``s_x s_w``, as an integer
    runtime stores it (:mod:`ptq_jax.quant.bias_grid`): the simulation then equals what
    ONNX Runtime's integer kernels compute (``ptq_jax.export(..., format='onnx')``)."""
    return dataclasses.replace(self, qstate=integer_biases(self.qstate),
                               settings={**self.settings, 'integer_biases': True})

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
            for p, lq in layer_states(self.qstate).items()}

  def matmul_bits(self) -> Dict[str, int]:
    """Operand bits of every attention site and matmul site whose matmuls are quantized
    (``quantize_matmuls=True``); empty otherwise."""
    return {p: q.bits for p, q in self.qstate.items()
            if isinstance(q, (AttentionQuant, MatmulQuant))}

  @property
  def report(self) -> List[Dict[str, Any]]:
    """Per-layer table: shape, folding, activation, bits, size, MACs, weight error."""
    rows, bits = [], self.bits()
    for layer in self.layers:
      lq = self.qstate[layer.path]
      w, a = bits[layer.path]
      kernel = smoothed_kernel(lq)
      err = jnp.sum((quantized_weight(lq) - kernel)**2) / jnp.maximum(jnp.sum(kernel**2), 1e-30)
      rows.append({'path': layer.path, 'kind': layer.kind,
                   'kernel_shape': 'x'.join(map(str, layer.kernel_shape)), 'groups': layer.groups,
                   'folded_bn': layer.bn_path or '', 'activation': layer.activation,
                   'w_bits': w, 'a_bits': a, 'params': layer.params, 'macs': layer.macs,
                   'weight_bits_total': layer.params * (w or 32),
                   'weight_rel_mse': float(err)})
    for p, b in self.matmul_bits().items():   # quantize_matmuls: no weights
      kind = 'attention matmuls' if isinstance(self.qstate[p], AttentionQuant) else 'matmul'
      rows.append({'path': p, 'kind': kind, 'kernel_shape': '', 'groups': '',
                   'folded_bn': '', 'activation': '', 'w_bits': None, 'a_bits': b, 'params': 0,
                   'macs': '', 'weight_bits_total': 0, 'weight_rel_mse': 0.0})
    for op in self.float_ops:   # kept in float32 (unsupported='keep_float')
      rows.append({'path': op.path, 'kind': f'float {op.module or op.primitive}',
                   'kernel_shape': '', 'groups': '', 'folded_bn': '', 'activation': '',
                   'w_bits': None, 'a_bits': None, 'params': op.params, 'macs': '',
                   'weight_bits_total': 32 * op.params, 'weight_rel_mse': 0.0})
    return rows

  def size_bits(self) -> int:
    """Weight storage in bits: every layer at its weight bits (float ones at 32) and
    every operation kept in float (``float_ops``) at 32."""
    bits = self.bits()
    return (sum(l.params * (bits[l.path][0] or 32) for l in self.layers)
            + 32 * sum(op.params for op in self.float_ops))

  def fp32_bits(self) -> int:
    """The same storage with everything at 32 bits: the denominator of size figures."""
    return 32 * (sum(l.params for l in self.layers) + sum(op.params for op in self.float_ops))

  def save(self, path: str) -> None:
    """Writes the original variables, the quantization state and the settings atomically."""
    qtree = {p: layer_to_tree(lq) for p, lq in layer_states(self.qstate).items()}
    for operands, kind in ((OPERANDS, AttentionQuant), (MATMUL_OPERANDS, MatmulQuant)):
      qtree.update({p: {n: {'range': getattr(q, n).range, 'low': getattr(q, n).low}
                        for n in operands}
                    for p, q in self.qstate.items() if isinstance(q, kind)})
    meta = {'kind': 'quantized', 'settings': self.settings,
            'input_shape': list(self.input_shape),
            'bits': {p: list(b) for p, b in self.bits().items()},
            'matmul_bits': self.matmul_bits(),
            'symmetric': self.settings.get('symmetric', False),
            'weight_symmetric': self.settings.get('weight_symmetric',
                                                  self.settings.get('symmetric', False))}
    if 'model' in self.settings:
      meta['model'] = self.settings['model']
    ckpt.save_checkpoint(path, {'variables': self.variables, 'qstate': qtree}, meta)

  @classmethod
  def load(cls, path: str, model: Any) -> 'QuantizedModel':
    """Reloads a saved quantized model for ``model`` (the same module that was quantized,
    Linen or NNX).

    The checksum, the layer set, every bit width (2..8 or float), every shape and the
    finiteness of every weight and range are checked; a bad file is a CheckpointError."""
    fix = 'quantize the model again and save it'
    if is_nnx(model):   # its Linen view; the variables come from the file
      model = from_nnx(model)[0]
    tree, meta = ckpt.load_checkpoint(path, fix=fix)
    if meta.get('kind') != 'quantized':
      raise ckpt.CheckpointError(f'{path} is not a quantized model (kind {meta.get("kind")!r}); '
                                 'use ptq_jax.load_model / load_checkpoint for a float one.')
    try:
      variables, qtree = tree['variables'], tree['qstate']
      input_shape = tuple(int(d) for d in meta['input_shape'])
      # ('options': the name files written before version 0.3 gave the settings.)
      settings = dict(meta['settings'] if 'settings' in meta else meta['options'])
      bits, symmetric = meta['bits'], meta['symmetric']
      weight_symmetric = meta.get('weight_symmetric', symmetric)   # (files before 0.4)
      matmul_bits = meta.get('matmul_bits', {})
      if not (input_shape and min(input_shape) > 0 and isinstance(symmetric, bool)
              and isinstance(weight_symmetric, bool)
              and isinstance(bits, dict) and isinstance(qtree, dict)
              and isinstance(matmul_bits, dict)):
        raise ValueError('input_shape, bits, symmetric or qstate has the wrong form')
    except (KeyError, TypeError, ValueError) as e:
      raise ckpt.CheckpointError(f'{path} has malformed metadata ({type(e).__name__}: {e}); '
                                 f'{fix}.') from e
    ckpt.check_values(variables, path, fix)
    try:
      traced = trace_model(model, variables, jnp.zeros((1,) + input_shape))
      layers = traced.layers
    except Exception as e:  # The saved variables do not fit this module at all.
      raise ckpt.CheckpointError(f'{path} was saved from another model: {type(e).__name__}: '
                                 f'{str(e)[:200]}') from e
    paths = {l.path for l in layers}
    sites = {s.path for s in traced.attention} | {s.name for s in traced.matmul_sites}
    if (paths != set(bits) or not set(matmul_bits) <= sites
        or set(qtree) != paths | set(matmul_bits)):
      raise ckpt.CheckpointError(f'{path} was saved from another model: its layers '
                                 f'{sorted(set(qtree) ^ (paths | set(matmul_bits)))[:5]} do not '
                                 'match.')
    qstate = {l.path: checked_layer(qtree[l.path], l, bits[l.path],
                                    (weight_symmetric, symmetric), path, fix
                                    ).replace(view=l.kernel_view)
              for l in layers}
    attention = {s.path for s in traced.attention}
    qstate.update({p: checked_attention(qtree[p], p, b, path, fix, p not in attention)
                   for p, b in matmul_bits.items()})
    return cls(model, variables, layers, qstate, settings, input_shape,
               float_ops=list(traced.float_ops))


def quantized_model(prepared: Any, qstate: QState, settings: Dict[str, Any],
                    timings: Optional[Dict[str, float]] = None,
                    layer_reports: Optional[List[Any]] = None) -> QuantizedModel:
  """A :class:`QuantizedModel` of a prepared model (``ptq_jax.stages.prepare.Prepared``)
  computing with ``qstate``; ``settings``: what it records (``QuantSpec.settings``)."""
  if prepared.model_name and 'model' not in settings:
    settings = dict(settings, model=prepared.model_name)
  return QuantizedModel(prepared.model, dict(prepared.variables), list(prepared.layers),
                        dict(qstate), settings, prepared.input_shape, dict(timings or {}),
                        list(layer_reports or []), list(prepared.float_ops))


def checked_layer(tree: Any, layer: LayerInfo, bits: Any, symmetric: Tuple[bool, bool], path: str,
                  fix: str) -> LayerQuant:
  """:func:`layer_from_tree` for a tree read from a file: bits, shapes and values
  checked against the traced ``layer``; raises CheckpointError naming the field."""
  where = f'{path}: layer {layer.path}'
  try:
    w_bits, a_bits = (check_bits(b, name) for b, name in zip(bits, ('w_bits', 'a_bits')))
    if len(bits) != 2:
      raise ValueError(f'bits must be a (w_bits, a_bits) pair, got {bits!r}')
  except (TypeError, ValueError) as e:
    raise ckpt.CheckpointError(f'{where}: {e}; {fix}.') from e
  if not isinstance(tree, dict) or 'kernel' not in tree or 'bias' not in tree:
    raise ckpt.CheckpointError(f'{where}: no kernel/bias; {fix}.')
  for name, want in (('w_quant', w_bits), ('a_quant', a_bits)):
    if (want is None) != (name not in tree):
      raise ckpt.CheckpointError(f'{where}: {name} is {"present" if name in tree else "missing"}'
                                 f' but the stored bits say {want}; {fix}.')
  fields = {'kernel': tree['kernel'], 'bias': tree['bias']}
  if 'smooth' in tree:
    fields['smooth'] = tree['smooth']
  extra = tree.get('site_a_quants', {})
  want = [str(k) for k in range(1, layer.sites)] if a_bits is not None else []
  if not isinstance(extra, dict) or sorted(extra) != sorted(want):
    raise ckpt.CheckpointError(f'{where}: site_a_quants must hold the input quantizers of call '
                               f'sites {want} (the layer has {layer.sites} call sites); {fix}.')
  for k, q in extra.items():
    fields.update({f'a_quant/{k}/{f}': q.get(f) if isinstance(q, dict) else None
                   for f in ('range', 'low')})
  for name in ('w_quant', 'a_quant'):
    if name in tree:
      fields.update({f'{name}/{k}': tree[name].get(k) if isinstance(tree[name], dict) else None
                     for k in ('range', 'low')})
  # Weight ranges are per output channel; input ranges per tensor or per input channel.
  allowed = {'kernel': [tuple(layer.kernel_shape)], 'bias': [(layer.kernel_shape[-1],)],
             'w_quant': [(layer.kernel_shape[-1],)], 'a_quant': [(), (layer.input_shape[-1],)],
             'smooth': [(layer.kernel_shape[0],)] if layer.kind == 'dense' else []}
  for name, value in fields.items():
    if value is None:
      raise ckpt.CheckpointError(f'{where}: {name} is missing; {fix}.')
    value, shapes = np.asarray(value), allowed[name.split('/')[0]]
    if not np.issubdtype(value.dtype, np.floating) or value.shape not in shapes:
      raise ckpt.CheckpointError(f'{where}: {name} is {value.dtype}{list(value.shape)}, expected '
                                 f'float32 of shape {" or ".join(map(str, map(list, shapes)))}; '
                                 f'{fix}.')
    if not np.all(np.isfinite(value)):
      raise ckpt.CheckpointError(f'{where}: {name} holds NaN or infinite values; {fix}.')
    if name.endswith('range') and np.any(value < 0):
      raise ckpt.CheckpointError(f'{where}: {name} holds negative ranges; {fix}.')
    if name == 'smooth' and np.any(value <= 0):
      raise ckpt.CheckpointError(f'{where}: smooth holds scales <= 0; {fix}.')
  return layer_from_tree(tree, w_bits, a_bits, symmetric, layer.sites)


def checked_attention(tree: Any, site: str, bits: Any, path: str, fix: str,
                      matmul: bool = False) -> Union[AttentionQuant, MatmulQuant]:
  """An attention site's (or with ``matmul``, a matmul site's) operand quantizers read
  from a file, checked: bits 2..8, per-tensor finite ranges >= 0; raises
  CheckpointError naming the field."""
  where = f'{path}: {"matmul" if matmul else "attention"} site {site}'
  try:
    bits = check_bits(bits, 'matmul bits')
    if bits is None:
      raise ValueError('matmul bits must be an integer')
  except (TypeError, ValueError) as e:
    raise ckpt.CheckpointError(f'{where}: {e}; {fix}.') from e
  quantizers = []
  for name in MATMUL_OPERANDS if matmul else OPERANDS:
    fields = tree.get(name) if isinstance(tree, dict) else None
    if not isinstance(fields, dict) or set(fields) != {'range', 'low'}:
      raise ckpt.CheckpointError(f'{where}: the {name} quantizer is missing or malformed; {fix}.')
    r, low = (np.asarray(fields[k]) for k in ('range', 'low'))
    for field, value in (('range', r), ('low', low)):
      if (not np.issubdtype(value.dtype, np.floating) or value.shape != ()
          or not np.isfinite(value)):
        raise ckpt.CheckpointError(f'{where}: {name}/{field} must be one finite float, got '
                                   f'{value.dtype}{list(value.shape)}; {fix}.')
    if r < 0:
      raise ckpt.CheckpointError(f'{where}: {name}/range is negative; {fix}.')
    quantizers.append(QuantizerState(jnp.asarray(r), jnp.asarray(low), bits, False))
  return MatmulQuant(*quantizers) if matmul else AttentionQuant(*quantizers)


def layer_to_tree(lq: LayerQuant) -> Dict[str, Any]:
  """One layer's state as a plain tree of arrays (bits and mode are stored apart)."""
  tree = {'kernel': lq.kernel, 'bias': lq.bias}
  for name, q in (('w_quant', lq.w_quant), ('a_quant', lq.a_quant)):
    if q is not None:
      tree[name] = {'range': q.range, 'low': q.low}
  if lq.smooth is not None:
    tree['smooth'] = lq.smooth
  if lq.site_a_quants and lq.a_quant is not None:   # a shared layer's further call sites
    tree['site_a_quants'] = {str(k + 1): {'range': q.range, 'low': q.low}
                             for k, q in enumerate(lq.site_a_quants)}
  return tree


def layer_from_tree(tree: Mapping[str, Any], w_bits: Bits, a_bits: Bits,
                    symmetric: Tuple[bool, bool], sites_count: int = 1) -> LayerQuant:
  """The inverse of :func:`layer_to_tree` (``symmetric``: the weights' and the inputs'
  quantizers)."""
  weight_symmetric, symmetric = symmetric

  def quantizer(name, bits):
    if bits is None:
      return None
    return QuantizerState(jnp.asarray(tree[name]['range']), jnp.asarray(tree[name]['low']),
                          int(bits), bool(weight_symmetric if name == 'w_quant' else symmetric))
  smooth = tree.get('smooth')
  extra = tree.get('site_a_quants', {})
  sites = [QuantizerState(jnp.asarray(extra[str(k)]['range']), jnp.asarray(extra[str(k)]['low']),
                          int(a_bits), bool(symmetric)) for k in range(1, len(extra) + 1)]
  if a_bits is None:
    sites = [None] * (sites_count - 1)
  return LayerQuant(jnp.asarray(tree['kernel']), jnp.asarray(tree['bias']),
                    quantizer('w_quant', w_bits), quantizer('a_quant', a_bits),
                    None if smooth is None else jnp.asarray(smooth), tuple(sites))
