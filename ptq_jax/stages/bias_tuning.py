"""Bias tuning, and the fine-tuning baseline: knowledge distillation on unlabelled data.

Minimises ``KL(softmax(FP logits) || softmax(Q logits))`` over the calibration set
with respect to the biases only (the paper's bias tuning, docs/method.md) or to
all weights and biases (the fine-tuning baseline AdaQuant is compared with, to
check the paper's claim that AdaQuant overfits less). The float logits are
computed directly from the float model, so any unlabelled set works. Quantizer
ranges stay fixed unless ``tune_quantizers`` is set.
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from ptq_jax.calling import inference_kwargs
from ptq_jax.evaluation import batched_predict
from ptq_jax.quant.attention import AttentionQuant
from ptq_jax.quant.matmuls import MatmulQuant
from ptq_jax.quant.interceptor import LayerQuant, QState, apply_quantized
from ptq_jax.stages.prepare import Prepared, Stage

TARGETS = ('bias', 'all')
# Bias tuning's optimisers by name. 'sgd' is the reference's (plain SGD, lr 0.1), tuned
# on CIFAR-size networks; on ImageNet-size ones (1,000 classes, a far-off start) its
# steps overshoot. 'adam' (lr 1e-3) steps each bias by about the learning rate whatever
# its gradient's scale (results/imagenet_ablation.md, docs/method.md).
BIAS_OPTIMIZERS = {'sgd': lambda: optax.sgd(0.1), 'adam': lambda: optax.adam(1e-3)}


def bias_optimizer(name: str) -> optax.GradientTransformation:
  """The optimiser ``name`` of :data:`BIAS_OPTIMIZERS`."""
  if not isinstance(name, str) or name not in BIAS_OPTIMIZERS:
    raise ValueError(f'bias_optimizer={name!r} is not one of {tuple(BIAS_OPTIMIZERS)}: '
                     "'sgd' (the paper's, SGD lr 0.1) or 'adam' (Adam lr 1e-3, for "
                     'ImageNet-size networks).')
  return BIAS_OPTIMIZERS[name]()


def kl_per_row(teacher_logits: jnp.ndarray, student_logits: jnp.ndarray) -> jnp.ndarray:
  """KL(softmax(teacher) || softmax(student)) of every row."""
  log_p = jax.nn.log_softmax(teacher_logits)
  log_q = jax.nn.log_softmax(student_logits)
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def kl_to_teacher(teacher_logits: jnp.ndarray, student_logits: jnp.ndarray) -> jnp.ndarray:
  """Mean over the batch of KL(softmax(teacher) || softmax(student))."""
  return jnp.mean(kl_per_row(teacher_logits, student_logits))


def _labels(qstate: Mapping[str, LayerQuant], target: str, tune_quantizers: bool):
  def quant(q):
    return None if q is None else q.replace(range='train' if tune_quantizers else 'freeze',
                                            low='train' if tune_quantizers else 'freeze')
  def labels(lq):
    if isinstance(lq, (AttentionQuant, MatmulQuant)):   # operand quantizers: like ranges
      return jax.tree.map(lambda _: 'train' if tune_quantizers else 'freeze', lq)
    return LayerQuant('train' if target == 'all' else 'freeze', 'train', quant(lq.w_quant),
                      quant(lq.a_quant), None if lq.smooth is None else 'freeze',
                      tuple(quant(q) for q in lq.site_a_quants), lq.view)
  return {p: labels(lq) for p, lq in qstate.items()}


def kd_tune(prepared: Prepared, qstate: Mapping[str, LayerQuant], target: str = 'bias',
            steps: int = 800, batch_size: int = 50,
            optimizer: Optional[optax.GradientTransformation] = None,
            tune_quantizers: bool = False, key: Optional[jax.Array] = None
            ) -> Tuple[Dict[str, LayerQuant], Dict[str, Any]]:
  """KD-tunes ``qstate`` on the prepared model's calibration images (teacher: the FP
  model's outputs); returns the new state and a report.

  Args:
    target: 'bias' (biases only) or 'all' (kernels and biases).
    optimizer: default plain SGD with lr 0.1 for biases (the reference) and Adam with
      lr 1e-4 for all weights.
  """
  if target not in TARGETS:
    raise ValueError(f'kd_tune target must be one of {TARGETS}, got {target!r}.')
  if steps < 0 or batch_size < 1:
    raise ValueError(f'kd_tune needs steps >= 0 and batch_size >= 1 (got {steps}, {batch_size}).')
  start = time.time()
  model, variables, folded_bns = prepared.model, prepared.variables, prepared.folded_bns
  key = jax.random.key(0) if key is None else key
  images = jnp.asarray(prepared.images, jnp.float32)
  teacher = jnp.asarray(batched_predict(
      jax.jit(lambda x: model.apply(variables, x, **inference_kwargs(model))), np.asarray(images), 250))
  if optimizer is None:
    optimizer = optax.sgd(0.1) if target == 'bias' else optax.adam(1e-4)
  tx = optax.multi_transform({'train': optimizer, 'freeze': optax.set_to_zero()},
                             _labels(qstate, target, tune_quantizers))
  batch = min(batch_size, images.shape[0])

  def loss_fn(state, x, t):
    return kl_to_teacher(t, apply_quantized(model, variables, state, folded_bns, x))

  @jax.jit
  def step(state, opt_state, i):
    idx = jax.random.choice(jax.random.fold_in(key, i), images.shape[0], (batch,), replace=False)
    loss, grads = jax.value_and_grad(loss_fn)(state, images[idx], teacher[idx])
    updates, opt_state = tx.update(grads, opt_state, state)
    return optax.apply_updates(state, updates), opt_state, loss

  @jax.jit
  def full_loss(state):
    return loss_fn(state, images, teacher)

  state = dict(qstate)
  before = float(full_loss(state))
  opt_state = tx.init(state)
  for i in tqdm(range(steps), desc=f'KD tuning ({target})', disable=not prepared.progress,
                leave=False):
    state, opt_state, _ = step(state, opt_state, i)
  after = float(full_loss(state))
  if not after <= before:   # (NaN included)
    warnings.warn(f'KD tuning ({target}) raised the KD loss on the calibration images from '
                  f'{before:.4g} to {after:.4g}: its steps overshoot. Use a smaller learning '
                  "rate (bias tuning: bias_optimizer='adam') or stage_guard=True, which "
                  'drops a stage that raises it.', stacklevel=2)
  return state, {'target': target, 'steps': steps, 'kd_loss_before': before,
                 'kd_loss_after': after, 'seconds': time.time() - start}


def bias_tuning_stage(steps: int = 800, batch_size: int = 50, optimizer: str = 'sgd') -> Stage:
  """The bias-tuning stage: :func:`kd_tune` of the biases with the optimiser named
  ``optimizer`` (:data:`BIAS_OPTIMIZERS`; 'sgd' is the reference's), minibatches drawn
  from ``fold_in(key, 1)``."""
  if steps < 0 or batch_size < 1:
    raise ValueError(f'bias tuning needs steps >= 0 and batch_size >= 1 (got {steps}, '
                     f'{batch_size}).')
  bias_optimizer(optimizer)   # (a bad name fails before the work)

  def apply(prepared: Prepared, qstate: QState, key: jax.Array) -> Tuple[QState, Any]:
    return kd_tune(prepared, qstate, target='bias', steps=steps, batch_size=batch_size,
                   optimizer=bias_optimizer(optimizer), key=jax.random.fold_in(key, 1))
  return Stage('bias_tuning', apply)
