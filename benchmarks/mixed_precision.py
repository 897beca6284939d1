"""Mixed precision by integer programming: budget sweep against uniform precision.

  python benchmarks/mixed_precision.py                              # both models, AdaQuant options
  python benchmarks/mixed_precision.py --models=resnet20 --method=ptq   # light: baseline ranges

For each model: every layer's state at every option (parallel AdaQuant, or baseline
ranges with --method=ptq), the label-free sensitivity table on 1000 calibration
images, then the integer program at each weight-size budget (% of FP32) and each
BOPs budget (% of FP32 32x32-bit operations) and each joint size + BOPs budget (a size
budget alone lets activations take 8 bits), the mixed model's test top-1, and its
measured calibration loss (KL from the FP outputs) beside the predicted one (sum of
the table's entries). Uniform W8A8 / W6A6 / W4A4 / W3A3 rows (every layer alike,
built from the same states) are the points to beat. Writes
results/mixed_precision.{json,md,png}; rows merge by (model, method, option_method,
budget).
"""

from __future__ import annotations

import os
import sys
import time


import jax
import numpy as np
from absl import app, flags

from common import (concurrency_fields, describe_device, fashion_mnist, merge_records,
                    new_rows_from, write_results)
import ptq_jax
from ptq_jax.quant.quantizer import parse_option
from ptq_jax.stages import allocation as alloc
from ptq_jax.stages.bias_tuning import kl_to_teacher

FLAGS = flags.FLAGS
flags.DEFINE_list('models', ['resnet20', 'mobilenet_v2_fmnist'], 'Bundled models.')
flags.DEFINE_enum('method', 'adaquant', ['ptq', 'adaquant'], 'How each option\'s state is made.')
flags.DEFINE_list('options', ['W8A8', 'W6A6', 'W4A8', 'W4A4', 'W3A3', 'W2A4'], 'Bit options.')
flags.DEFINE_list('size_pcts', ['12.5', '13', '16', '20', '25'], 'Weight-size budgets, % of FP32.')
flags.DEFINE_list('bops_pcts', ['1.2', '1.56', '2.5', '4', '6.25'], 'BOPs budgets, % of FP32.')
flags.DEFINE_list('joint_pcts', ['13:1.56', '16:2.5'], 'Joint budgets SIZE:BOPS, % of FP32 '
                  '(a size budget alone lets activations take 8 bits).')
flags.DEFINE_list('uniform', ['W8A8', 'W6A6', 'W4A4', 'W3A3'], 'Uniform reference points.')
flags.DEFINE_integer('calib_size', 1000, 'Calibration images.')
flags.DEFINE_integer('iterations', None, 'AdaQuant iterations (default: the library\'s).')
flags.DEFINE_integer('seed', 0, 'Calibration sample and AdaQuant seed.')
flags.DEFINE_integer('test_limit', 0, 'Evaluate on the first N test images (0: all).')
flags.DEFINE_string('cache_dir', './workdir/sensitivity_cache', 'Sensitivity-table cache.')
flags.DEFINE_string('out', 'results', 'Output directory.')
flags.DEFINE_bool('states_only', False, 'Only compute (and cache in --cache_dir) the option '
                  'states and the sensitivity table, then exit: e.g. on a machine without '
                  'python-mip; a later run solves from the cache.')
flags.DEFINE_list('merge_from', [], 'Only merge the rows of these output directories (e.g. '
                  'concurrent GPU lanes) into --out, then exit.')

NAME = 'mixed_precision'
KEY_FIELDS = ('model', 'method', 'option_method', 'budget', 'device')
COLUMNS = ['model', 'method', 'option_method', 'budget', 'w_bits', 'a_bits', 'calib_size',
           'size_pct_of_fp32', 'bops_pct_of_fp32', 'predicted_loss', 'measured_loss',
           'top1_pct', 'fp32_top1_pct', 'delta_pct', 'layers_per_option', 'solve_seconds',
           'device', 'command']


def main(_):
  if FLAGS.merge_from:
    return save(new_rows_from(FLAGS.merge_from, FLAGS.out, NAME))
  command = 'python benchmarks/mixed_precision.py ' + ' '.join(sys.argv[1:])
  train, test, test_images = fashion_mnist(FLAGS.test_limit)
  records = []
  for model_name in FLAGS.models:
    model, variables, _ = ptq_jax.load_model(
        ptq_jax.bundled_checkpoints()[f'{model_name}_fashion_mnist'])
    calib = ptq_jax.calibration_set('fashion_mnist', FLAGS.calib_size, FLAGS.seed, data=train)
    fp32_logits = ptq_jax.predict_logits(model, variables, test_images)
    fp32 = ptq_jax.top1_accuracy_pct(fp32_logits, test.labels)
    config = None
    if FLAGS.method == 'adaquant' and FLAGS.iterations is not None:
      config = ptq_jax.AdaQuantConfig(iterations=FLAGS.iterations)
    start = time.time()
    mp = ptq_jax.mixed_precision(model, variables, calib, options=FLAGS.options,
                                 method=FLAGS.method, adaquant=config,
                                 key=jax.random.key(FLAGS.seed), cache_dir=FLAGS.cache_dir,
                                 model_name=model_name, progress=False)
    print(f'{model_name}: option states {mp.timings["option_states_seconds"]:.0f}s, '
          f'sensitivity {mp.timings["sensitivity_seconds"]:.0f}s', flush=True)
    if FLAGS.states_only:
      continue
    fp_calib = ptq_jax.predict_logits(model, variables, calib.images)

    def record(method, budget, qm, allocation, **extra):
      q_calib = qm.predict(calib.images)
      top1 = ptq_jax.top1_accuracy_pct(qm.predict(test_images), test.labels)
      records.append({
          'model': model_name, 'method': method, 'option_method': FLAGS.method,
          'budget': budget, 'w_bits': extra.pop('w_bits', 'mixed'),
          'a_bits': extra.pop('a_bits', 'mixed'), 'calib_size': len(calib),
          'size_pct_of_fp32': round(allocation.size_pct_of_fp32, 3),
          'bops_pct_of_fp32': round(allocation.bops_pct_of_fp32, 3),
          'predicted_loss': round(allocation.predicted_loss, 5),
          'measured_loss': round(float(kl_to_teacher(fp_calib, q_calib)), 5),
          'top1_pct': round(top1, 2), 'fp32_top1_pct': round(fp32, 2),
          'delta_pct': round(top1 - fp32, 2),
          'layers_per_option': ' '.join(f'{k}:{v}' for k, v in sorted(allocation.counts().items())),
          **extra, **concurrency_fields(), 'sensitivity_seconds': round(mp.table.seconds, 1),
          'option_states_seconds': round(mp.timings['option_states_seconds'], 1),
          'from_cache': mp.from_cache,
          'device': describe_device(), 'command': command})
      print({k: records[-1][k] for k in ('model', 'method', 'budget', 'size_pct_of_fp32',
                                         'bops_pct_of_fp32', 'predicted_loss',
                                         'measured_loss', 'top1_pct')}, flush=True)

    for name in FLAGS.uniform:
      option = parse_option(name)
      allocation = mp.uniform(option)
      record('uniform', name, mp.build(allocation), allocation, w_bits=option[0],
             a_bits=option[1])
    budgets = [(f'size<={float(v):g}%', {'size_pct': float(v)}) for v in FLAGS.size_pcts]
    budgets += [(f'bops<={float(v):g}%', {'bops_pct': float(v)}) for v in FLAGS.bops_pcts]
    for joint in FLAGS.joint_pcts:
      size, bops = (float(v) for v in joint.split(':'))
      budgets.append((f'size<={size:g}%,bops<={bops:g}%', {'size_pct': size, 'bops_pct': bops}))
    for name, budget in budgets:
      try:
        allocation = mp.solve(**budget)
      except alloc.InfeasibleBudgetError as e:
        print(f'{model_name} {name}: {e}', flush=True)
        continue
      record('mixed_precision', name, mp.build(allocation), allocation,
             solve_seconds=round(allocation.solve_seconds, 3))
    print(f'{model_name} done in {time.time() - start:.0f}s', flush=True)
    save(records)  # after every model: an interrupted run keeps what it measured


def save(new_records):
  records = merge_records(FLAGS.out, NAME, new_records, KEY_FIELDS)
  mixed = [r for r in records if r['method'] == 'mixed_precision']
  corr = {}
  for model_name, method in sorted({(r['model'], r['option_method']) for r in mixed}):
    rows = [r for r in mixed if r['model'] == model_name and r['option_method'] == method]
    if len(rows) > 2:
      corr[f'{model_name} ({method})'] = float(np.corrcoef(
          [r['predicted_loss'] for r in rows], [r['measured_loss'] for r in rows])[0, 1])
  write_results(FLAGS.out, NAME, records, 'Mixed precision by integer programming',
                columns=COLUMNS,
                notes='Each option\'s state for every layer comes from parallel AdaQuant '
                      '(`option_method` adaquant) or calibrated min/max ranges (ptq). '
                      '`predicted_loss`: the sum of the sensitivity table\'s entries for the '
                      'chosen options; `measured_loss`: KL(FP || mixed) on the calibration '
                      'set. Uniform rows put every layer, first and last included, at one '
                      'option. Pearson correlation of predicted and measured loss over the '
                      'budget rows: ' + (', '.join(f'{m} {c:.3f}' for m, c in corr.items())
                                          or 'n/a') + '. Plot: results/mixed_precision.png.')
  plot(records, os.path.join(FLAGS.out, f'{NAME}.png'))


def plot(records, path):
  """Accuracy vs size and vs BOPs, and predicted vs measured loss, per model."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  models = sorted({r['model'] for r in records})
  fig, axes = plt.subplots(len(models), 3, figsize=(15, 4.2 * len(models)), squeeze=False)
  for row, model_name in zip(axes, models):
    mine = [r for r in records if r['model'] == model_name]
    for ax, x_key, label in ((row[0], 'size_pct_of_fp32', 'weight size, % of FP32'),
                             (row[1], 'bops_pct_of_fp32', 'BOPs, % of FP32')):
      for method, marker in (('mixed_precision', 'o-'), ('uniform', 's')):
        for option_method in sorted({r['option_method'] for r in mine}):
          pts = sorted((r[x_key], r['top1_pct']) for r in mine
                       if r['method'] == method and r['option_method'] == option_method
                       and (method == 'uniform' or (r['budget'].startswith(x_key.split('_')[0])
                                                    and ',' not in r['budget'])))
          if pts:
            ax.plot(*zip(*pts), marker, label=f'{method} ({option_method})', alpha=0.8)
      fp32 = mine[0]['fp32_top1_pct']
      ax.axhline(fp32, color='k', ls='--', lw=1, label='FP32')
      ax.set_xlabel(label)
      ax.set_ylabel('test top-1 (%)')
      ax.set_title(model_name)
      ax.legend(fontsize=7)
    mixed = [r for r in mine if r['method'] == 'mixed_precision']
    if mixed:
      row[2].scatter([r['predicted_loss'] for r in mixed], [r['measured_loss'] for r in mixed])
      lim = max(max(r['predicted_loss'] for r in mixed), max(r['measured_loss'] for r in mixed))
      row[2].plot([0, lim], [0, lim], 'k--', lw=1)
    row[2].set_xlabel('predicted loss (sum of dL)')
    row[2].set_ylabel('measured KL on calibration set')
    row[2].set_title(f'{model_name}: predicted vs measured')
  fig.tight_layout()
  from ptq_jax.checkpoint import atomic_write_bytes
  import io
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=110)
  plt.close(fig)
  atomic_write_bytes(path, buffer.getvalue())


if __name__ == '__main__':
  app.run(main)
