"""How the AdaQuant defaults were chosen: learning-rate variants on a held-out split.

  python benchmarks/adaquant_tuning.py                       # ResNet-20, W4A4, parallel
  python benchmarks/adaquant_tuning.py --modes=parallel,sequential --variants=reference,default

Each variant is a set of AdaQuantConfig overrides (VARIANTS below). Selection uses
*validation* accuracy on 5000 train images outside the calibration set, never the
test split; test top-1 is recorded beside it. Rows merge into
results/adaquant_tuning.{json,md} by (model, mode, variant, iterations, device).
"""

from __future__ import annotations

import dataclasses
import sys
import time


import jax
import numpy as np
from absl import app, flags

from common import (POLICIES, describe_device, fashion_mnist, held_out, merge_records,
                    new_rows_from, write_results)
import ptq_jax

# Overrides of the AdaQuantConfig defaults. 'reference' is the reference code's setting.
VARIANTS = {
    'default': {},
    'reference': dict(lr_kernel=1e-5, lr_bias=1e-3, lr_w_quant=1e-3, lr_a_quant=1e-1,
                      lr_schedule='constant', iterations=1000),
    'reference_cosine': dict(lr_kernel=1e-5, lr_bias=1e-3, lr_w_quant=1e-3, lr_a_quant=1e-1,
                             lr_schedule='cosine', iterations=1000),
    'no_kernel': dict(lr_kernel=0.0, lr_bias=1e-3, lr_w_quant=1e-3, lr_a_quant=1e-1,
                      lr_schedule='constant', iterations=1000),
    'no_kernel_cosine': dict(lr_kernel=0.0, lr_bias=1e-3, lr_w_quant=1e-3, lr_a_quant=1e-1,
                             lr_schedule='cosine', iterations=1000),
    'input_quantizer_only': dict(lr_kernel=0.0, lr_bias=0.0, lr_w_quant=0.0, lr_a_quant=1e-1,
                                 lr_schedule='constant', iterations=1000),
    'no_input_quantizer': dict(lr_kernel=1e-5, lr_bias=1e-3, lr_w_quant=1e-3, lr_a_quant=0.0,
                               lr_schedule='constant', iterations=1000),
    'reference_200it': dict(lr_kernel=1e-5, lr_bias=1e-3, lr_w_quant=1e-3, lr_a_quant=1e-1,
                            lr_schedule='constant', iterations=200),
}

FLAGS = flags.FLAGS
flags.DEFINE_string('model', 'resnet20', 'Bundled model.')
flags.DEFINE_list('modes', ['parallel'], 'AdaQuant modes.')
flags.DEFINE_list('variants', list(VARIANTS), f'Variants, from {list(VARIANTS)}.')
flags.DEFINE_integer('w_bits', 4, 'Weight bits.')
flags.DEFINE_integer('a_bits', 4, 'Activation bits.')
flags.DEFINE_integer('calib_size', 1000, 'Calibration images.')
flags.DEFINE_integer('val_size', 5000, 'Held-out train images for validation.')
flags.DEFINE_integer('iterations', None, 'Override every variant\'s iterations (smoke tests).')
flags.DEFINE_integer('seed', 0, 'Calibration sample and AdaQuant seed.')
flags.DEFINE_string('out', 'results', 'Output directory.')
flags.DEFINE_list('merge_from', [], 'Only merge the rows of these output directories (e.g. '
                  'from another machine) into --out, then exit.')

NAME = 'adaquant_tuning'
KEY_FIELDS = ('model', 'method', 'variant', 'w_bits', 'a_bits', 'iterations', 'device')


def main(_):
  if FLAGS.merge_from:
    return save(new_rows_from(FLAGS.merge_from, FLAGS.out, NAME))
  command = 'python benchmarks/adaquant_tuning.py ' + ' '.join(sys.argv[1:])
  unknown = set(FLAGS.variants) - set(VARIANTS)
  if unknown:
    raise app.UsageError(f'Unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}.')
  train, test, test_images = fashion_mnist()
  model, variables, _ = ptq_jax.load_model(
      ptq_jax.bundled_checkpoints()[f'{FLAGS.model}_fashion_mnist'])
  calib = ptq_jax.calibration_set('fashion_mnist', FLAGS.calib_size, FLAGS.seed, data=train)
  val_images, val_labels = held_out(train, calib.indices, FLAGS.val_size, FLAGS.seed + 1)
  common = dict(w_bits=FLAGS.w_bits, a_bits=FLAGS.a_bits, first_last_bits=POLICIES['first_last_8bit'])
  records = []

  def record(method, variant, predict, seconds, **extra):
    records.append({
        'model': FLAGS.model, 'method': method, 'variant': variant, 'w_bits': FLAGS.w_bits,
        'a_bits': FLAGS.a_bits, 'calib_size': FLAGS.calib_size, **extra,
        'val_top1_pct': round(ptq_jax.top1_accuracy_pct(predict(val_images), val_labels), 2),
        'top1_pct': round(ptq_jax.top1_accuracy_pct(predict(test_images), test.labels), 2),
        'seconds': round(seconds, 1), 'device': describe_device(), 'command': command})
    print(records[-1], flush=True)
    save(records)

  start = time.time()
  base = ptq_jax.quantize(model, variables, calib, **common)
  record('baseline_ptq', '-', base.predict, time.time() - start, iterations=0)
  for mode in FLAGS.modes:
    for variant in FLAGS.variants:
      config = ptq_jax.AdaQuantConfig(**VARIANTS[variant])
      if FLAGS.iterations is not None:
        config = dataclasses.replace(config, iterations=FLAGS.iterations)
      start = time.time()
      qm = ptq_jax.quantize(model, variables, calib, method='adaquant', mode=mode,
                            adaquant=config, key=jax.random.key(FLAGS.seed), progress=False,
                            **common)
      rel = [r['rel_error_after'] / max(r['rel_error_before'], 1e-30) for r in qm.layer_reports]
      record(f'adaquant_{mode}', variant, qm.predict, time.time() - start,
             iterations=config.iterations, lr_kernel=config.lr_kernel, lr_bias=config.lr_bias,
             lr_w_quant=config.lr_w_quant, lr_a_quant=config.lr_a_quant,
             lr_schedule=config.lr_schedule, mean_layer_error_ratio=round(float(np.mean(rel)), 4))


def save(records) -> None:
  write_results(FLAGS.out, NAME, merge_records(FLAGS.out, NAME, records, KEY_FIELDS),
                'AdaQuant learning-rate variants (held-out validation)',
                columns=['model', 'method', 'variant', 'w_bits', 'a_bits', 'calib_size',
                         'iterations', 'lr_kernel', 'lr_bias', 'lr_w_quant', 'lr_a_quant',
                         'lr_schedule', 'mean_layer_error_ratio', 'val_top1_pct', 'top1_pct',
                         'seconds', 'device', 'command'],
                notes='`val_top1_pct`: 5000 train images outside the calibration set (used '
                      'to choose the defaults); `top1_pct`: the test split (reported, not '
                      'used for choosing). First and last layer 8-bit. '
                      '`mean_layer_error_ratio`: mean over layers of the relative '
                      'reconstruction error after / before.')


if __name__ == '__main__':
  app.run(main)
