"""The result of quantizing: :class:`QuantizedModel`, a quantized view of an
unmodified Flax model that runs, reports, saves and loads.

It holds the original variables, the traced layer table and the quantization state
(one :class:`~ptq_jax.quant.interceptor.LayerQuant` per layer); ``apply`` runs the
model under the interceptor that swaps each layer's computation for its quantized one.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ptq_jax import checkpoint as ckpt
from ptq_jax.evaluation import batched_predict
from ptq_jax.quant.interceptor import LayerQuant, QState, apply_quantized, quantized_weight
from ptq_jax.quant.quantizer import QuantizerState
from ptq_jax.trace import LayerInfo, trace

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
    qtree = {p: layer_to_tree(lq) for p, lq in self.qstate.items()}
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
    qstate = {p: layer_from_tree(tree['qstate'][p], *meta['bits'][p], meta['symmetric'])
              for p in (l.path for l in layers)}
    return cls(model, variables, layers, qstate, meta['options'], input_shape)


def layer_to_tree(lq: LayerQuant) -> Dict[str, Any]:
  """One layer's state as a plain tree of arrays (bits and mode are stored apart)."""
  tree = {'kernel': lq.kernel, 'bias': lq.bias}
  for name, q in (('w_quant', lq.w_quant), ('a_quant', lq.a_quant)):
    if q is not None:
      tree[name] = {'range': q.range, 'low': q.low}
  return tree


def layer_from_tree(tree: Mapping[str, Any], w_bits: Bits, a_bits: Bits,
                     symmetric: bool) -> LayerQuant:
  """The inverse of :func:`layer_to_tree`."""
  def quantizer(name, bits):
    if bits is None:
      return None
    return QuantizerState(jnp.asarray(tree[name]['range']), jnp.asarray(tree[name]['low']),
                          int(bits), bool(symmetric))
  return LayerQuant(jnp.asarray(tree['kernel']), jnp.asarray(tree['bias']),
                    quantizer('w_quant', w_bits), quantizer('a_quant', a_bits))
