"""AdaQuant accuracy table: FP32, baseline PTQ, AdaQuant parallel and sequential, and
KD fine-tuning of all weights, with calibration-set and test-set accuracy.

  python benchmarks/adaquant.py                                  # full grid (hours on CPU)
  python benchmarks/adaquant.py --models=resnet20 --bits=4/4 --calib_sizes=1000 \\
      --policies=first_last_8bit                                 # the headline row

Rows are merged into results/adaquant.{json,md} by (model, method, bits, policy,
calibration size), so the grid can be filled in several runs. Calibration-set
accuracy uses the labels of the calibration images (for measurement only: no
method sees them). Peak host memory is the process's maximum resident set size.
"""

from __future__ import annotations

import os
import resource
import sys
import time


import jax
from absl import app, flags

from common import (POLICIES, concurrency_fields, describe_device, fashion_mnist, merge_records,
                    new_rows_from, read_results, write_results)
import ptq_jax
from ptq_jax.stages.bias_tuning import kd_tune

FLAGS = flags.FLAGS
flags.DEFINE_list('models', ['resnet20', 'mobilenet_v2_fmnist'], 'Bundled models.')
flags.DEFINE_list('bits', ['4/4', '3/3', '2/4'], 'w_bits/a_bits options.')
flags.DEFINE_list('policies', ['first_last_8bit', 'all_layers_alike'], 'First/last policies.')
flags.DEFINE_list('calib_sizes', ['100', '500', '1000'], 'Calibration set sizes.')
flags.DEFINE_list('modes', ['parallel', 'sequential'], 'AdaQuant modes.')
flags.DEFINE_integer('iterations', None, 'AdaQuant iterations per layer (default: the '
                     'library default).')
flags.DEFINE_bool('progress', False, 'Show per-layer progress bars.')
flags.DEFINE_bool('skip_existing', False, 'Skip cells whose rows are already in the output '
                  'file, from any device: resume an interrupted grid, or fill in what '
                  'another machine has not measured.')
flags.DEFINE_integer('finetune_steps', 800, 'KD fine-tuning steps (0: skip that row).')
flags.DEFINE_integer('seed', 0, 'Calibration sample and AdaQuant seed.')
flags.DEFINE_integer('test_limit', 0, 'Evaluate on the first N test images (0: all).')
flags.DEFINE_string('out', 'results', 'Output directory.')
flags.DEFINE_list('merge_from', [], 'Only merge the rows of these output directories (e.g. '
                  'concurrent GPU lanes) into --out, then exit.')

NAME = 'adaquant'
KEY_FIELDS = ('model', 'method', 'w_bits', 'a_bits', 'first_last', 'calib_size', 'device')


def peak_rss_mb() -> float:
  return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def peak_device_mb() -> dict:
  """{'peak_device_mb': ...} on an accelerator that reports it, else {}."""
  device = jax.devices()[0]
  stats = device.memory_stats() if device.platform != 'cpu' else None
  peak = (stats or {}).get('peak_bytes_in_use')
  return {'peak_device_mb': round(peak / 2**20)} if peak else {}


def main(_):
  if FLAGS.merge_from:
    return save(new_rows_from(FLAGS.merge_from, FLAGS.out, NAME))
  command = 'python benchmarks/adaquant.py ' + ' '.join(sys.argv[1:])
  train, test, test_images = fashion_mnist(FLAGS.test_limit)
  records = []

  def record(model_name, method, w_bits, a_bits, policy, calib, qpredict, fp32, seconds,
             **extra):
    top1 = ptq_jax.top1_accuracy_pct(qpredict(test_images), test.labels)
    calib_top1 = ptq_jax.top1_accuracy_pct(qpredict(calib.images), train.labels[calib.indices])
    records.append({'model': model_name, 'method': method, 'w_bits': w_bits, 'a_bits': a_bits,
                    'first_last': policy, 'calib_size': len(calib), 'top1_pct': round(top1, 2),
                    'calib_top1_pct': round(calib_top1, 2), 'fp32_top1_pct': round(fp32, 2),
                    'delta_pct': round(top1 - fp32, 2), 'seconds': round(seconds, 1),
                    **extra, 'peak_rss_mb': peak_rss_mb(), **peak_device_mb(),
                    **concurrency_fields(),
                    'device': describe_device(), 'command': command})
    save(records)
    print(f'{model_name} {method:20s} W{w_bits}A{a_bits} {policy:16s} n={len(calib):5d} '
          f'test {top1:6.2f} calib {calib_top1:6.2f} (fp32 {fp32:.2f}) {seconds:.0f}s', flush=True)

  for model_name in FLAGS.models:
    model, variables, _ = ptq_jax.load_model(
        ptq_jax.bundled_checkpoints()[f'{model_name}_fashion_mnist'])
    fp32_predict = lambda x: ptq_jax.predict_logits(model, variables, x)
    fp32 = ptq_jax.top1_accuracy_pct(fp32_predict(test_images), test.labels)
    calibs = {n: ptq_jax.calibration_set('fashion_mnist', n, FLAGS.seed, data=train)
              for n in sorted((int(v) for v in FLAGS.calib_sizes), reverse=True)}
    for calib in calibs.values():
      record(model_name, 'fp32', 32, 32, '-', calib, fp32_predict, fp32, 0.0)
    # Policy, bits, then calibration size (largest first): an interrupted run has the
    # headline rows (first/last 8-bit, W4A4, 1000 images) first.
    for policy in FLAGS.policies:
      for option in FLAGS.bits:
        w_bits, a_bits = (int(v) for v in option.split('/'))
        for calib in calibs.values():
          if FLAGS.skip_existing and cell_done(model_name, w_bits, a_bits, policy, len(calib)):
            print(f'{model_name} W{w_bits}A{a_bits} {policy} n={len(calib)}: already measured')
            continue
          common = dict(w_bits=w_bits, a_bits=a_bits, first_last_bits=POLICIES[policy])
          start = time.time()
          base = ptq_jax.quantize(model, variables, calib, **common)
          record(model_name, 'baseline_ptq', w_bits, a_bits, policy, calib, base.predict, fp32,
                 time.time() - start)
          for mode in FLAGS.modes:
            start = time.time()
            qm = ptq_jax.quantize(model, variables, calib, method='adaquant', mode=mode,
                                  adaquant=adaquant_config(), key=jax.random.key(FLAGS.seed),
                                  progress=FLAGS.progress, **common)
            rel = [r['rel_error_after'] / max(r['rel_error_before'], 1e-30)
                   for r in qm.layer_reports]
            record(model_name, f'adaquant_{mode}', w_bits, a_bits, policy, calib, qm.predict,
                   fp32, time.time() - start, iterations=adaquant_config().iterations,
                   mean_layer_error_ratio=round(sum(rel) / len(rel), 4))
          if FLAGS.finetune_steps:
            start = time.time()
            state, _ = kd_tune(ptq_jax.stages.prepare(model, variables, calib.images),
                               base.qstate, target='all', steps=FLAGS.finetune_steps,
                               key=jax.random.key(FLAGS.seed))
            tuned = ptq_jax.QuantizedModel(model, base.variables, base.layers, state,
                                           base.settings, base.input_shape)
            record(model_name, 'kd_finetune_all', w_bits, a_bits, policy, calib, tuned.predict,
                   fp32, time.time() - start, iterations=FLAGS.finetune_steps)


def cell_done(model_name, w_bits, a_bits, policy, calib_size) -> bool:
  """Whether every method of this grid cell has a row already (from any device: the
  grid is filled in on whichever machine is at hand)."""
  path = os.path.join(FLAGS.out, f'{NAME}.json')
  if not os.path.exists(path):
    return False
  methods = {'baseline_ptq', *(f'adaquant_{m}' for m in FLAGS.modes)}
  if FLAGS.finetune_steps:
    methods.add('kd_finetune_all')
  have = {r['method'] for r in read_results(FLAGS.out, NAME)
          if (r['model'], r['w_bits'], r['a_bits'], r['first_last'], r['calib_size'])
          == (model_name, w_bits, a_bits, policy, calib_size)}
  return methods <= have


def save(records):
  """Merges this run's rows into results/ (after every row: an interrupted run keeps
  what it measured)."""
  write_results(
      FLAGS.out, NAME, merge_records(FLAGS.out, NAME, records, KEY_FIELDS),
      'AdaQuant on the bundled Fashion-MNIST models',
      columns=['model', 'method', 'w_bits', 'a_bits', 'first_last', 'calib_size', 'top1_pct',
               'calib_top1_pct', 'fp32_top1_pct', 'delta_pct', 'iterations', 'seconds',
               'peak_rss_mb', 'peak_device_mb', 'concurrent_processes', 'device', 'command'],
      notes='Test top-1 on the Fashion-MNIST test split and top-1 on the calibration images '
            '(train split), for FP32, baseline PTQ (min/max ranges), AdaQuant (the '
            'library defaults, minibatch 50) in parallel and sequential mode, and KD '
            'fine-tuning of all weights from the baseline (Adam 1e-4, minibatch 50) as the '
            'overfitting comparison. `first_last`: first and last layer 8-bit or like the '
            'rest. `seconds`: wall time of the method (compilation included). '
            '`peak_rss_mb`: the process\'s peak host memory so far; `peak_device_mb`: peak '
            'accelerator memory so far (GPU only). `concurrent_processes`: rows measured '
            'while that many benchmark processes shared the GPU (throughput, not solo '
            'timings).')


def adaquant_config() -> ptq_jax.AdaQuantConfig:
  """The library defaults, with any overrides given on the command line."""
  overrides = {}
  if FLAGS.iterations is not None:
    overrides['iterations'] = FLAGS.iterations
  return ptq_jax.AdaQuantConfig(**overrides)


if __name__ == '__main__':
  app.run(main)
