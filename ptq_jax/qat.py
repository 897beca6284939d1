"""Quantization-aware training (QAT): the slow baseline the paper's PTQ is compared with.

Starts from a quantized model (calibrated ranges, folded BatchNorms) and trains
every kernel, bias and quantizer range/offset on a *labelled* training set with
the straight-through estimator, cross-entropy on the labels, the training recipe's
crop/flip augmentation and Adam on a cosine schedule. BatchNorms stay folded
(frozen statistics), so the trained model has exactly the quantized model's
structure and is returned as a :class:`~ptq_jax.quantized_model.QuantizedModel`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from ptq_jax.data.augment import augment
from ptq_jax.quant.attention import AttentionQuant
from ptq_jax.quant.matmuls import MatmulQuant
from ptq_jax.quant.interceptor import LayerQuant, apply_quantized
from ptq_jax.quantized_model import QuantizedModel


@dataclasses.dataclass(frozen=True)
class QATConfig:
  """QAT's training recipe. ``epochs``: passes over the images (fractions allowed: 0.5
  is half an epoch); ``learning_rate``: peak Adam rate of kernels and biases, quantizer
  ranges and offsets at ``quantizer_learning_rate``, both decaying to 0 on a cosine;
  ``crop_pad`` / ``flip``: the training recipe's augmentation."""

  epochs: float = 1.0
  batch_size: int = 128
  learning_rate: float = 1e-4
  quantizer_learning_rate: float = 1e-3
  crop_pad: int = 2
  flip: bool = True

  def __post_init__(self):
    if not self.epochs > 0:
      raise ValueError(f'epochs must be > 0, got {self.epochs}.')
    if self.batch_size < 1:
      raise ValueError(f'batch_size must be >= 1, got {self.batch_size}.')


def qat_train(qm: QuantizedModel, images: np.ndarray, labels: np.ndarray,
              preprocess, config: QATConfig = QATConfig(), key: Optional[jax.Array] = None,
              progress: bool = True) -> Tuple[QuantizedModel, Dict[str, Any]]:
  """Quantization-aware training of ``qm`` on labelled raw ``images``.

  Args:
    qm: the starting point, e.g. ``ptq_jax.quantize(...)`` (baseline PTQ ranges).
    images: raw training images (e.g. uint8 pixels, NHWC); augmented, then
      ``preprocess``-ed on the device, one minibatch at a time.
    labels: integer class labels, one per image.
    preprocess: jnp function from augmented raw pixels to model inputs.

  Returns:
    The trained model and a report (steps, seconds, loss per tenth of training).
  """
  images, labels, batch_size = np.asarray(images), np.asarray(labels), config.batch_size
  if images.ndim != 4 or len(images) != len(labels):
    raise ValueError(f'QAT needs NHWC images and one label each; got images '
                     f'{images.shape} and labels {labels.shape}.')
  if len(images) < batch_size:
    raise ValueError(f'QAT needs at least one batch: {len(images)} images, batch_size '
                     f'{batch_size}.')
  start = time.time()
  key = jax.random.key(0) if key is None else key
  steps_per_epoch = len(images) // batch_size
  steps = max(1, int(round(config.epochs * steps_per_epoch)))
  step, tx = _train_step(qm, preprocess, config, steps, key)
  state = dict(qm.qstate)
  opt_state = tx.init(state)
  rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2**31 - 1)))
  losses: List[jnp.ndarray] = []
  order = np.empty(0, np.int64)
  for i in tqdm(range(steps), desc='QAT', disable=not progress, leave=False):
    if len(order) < batch_size:
      order = rng.permutation(len(images))
    idx, order = order[:batch_size], order[batch_size:]
    state, opt_state, loss = step(state, opt_state, images[idx], labels[idx], i)
    losses.append(loss)
  losses_np = np.asarray(jax.device_get(losses))
  tenths = [float(chunk.mean()) for chunk in np.array_split(losses_np, min(10, steps))]
  settings = dict(qm.settings, stages=list(qm.settings.get('stages', [])) + ['qat'])
  trained = QuantizedModel(qm.model, qm.variables, qm.layers, state, settings, qm.input_shape,
                           dict(qm.timings, qat_seconds=time.time() - start),
                           list(qm.layer_reports))
  return trained, {'epochs': steps / steps_per_epoch, 'steps': steps, 'batch_size': batch_size,
                   'train_images': len(images), 'loss_by_tenth': tenths,
                   'seconds': time.time() - start}


def _train_step(qm: QuantizedModel, preprocess, config: QATConfig, steps: int, key: jax.Array):
  """The jitted ``(state, opt_state, raw, labels, i) -> (state, opt_state, loss)`` and
  its optimiser: Adam per group (weights; quantizer ranges and offsets)."""
  groups = {path: jax.tree.map(lambda _: 'ranges', lq) if isinstance(lq, (AttentionQuant, MatmulQuant))
            else LayerQuant('weights', 'weights', _ranges(lq.w_quant), _ranges(lq.a_quant),
                            None if lq.smooth is None else 'ranges',
                            tuple(_ranges(q) for q in lq.site_a_quants), lq.view)
            for path, lq in qm.qstate.items()}
  tx = optax.multi_transform(
      {'weights': optax.adam(optax.cosine_decay_schedule(config.learning_rate, steps)),
       'ranges': optax.adam(optax.cosine_decay_schedule(config.quantizer_learning_rate,
                                                        steps))}, groups)
  model, variables, folded = qm.model, qm.variables, qm.folded_bns

  def loss_fn(state, x, y):
    logits = apply_quantized(model, variables, state, folded, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(state, opt_state, raw, y, i):
    x = preprocess(augment(raw.astype(jnp.float32), jax.random.fold_in(key, i),
                           config.crop_pad, config.flip))
    loss, grads = jax.value_and_grad(loss_fn)(state, x, y)
    updates, opt_state = tx.update(grads, opt_state, state)
    return optax.apply_updates(state, updates), opt_state, loss
  return step, tx


def _ranges(quantizer: Any) -> Any:
  """The optimizer-group labels of a quantizer: its range and offset are 'ranges'."""
  return None if quantizer is None else quantizer.replace(range='ranges', low='ranges')
