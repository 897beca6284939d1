"""Evaluate a checkpoint on a test split and write ``results.json`` (run.py job 'evaluate')."""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Dict

import jax.numpy as jnp
import ml_collections

from ptq_jax import checkpoint as ckpt
from ptq_jax.bundled import resolve_checkpoint
from ptq_jax.data import loader
from ptq_jax.evaluation import predict_logits, top1_accuracy_pct
from ptq_jax.models import get_model_spec
from ptq_jax.io import atomic_write_json
from ptq_jax.jobs.outputs import RunOutputs
from ptq_jax.jobs.results import describe_device
from ptq_jax.trace import totals, trace
from ptq_jax.validate import check_int


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Top-1 of ``config.checkpoint`` on ``config.data.dataset``'s test split."""
  start = time.time()
  path = resolve_checkpoint(config.checkpoint)
  model, variables, metadata = ckpt.load_model(path)
  spec = get_model_spec(metadata['model'])
  test = loader.load_split(config.data.dataset, 'test', data_dir=config.data.data_dir,
                           idx_dir=config.data.idx_dir, download=config.data.download)
  limit = check_int(config.eval_limit, 'config.eval_limit') or len(test)
  images = loader.preprocess(config.data.dataset, test.images[:limit])
  if images.shape[1:] != spec.input_shape:
    raise ValueError(f'Checkpoint model {metadata["model"]} expects inputs {spec.input_shape}; '
                     f'{config.data.dataset} images are {images.shape[1:]}.')
  logits = predict_logits(model, variables, images, batch_size=config.batch_size)
  counts = totals(trace(model, variables, jnp.zeros((1,) + spec.input_shape)))
  result = {
      'model': metadata['model'],
      'method': 'fp32',
      'w_bits': 32,
      'a_bits': 32,
      'dataset': config.data.dataset,
      'split': 'test',
      'num_examples': int(limit),
      'top1_pct': round(top1_accuracy_pct(logits, test.labels[:limit]), 2),
      'params': counts['params'],
      'macs': counts['macs'],
      'checkpoint': path,
      'seconds': round(time.time() - start, 1),
      'device': describe_device(),
      'command': 'python ' + ' '.join(sys.argv),
  }
  with RunOutputs(workdir, 'evaluate', {'model': metadata['model']}) as out:
    atomic_write_json(out.path('results.json'), [result])
  print(f'{result["model"]}: test top-1 {result["top1_pct"]:.2f}% on {limit} images '
        f'({result["params"]:,} weight-layer params, {result["macs"]:,} MACs/image); '
        f'wrote {os.path.join(workdir, "results.json")}')
  return result
