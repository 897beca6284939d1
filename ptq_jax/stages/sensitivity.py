"""Per-layer sensitivity to quantization: the table the bit allocator mixes (docs/method.md).

``dL[l, b] = L(model with only layer l at option b, every other layer float) - L(float)``
on the calibration set, floored at a tiny positive number. ``L`` is label-free by
default, ``KL(softmax(FP logits) || softmax(logits))`` (so ``L(float) = 0``), or the
cross-entropy when labels are given. Option ``b`` of layer ``l`` uses that layer's
parameters from the option's *parallel-mode* state (baseline ranges, or parallel
AdaQuant): in parallel mode every layer was fitted to float inputs, so any mix of
options is a valid model.

Cost: one compiled program per option. Inside it, a traced 0/1 gate per layer blends
each layer between its float and its option-``b`` computation, so every "only layer
l quantized" model of that option runs through the same program.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ptq_jax.calling import inference_kwargs
from ptq_jax.distributed import local_devices, padded_batches
from ptq_jax.evaluation import batched_predict
from ptq_jax.quant.interceptor import (LayerQuant, apply_quantized, layer_forward, quantized_input,
                                  quantized_weight)
from ptq_jax.quant.quantizer import Option, option_name, parse_option
from ptq_jax.stages.bias_tuning import kl_per_row
from ptq_jax.stages.prepare import Prepared

DEFAULT_OPTIONS: Tuple[Option, ...] = ((8, 8), (6, 6), (4, 8), (4, 4), (3, 3), (2, 4))
MIN_DELTA = 1e-9
LOSSES = ('kl', 'ce')


@dataclasses.dataclass(frozen=True)
class SensitivityTable:
  """``delta[i, j]``: loss increase with only ``paths[i]`` at ``options[j]``."""

  paths: Tuple[str, ...]
  options: Tuple[Option, ...]
  delta: np.ndarray            # (layers, options), floored at MIN_DELTA
  raw_delta: np.ndarray        # the same before flooring (may be slightly negative)
  base_loss: float
  params: Tuple[int, ...]      # per layer: weights + bias
  macs: Tuple[int, ...]        # per layer, per example
  loss: str = 'kl'
  seconds: float = 0.0

  def size_bits(self, i: int, j: int) -> int:
    return self.params[i] * self.options[j][0]

  def bops(self, i: int, j: int) -> int:
    return self.macs[i] * self.options[j][0] * self.options[j][1]

  def fp32_size_bits(self) -> int:
    return 32 * sum(self.params)

  def fp32_bops(self) -> int:
    return 32 * 32 * sum(self.macs)

  def to_json(self) -> Dict[str, Any]:
    return {'paths': list(self.paths), 'options': [list(o) for o in self.options],
            'delta': self.delta.tolist(), 'raw_delta': self.raw_delta.tolist(),
            'base_loss': self.base_loss, 'params': list(self.params), 'macs': list(self.macs),
            'loss': self.loss, 'seconds': self.seconds}

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> 'SensitivityTable':
    return cls(tuple(d['paths']), tuple(tuple(o) for o in d['options']),
               np.asarray(d['delta'], np.float64), np.asarray(d['raw_delta'], np.float64),
               float(d['base_loss']), tuple(d['params']), tuple(d['macs']), d['loss'],
               float(d.get('seconds', 0.0)))


def _gated_output(float_state, option_state, gates):
  """A ``layer_output`` hook: layer ``p`` computes ``float + g_p * (option - float)``
  for its input, weight and bias; ``g_p`` in {0, 1} is exact either way."""
  def layer_output(path, module, x, site):
    fp, q, g = float_state[path], option_state[path].for_site(site), gates[path]
    x_used = x + g * (quantized_input(q, x) - x)
    w_used = fp.kernel + g * (quantized_weight(q) - fp.kernel)
    b_used = fp.bias + g * (q.bias - fp.bias)
    return layer_forward(module, x_used, w_used, b_used)
  return layer_output


def _loss_sum(logits, target, loss, n_valid):
  """The summed loss of the first ``n_valid`` rows (the rest is batch padding)."""
  if loss == 'kl':   # (an output per position, a language model's: summed per example)
    per_row = kl_per_row(target, logits)
    per_row = per_row.reshape(per_row.shape[0], -1).sum(axis=1)
  else:
    per_row = -jnp.take_along_axis(jax.nn.log_softmax(logits), target[:, None], axis=-1)[:, 0]
  return jnp.sum(jnp.where(jnp.arange(per_row.shape[0]) < n_valid, per_row, 0.0))


def sensitivity_table(prepared: Prepared,
                      option_states: Mapping[Option, Mapping[str, LayerQuant]],
                      labels: Optional[np.ndarray] = None, batch_size: int = 250,
                      devices: Optional[Sequence[Any]] = None) -> SensitivityTable:
  """Measures ``dL`` for every layer and option (see the module docstring) on the
  prepared model's calibration images.

  Args:
    option_states: per option, a complete per-layer state with every layer at that
      option (``quantize(..., w_bits=w, a_bits=a, first_last_bits=None).qstate``, or
      its parallel-AdaQuant version).
    labels: give them for the cross-entropy loss; by default the loss is the KL
      divergence from the float model's outputs (label-free).
    devices: the batches are split over them (default: all local devices).
  """
  start = time.time()
  images = np.asarray(prepared.images, np.float32)
  if len(images) == 0:
    raise ValueError('The calibration set is empty: the sensitivity table needs images.')
  options = tuple(parse_option(o) for o in option_states)
  paths = tuple(l.path for l in prepared.layers)
  for option, state in zip(options, option_states.values()):
    missing = [p for p in paths if p not in state]
    if missing:
      raise KeyError(f'The state for {option_name(option)} lacks layers {missing[:3]}; pass '
                     'complete states with every layer at that option.')
  mean_loss = _mean_loss_fn(prepared, images, labels, batch_size, local_devices(devices))
  # The gates are traced values: one compiled program per option serves every layer.
  # (Batching several gate vectors with vmap would give each conv a batched kernel,
  # which XLA's CPU backend runs as a slow grouped convolution.)
  base = mean_loss(next(iter(option_states.values())), jnp.zeros(len(paths)))
  raw = np.zeros((len(paths), len(options)))
  eye = jnp.eye(len(paths))
  bar = tqdm(total=len(options) * len(paths), desc='Sensitivity',
             disable=not prepared.progress, leave=False)
  for j, state in enumerate(option_states.values()):
    for i in range(len(paths)):
      raw[i, j] = mean_loss(state, eye[i]) - base
      bar.update()
  bar.close()
  layers = prepared.layers
  return SensitivityTable(paths, options, np.maximum(raw, MIN_DELTA), raw, base,
                          tuple(int(l.params) for l in layers), tuple(int(l.macs) for l in layers),
                          'kl' if labels is None else 'ce', time.time() - start)


def _mean_loss_fn(prepared: Prepared, images: np.ndarray, labels: Optional[np.ndarray],
                  batch_size: int, devices: Sequence[Any]):
  """``(option_state, gates) -> mean loss`` over the calibration images, where layer
  ``i`` computes with ``option_state`` where ``gates[i] == 1`` and in float elsewhere;
  the loss is the KL from the float outputs, or the cross-entropy with ``labels``."""
  model, variables, folded_bns = prepared.model, prepared.variables, prepared.folded_bns
  paths = tuple(l.path for l in prepared.layers)
  float_state = {p: LayerQuant(prepared.float_state[p].kernel, prepared.float_state[p].bias)
                 for p in paths}
  fp_forward = jax.jit(lambda x: apply_quantized(model, variables, float_state, folded_bns, x))
  fp_logits = batched_predict(fp_forward, images, batch_size, devices)
  if labels is not None and int(np.max(labels)) >= fp_logits.shape[-1]:
    raise ValueError(f'labels hold class {int(np.max(labels))}, but the model has '
                     f'{fp_logits.shape[-1]} outputs: pass class indices below that.')
  target = fp_logits if labels is None else np.asarray(labels, np.int32)
  loss = 'kl' if labels is None else 'ce'

  def batch_loss(option_state, gate_vec, x, t, n_valid):
    gates = {p: gate_vec[i] for i, p in enumerate(paths)}
    logits = apply_quantized(model, variables, float_state, folded_bns, x,
                             layer_output=_gated_output(float_state, option_state, gates))
    return _loss_sum(logits, t, loss, n_valid)

  loss_sum = jax.jit(batch_loss)
  # Data-parallel: images and targets split over the devices, batch by batch.
  batches = list(zip(padded_batches(images, batch_size, devices),
                     padded_batches(target, batch_size, devices, dtype=None)))
  return lambda state, gate_vec: sum(float(loss_sum(state, gate_vec, x, t, n))
                                     for (x, n), (t, _) in batches) / len(images)


def cache_key(model_name: str, variables: Mapping[str, Any], images: np.ndarray,
              options: Sequence[Option], method: str, extra: Optional[Mapping[str, Any]] = None,
              program: str = '') -> str:
  """A digest of everything the table depends on: the model's computation
  (``program``, see :func:`program_text`), the weights, the calibration images, the
  options, how the option states were made and any extra settings."""
  h = hashlib.sha256()
  h.update(model_name.encode())
  h.update(program.encode())
  for leaf in jax.tree.leaves(variables):
    h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  h.update(np.ascontiguousarray(np.asarray(images, np.float32)).tobytes())
  h.update(json.dumps({'options': [list(o) for o in options], 'method': method,
                       'extra': extra or {}}, sort_keys=True, default=str).encode())
  return h.hexdigest()[:20]


def program_text(model: nn.Module, variables: Mapping[str, Any], x: np.ndarray) -> str:
  """The model's traced inference program as text (a jaxpr): changing the model's code
  (an activation, a layer's order) changes it even when the weights stay the same."""
  return str(jax.make_jaxpr(lambda v, x: model.apply(v, x, **inference_kwargs(model)))(variables, x))
