"""FP32 reference table: each bundled model's test top-1, parameters and MACs.

  python benchmarks/fp32.py            # writes results/fp32.json and results/fp32.md

Also lists the ImageNet-shape models (no bundled weights: parameters and MACs only).
"""

from __future__ import annotations

import time


import jax
import jax.numpy as jnp
from absl import app, flags

from common import describe_device, write_results
from ptq_jax import checkpoint as ckpt
from ptq_jax.bundled import bundled_checkpoints
from ptq_jax.data import loader
from ptq_jax.evaluation import predict_logits, top1_accuracy_pct
from ptq_jax.models import MODELS, create_model, init_variables
from ptq_jax.trace import totals, trace

flags.DEFINE_string('out', 'results', 'Directory for fp32.json / fp32.md.')
FLAGS = flags.FLAGS
COMMAND = 'python benchmarks/fp32.py'


def main(_):
  records = []
  test = loader.load_split('fashion_mnist', 'test')
  images = loader.preprocess('fashion_mnist', test.images)
  trained = set()
  for name, path in bundled_checkpoints().items():
    start = time.time()
    model, variables, meta = ckpt.load_model(path)
    spec = MODELS[meta['model']]
    logits = predict_logits(model, variables, images)
    counts = totals(trace(model, variables, jnp.zeros((1,) + spec.input_shape)))
    trained.add(meta['model'])
    records.append({'model': meta['model'], 'method': 'fp32', 'w_bits': 32, 'a_bits': 32,
                    'calib_size': 0, 'dataset': meta['dataset'], 'input_shape': 'x'.join(map(str, spec.input_shape)),
                    'top1_pct': round(top1_accuracy_pct(logits, test.labels), 2),
                    'test_images': len(test), 'params': counts['params'],
                    'macs': counts['macs'], 'size_mb_fp32': round(counts['params'] * 4 / 2**20, 3),
                    'seconds': round(time.time() - start, 1), 'device': describe_device(),
                    'command': COMMAND})
  for name, spec in MODELS.items():
    if name in trained:
      continue
    model = create_model(name)
    x = jnp.zeros((1,) + spec.input_shape)
    variables = jax.eval_shape(lambda: init_variables(name, jax.random.key(0)))
    counts = totals(trace(model, variables, x))
    records.append({'model': name, 'method': 'fp32', 'w_bits': 32, 'a_bits': 32,
                    'calib_size': 0,
                    'dataset': ('imagenet2012' if spec.input_shape[-1] == 3 else 'fashion_mnist')
                               + ' (no weights bundled)',
                    'input_shape': 'x'.join(map(str, spec.input_shape)), 'top1_pct': None,
                    'test_images': 0, 'params': counts['params'], 'macs': counts['macs'],
                    'size_mb_fp32': round(counts['params'] * 4 / 2**20, 3), 'seconds': 0.0,
                    'device': describe_device(), 'command': COMMAND})
  write_results(FLAGS.out, 'fp32', records, 'FP32 reference models',
                notes='Test top-1 on the full Fashion-MNIST test split (10,000 images) for the '
                      'bundled checkpoints. `params` and `macs` count conv/dense weight layers '
                      '(kernels and biases; BatchNorm excluded) per image at the input shape. '
                      f'Made by `{COMMAND}`.')
  for r in records:
    print(r['model'], r['top1_pct'], r['params'], r['macs'])


if __name__ == '__main__':
  app.run(main)
