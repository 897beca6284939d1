"""Baseline PTQ table: calibrated ranges only (the "no AdaQuant" row of later tables).

  python benchmarks/baseline_ptq.py          # both bundled models, ~25 min on 2 CPU cores

For each bundled model, bit option (W8A8, W6A6, W4A8, W4A4, W3A3), range method
(min/max, MSE, percentile) and first/last policy (8-bit, or all layers alike):
test top-1 on the full Fashion-MNIST test split with 1000 calibration images from
the train split. Writes results/baseline_ptq.json and results/baseline_ptq.md;
a run of a subset (``--models``, ``--bits``, ...) is merged into the existing files.
"""

from __future__ import annotations

import sys
import time


from absl import app, flags
from tqdm import tqdm

from common import POLICIES, describe_device, fashion_mnist, merge_records, write_results
import ptq_jax

FLAGS = flags.FLAGS
flags.DEFINE_list('models', ['resnet20', 'mobilenet_v2_fmnist'], 'Bundled models to run.')
flags.DEFINE_list('bits', ['8/8', '6/6', '4/8', '4/4', '3/3'], 'w_bits/a_bits options.')
flags.DEFINE_list('range_methods', ['minmax', 'mse', 'percentile'], 'Range methods.')
flags.DEFINE_integer('calib_size', 1000, 'Calibration images (train split).')
flags.DEFINE_integer('seed', 0, 'Calibration sample seed.')
flags.DEFINE_integer('test_limit', 0, 'Evaluate on the first N test images (0: all).')
flags.DEFINE_string('out', 'results', 'Output directory.')

NAME = 'baseline_ptq'
KEY_FIELDS = ('model', 'range_method', 'first_last', 'w_bits', 'a_bits', 'calib_size')


def main(_):
  command = 'python benchmarks/baseline_ptq.py ' + ' '.join(sys.argv[1:])
  train, test, test_images = fashion_mnist(FLAGS.test_limit)
  calib = ptq_jax.calibration_set('fashion_mnist', FLAGS.calib_size, FLAGS.seed, data=train)
  checkpoints = ptq_jax.bundled_checkpoints()
  records = []
  for model_name in FLAGS.models:
    key = f'{model_name}_fashion_mnist'
    if key not in checkpoints:
      raise SystemExit(f'No bundled checkpoint {key}; have {sorted(checkpoints)}.')
    model, variables, _ = ptq_jax.load_model(checkpoints[key])
    fp32 = ptq_jax.top1_accuracy_pct(ptq_jax.predict_logits(model, variables, test_images),
                                     test.labels)
    fp32_bits = None
    # Range method outermost: an interrupted run still has every bit width for min/max.
    runs = [(b, m, p) for m in FLAGS.range_methods for b in FLAGS.bits for p in POLICIES]
    for option, method, policy in tqdm(runs, desc=model_name):
      w_bits, a_bits = (int(v) for v in option.split('/'))
      start = time.time()
      qm = ptq_jax.quantize(model, variables, calib, w_bits=w_bits, a_bits=a_bits,
                            ranges=ptq_jax.RangeConfig(method), first_last_bits=POLICIES[policy])
      top1 = ptq_jax.top1_accuracy_pct(qm.predict(test_images), test.labels)
      fp32_bits = fp32_bits or qm.fp32_bits()
      records.append({
          'model': model_name, 'method': 'baseline_ptq', 'range_method': method,
          'first_last': policy, 'w_bits': w_bits, 'a_bits': a_bits,
          'calib_size': FLAGS.calib_size, 'top1_pct': round(top1, 2),
          'fp32_top1_pct': round(fp32, 2), 'delta_pct': round(top1 - fp32, 2),
          'size_pct_of_fp32': round(100 * qm.size_bits() / fp32_bits, 2),
          'test_images': len(test), 'seconds': round(time.time() - start, 1),
          'device': describe_device(), 'command': command})
      tqdm.write(f'{model_name} W{w_bits}A{a_bits} {method:10s} {policy:16s} '
                 f'top1 {top1:.2f} (fp32 {fp32:.2f})')
      save(records)


def save(records):
  """Merges this run's rows into results/ (called after every row, so an interrupted
  run keeps what it measured)."""
  write_results(
      FLAGS.out, NAME, merge_records(FLAGS.out, NAME, records, KEY_FIELDS),
      'Baseline PTQ (calibrated ranges, no AdaQuant)',
      columns=['model', 'w_bits', 'a_bits', 'range_method', 'first_last', 'top1_pct',
               'fp32_top1_pct', 'delta_pct', 'size_pct_of_fp32', 'calib_size', 'seconds',
               'device', 'command'],
      notes='Fashion-MNIST test top-1 of the bundled FP32 checkpoints quantized with '
            'per-channel asymmetric weights and per-tensor asymmetric layer inputs, ranges '
            f'calibrated on {FLAGS.calib_size} train images (seed {FLAGS.seed}). `first_last`: '
            'first and last layer kept at 8 bits (the paper) or quantized like the rest. '
            '`size_pct_of_fp32`: conv/dense weight bits relative to 32-bit floats.')


if __name__ == '__main__':
  app.run(main)
