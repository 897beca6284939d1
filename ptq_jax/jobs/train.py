"""run.py job 'train': the bundled models from scratch (optax SGD, cosine schedule, augmentation).

A pure jit-compiled step over an explicit ``TrainState`` pytree; the host loop only
shuffles indices, feeds batches and logs. Writes an atomic checkpoint and a JSON
model card (test accuracy, config, seed, training time, the command).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Dict, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm.auto import tqdm

from ptq_jax import checkpoint as ckpt
from ptq_jax.data.augment import augment
from ptq_jax.io import atomic_write_json
from ptq_jax.jobs.results import describe_device
from ptq_jax.data import loader
from ptq_jax.evaluation import predict_logits, top1_accuracy_pct
from ptq_jax.calling import inference_kwargs
from ptq_jax.models import create_model, get_model_spec, init_variables
from ptq_jax.models.fast_depthwise import fast_depthwise


class TrainState(NamedTuple):
  step: jnp.ndarray
  params: Any
  batch_stats: Any
  opt_state: Any


OPTIMIZERS = ('sgd', 'adamw')


def make_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int):
  """Warmup + cosine decay, weight decay on kernels only; SGD with Nesterov momentum
  (``config.optimizer='sgd'``, the default) or AdamW ('adamw', for the ViT)."""
  total = config.num_epochs * steps_per_epoch
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, config.learning_rate, min(config.warmup_steps, total // 2), total)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  name = config.get('optimizer', 'sgd')
  if name not in OPTIMIZERS:
    raise ValueError(f'config.optimizer must be one of {OPTIMIZERS}, got {name!r}.')
  if name == 'adamw':
    return optax.adamw(schedule, weight_decay=config.weight_decay, mask=decay_mask), schedule
  return optax.chain(optax.add_decayed_weights(config.weight_decay, mask=decay_mask),
                     optax.sgd(schedule, momentum=config.momentum, nesterov=True)), schedule


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Trains ``config.model`` on ``config.data.dataset``; returns the model card."""
  start_time = time.time()
  if config.data.dataset != 'fashion_mnist':
    raise ValueError(f'Training supports the in-memory fashion_mnist dataset, not '
                     f'{config.data.dataset!r}.')
  spec = get_model_spec(config.model)
  model = create_model(config.model)
  data_kwargs = dict(data_dir=config.data.data_dir, idx_dir=config.data.idx_dir,
                     download=config.data.download)
  train = loader.load_split(config.data.dataset, 'train', **data_kwargs)
  test = loader.load_split(config.data.dataset, 'test', **data_kwargs)
  if config.train_limit:  # A prefix of the data, for smoke tests and quick experiments.
    train = loader.ArraySplit(train.images[:config.train_limit], train.labels[:config.train_limit])
  if config.eval_limit:
    test = loader.ArraySplit(test.images[:config.eval_limit], test.labels[:config.eval_limit])
  if len(train) < config.batch_size:
    raise ValueError(f'The training set ({len(train)} images) is smaller than one batch '
                     f'({config.batch_size}).')
  if train.images.shape[1:] != spec.input_shape:
    raise ValueError(f'{config.model} expects inputs {spec.input_shape}, '
                     f'{config.data.dataset} has {train.images.shape[1:]}.')
  steps_per_epoch = len(train) // config.batch_size
  tx, schedule = make_optimizer(config, steps_per_epoch)
  key = jax.random.key(config.seed)
  init_key, dropout_key, aug_key = jax.random.split(key, 3)
  variables = init_variables(config.model, init_key)
  state = TrainState(jnp.zeros((), jnp.int32), variables['params'],
                     variables.get('batch_stats', {}), tx.init(variables['params']))
  train_kwargs = {'train': True} if 'train' in inference_kwargs(model) else {}
  preprocess = loader.PREPROCESSORS[config.data.dataset]

  @jax.jit
  def train_step(state: TrainState, raw_images, labels):
    step_key = jax.random.fold_in(aug_key, state.step)
    images = augment(raw_images.astype(jnp.float32), step_key, config.augment.crop_pad,
                     config.augment.flip)
    images = (images / 255.0 - loader.FASHION_MNIST_MEAN) / loader.FASHION_MNIST_STD

    def loss_fn(params):
      with fast_depthwise():
        logits, updates = model.apply(
            {'params': params, 'batch_stats': state.batch_stats}, images, **train_kwargs,
            mutable=['batch_stats'], rngs={'dropout': jax.random.fold_in(dropout_key, state.step)})
      onehot = optax.smooth_labels(jax.nn.one_hot(labels, spec.num_classes),
                                   config.label_smoothing)
      loss = optax.softmax_cross_entropy(logits, onehot).mean()
      return loss, (logits, updates.get('batch_stats', state.batch_stats))

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    return TrainState(state.step + 1, params, batch_stats, opt_state), loss, accuracy

  os.makedirs(workdir, exist_ok=True)
  log_path = os.path.join(workdir, 'train_log.jsonl')
  rng = np.random.default_rng(config.seed)
  history = []
  with open(log_path, 'w') as log:
    for epoch in range(1, config.num_epochs + 1):
      epoch_start = time.time()
      order = rng.permutation(len(train))
      losses, accs = [], []
      for i in tqdm(range(steps_per_epoch), desc=f'epoch {epoch}/{config.num_epochs}',
                    leave=False):
        idx = order[i * config.batch_size:(i + 1) * config.batch_size]
        state, loss, acc = train_step(state, train.images[idx], train.labels[idx])
        losses.append(loss)
        accs.append(acc)
      record = {'epoch': epoch, 'train_loss': float(np.mean(jax.device_get(losses))),
                'train_top1_pct': 100 * float(np.mean(jax.device_get(accs))),
                'learning_rate': float(schedule(int(state.step))),
                'epoch_seconds': round(time.time() - epoch_start, 1)}
      if config.eval_every_epochs and (epoch % config.eval_every_epochs == 0
                                       or epoch == config.num_epochs):
        record['test_top1_pct'] = top1_accuracy_pct(predict_logits(
            model, {'params': state.params, 'batch_stats': state.batch_stats},
            preprocess(test.images)), test.labels)
      history.append(record)
      log.write(json.dumps(record) + '\n')
      log.flush()
      print(json.dumps(record), flush=True)

  final = {'params': state.params, 'batch_stats': state.batch_stats}
  test_top1 = top1_accuracy_pct(predict_logits(model, final, preprocess(test.images)),
                                test.labels)
  card = {
      'model': config.model,
      'model_kwargs': {},
      'dataset': config.data.dataset,
      'test_top1_pct': round(test_top1, 2),
      'num_params': int(sum(np.size(p) for p in jax.tree.leaves(state.params))),
      'seed': config.seed,
      'training_seconds': round(time.time() - start_time, 1),
      'device': describe_device(),
      'command': 'python ' + ' '.join(sys.argv),
      'config': config.to_dict(),
      'history': history,
  }
  checkpoint_path = os.path.join(workdir, f'{config.model}_{config.data.dataset}.msgpack')
  ckpt.save_checkpoint(checkpoint_path, final, {k: card[k] for k in (
      'model', 'model_kwargs', 'dataset', 'test_top1_pct', 'seed')})
  atomic_write_json(os.path.join(workdir, 'model_card.json'), card)
  print(f'test top-1 {test_top1:.2f}%  checkpoint {checkpoint_path}', flush=True)
  return card
