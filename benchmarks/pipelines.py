"""Paper-style ablation of the pipelines: each stage's contribution, wall time, and QAT.

  python benchmarks/pipelines.py                                   # both models
  python benchmarks/pipelines.py --models=resnet20 --runs=sequential --qat_epochs=0

Rows: FP32; at W4A4 (first and last layer 8-bit unless --first_last_bits says otherwise;
min/max ranges unless --range_method) each stage of the fixed-bit runs in
turn (ranges = baseline PTQ, + AdaQuant (sequential or parallel), + BN tuning, + bias
tuning); at 13% of the FP32 weight size each stage of `light@13` and `advanced@13`
(mixed precision; the advanced runs share one set of parallel-AdaQuant option states);
and quantization-aware training (QAT) of the same W4A4 model on the full labelled
training set, for the paper's speed comparison. Test top-1, calibration-set top-1 and
seconds per stage. Writes results/pipelines.{json,md}; rows merge by (model, run,
stage, device).
"""

from __future__ import annotations

import sys
import time


import jax
from absl import app, flags

from common import (concurrency_fields, describe_device, fashion_mnist, held_out, merge_records,
                    new_rows_from, write_results)
import ptq_jax
from ptq_jax.data import loader
from ptq_jax.pipelines import parse_run, run_label
from ptq_jax.qat import QATConfig, qat_train
from ptq_jax.quant.quantizer import option_name

FLAGS = flags.FLAGS
flags.DEFINE_list('models', ['resnet20', 'mobilenet_v2_fmnist'], 'Bundled models.')
flags.DEFINE_list('runs', ['sequential', 'light', 'advanced', 'light@13', 'advanced@13'],
                  'Pipeline runs: NAME (fixed bits) or NAME@SIZE (mixed, % of FP32 size).')
flags.DEFINE_integer('w_bits', 4, 'Weight bits of the fixed-bit runs and QAT.')
flags.DEFINE_integer('a_bits', 4, 'Activation bits of the fixed-bit runs and QAT.')
flags.DEFINE_list('options', ['W8A8', 'W6A6', 'W4A8', 'W4A4', 'W3A3', 'W2A4'],
                  'Bit options of the mixed runs.')
flags.DEFINE_integer('first_last_bits', 8, 'Bits of the first and last layer of the fixed-bit '
                     'runs; 0: the same as the others ("alike").')
flags.DEFINE_enum('range_method', 'minmax', ['minmax', 'mse', 'percentile'],
                  'Range initialisation (run_pipeline(ranges=)).')
flags.DEFINE_integer('calib_size', 1000, 'Calibration images.')
flags.DEFINE_integer('iterations', None, 'AdaQuant iterations (default: the library\'s).')
flags.DEFINE_enum('unit', 'layer', ['layer', 'block'], 'AdaQuant unit (AdaQuantConfig.unit).')
flags.DEFINE_enum('rounding', 'free', ['free', 'learned'], 'AdaQuant weight updates.')
flags.DEFINE_integer('bias_steps', 800, 'KD bias-tuning steps.')
flags.DEFINE_bool('stage_guard', False, 'Keep AdaQuant, BN and bias tuning only if they lower '
                  'the KL to FP32 on the calibration images (run_pipeline(stage_guard=True)).')
flags.DEFINE_float('qat_epochs', 2.0, 'QAT epochs over the 60,000 training images (0: skip).')
flags.DEFINE_integer('qat_train_limit', 0, 'QAT on the first N training images (0: all).')
flags.DEFINE_integer('val_size', 5000, 'Held-out train images (outside the calibration set) '
                     'each stage is also scored on: the split a default is chosen on.')
flags.DEFINE_integer('seed', 0, 'Calibration sample and PRNG seed.')
flags.DEFINE_integer('test_limit', 0, 'Evaluate on the first N test images (0: all).')
flags.DEFINE_string('cache_dir', './workdir/sensitivity_cache', 'Mixed-precision cache.')
flags.DEFINE_string('out', 'results', 'Output directory.')
flags.DEFINE_list('merge_from', [], 'Only merge the rows of these output directories (e.g. '
                  'concurrent GPU lanes) into --out, then exit.')

NAME = 'pipelines'
KEY_FIELDS = ('model', 'run', 'stage', 'device')


def save(new_records):
  write_results(FLAGS.out, NAME, merge_records(FLAGS.out, NAME, new_records, KEY_FIELDS),
                'Pipelines, stage by stage, and QAT',
                columns=['model', 'run', 'stage', 'w_bits', 'a_bits', 'calib_size',
                         'size_pct_of_fp32', 'top1_pct', 'val_top1_pct', 'calib_top1_pct',
                         'fp32_top1_pct', 'fp32_val_top1_pct',
                         'delta_pct', 'seconds', 'options', 'states_from', 'stage_kept',
                         'qat_epochs', 'concurrent_processes',
                         'device', 'command'],
                notes='Each row is the model after that stage (stages are cumulative within '
                      'a run). `val_top1_pct`: on held-out train images outside the '
                      'calibration set (5000 unless the command sets --val_size; where '
                      'defaults are chosen), `top1_pct` on the test '
                      'split. `seconds`: that stage\'s wall time on the device named. Fixed-'
                      'bit runs: W4A4, first and last layer 8-bit, min/max ranges (sequential: '
                      'sequential AdaQuant; advanced: parallel AdaQuant, the W4A4 and W8A8 '
                      'option states), unless the run label says otherwise ("first/last '
                      'alike": those layers at the same bits; "mse ranges"; "N iterations" '
                      'of AdaQuant per layer or block; "N bias steps" of KD bias tuning '
                      'instead of 800). NAME N%: mixed precision at N% of the FP32 weight '
                      'size (the '
                      'mixed_precision stage includes computing every option\'s states and '
                      'the sensitivity table unless they came from the cache or an earlier '
                      'run; see results/mixed_precision.md): `options` lists them, '
                      '`states_from` whether this run computed them, read them from '
                      'the cache or reused an earlier run\'s). qat: quantization-aware '
                      'training from the baseline-PTQ model on the labelled training set '
                      '(`calib_size` = training images; `seconds` includes the ranges). '
                      '`concurrent_processes`: measured while that many benchmark processes '
                      'shared the GPU (throughput, not solo timings).')


def main(_):
  if FLAGS.merge_from:
    return save(new_rows_from(FLAGS.merge_from, FLAGS.out, NAME))
  command = 'python benchmarks/pipelines.py ' + ' '.join(sys.argv[1:])
  runs = [parse_run(r) for r in FLAGS.runs]
  train, test, test_images = fashion_mnist(FLAGS.test_limit)
  records = []
  settings = dict(unit=FLAGS.unit, rounding=FLAGS.rounding)
  if FLAGS.iterations is not None:
    settings['iterations'] = FLAGS.iterations
  adaquant = ptq_jax.AdaQuantConfig(**settings)
  # Runs with other than the paper's AdaQuant say so in their label (and row key).
  variant = '' if (FLAGS.unit, FLAGS.rounding) == ('layer', 'free') else (
      f', {FLAGS.unit}-wise' + (', learned rounding' if FLAGS.rounding == 'learned' else ''))
  variant += ', stage guard' if FLAGS.stage_guard else ''
  variant += ', first/last alike' if FLAGS.first_last_bits == 0 else (
      f', first/last {FLAGS.first_last_bits}-bit' if FLAGS.first_last_bits != 8 else '')
  variant += f', {FLAGS.range_method} ranges' if FLAGS.range_method != 'minmax' else ''
  variant += f', {FLAGS.iterations} iterations' if FLAGS.iterations is not None else ''
  variant += f', {FLAGS.bias_steps} bias steps' if FLAGS.bias_steps != 800 else ''
  first_last = FLAGS.first_last_bits or None
  ranges = ptq_jax.RangeConfig(FLAGS.range_method)

  for model_name in FLAGS.models:
    model, variables, _ = ptq_jax.load_model(
        ptq_jax.bundled_checkpoints()[f'{model_name}_fashion_mnist'])
    calib = ptq_jax.calibration_set('fashion_mnist', FLAGS.calib_size, FLAGS.seed, data=train)
    calib_labels = train.labels[calib.indices]
    val_images, val_labels = held_out(train, calib.indices, FLAGS.val_size, FLAGS.seed + 1)
    val_top1 = lambda logits: round(ptq_jax.top1_accuracy_pct(logits, val_labels), 2)
    fp32 = ptq_jax.top1_accuracy_pct(ptq_jax.predict_logits(model, variables, test_images),
                                     test.labels)
    fp32_val = val_top1(ptq_jax.predict_logits(model, variables, val_images))
    base = {'model': model_name, 'calib_size': len(calib), 'fp32_top1_pct': round(fp32, 2),
            'fp32_val_top1_pct': fp32_val,
            **concurrency_fields(), 'device': describe_device(), 'command': command}

    def record(run, stage, qm, seconds, mixed, **extra):
      top1 = ptq_jax.top1_accuracy_pct(qm.predict(test_images), test.labels)
      fp32_bits = qm.fp32_bits()
      records.append({
          **base, 'run': run, 'stage': stage,
          'w_bits': 'mixed' if mixed else FLAGS.w_bits,
          'a_bits': 'mixed' if mixed else FLAGS.a_bits,
          'size_pct_of_fp32': round(100 * qm.size_bits() / fp32_bits, 2),
          'top1_pct': round(top1, 2), 'val_top1_pct': val_top1(qm.predict(val_images)),
          'calib_top1_pct': round(ptq_jax.top1_accuracy_pct(qm.predict(calib.images),
                                                            calib_labels), 2),
          'delta_pct': round(top1 - fp32, 2), 'seconds': round(seconds, 1), **extra})
      print({k: records[-1][k] for k in ('model', 'run', 'stage', 'size_pct_of_fp32',
                                         'top1_pct', 'seconds')}, flush=True)
      save(records)

    fp32_calib = ptq_jax.top1_accuracy_pct(ptq_jax.predict_logits(model, variables,
                                                                  calib.images), calib_labels)
    records.append({**base, 'run': 'fp32', 'stage': 'fp32', 'w_bits': 32, 'a_bits': 32,
                    'size_pct_of_fp32': 100.0, 'top1_pct': round(fp32, 2),
                    'val_top1_pct': fp32_val,
                    'calib_top1_pct': round(fp32_calib, 2), 'delta_pct': 0.0, 'seconds': 0.0})
    save(records)
    shared = {}
    for pipeline, size_pct in runs:
      reused = pipeline in shared
      result = ptq_jax.run_pipeline(
          model, variables, calib, pipeline, w_bits=FLAGS.w_bits, a_bits=FLAGS.a_bits,
          first_last_bits=first_last, ranges=ranges,
          size_pct=size_pct, options=FLAGS.options, adaquant=adaquant,
          bias_steps=FLAGS.bias_steps, key=jax.random.key(FLAGS.seed),
          cache_dir=FLAGS.cache_dir or None, model_name=model_name,
          mixed=shared.get(pipeline), stage_guard=FLAGS.stage_guard, progress=False)
      if result.mixed is not None:
        shared.setdefault(pipeline, result.mixed)
      label = run_label(pipeline, size_pct, FLAGS.w_bits, FLAGS.a_bits) + variant
      states = {}
      if result.mixed is not None:  # where the per-option states came from
        states = {'options': ' '.join(option_name(o) for o in result.mixed.table.options),
                  'states_from': ('earlier run' if reused else
                                  'cache' if result.mixed.from_cache else 'this run')}
      for stage in result.stages:
        extra = dict(states) if stage.name in ('adaquant', 'mixed_precision') else {}
        if stage.guard is not None:
          extra.update(stage_kept=stage.kept, guard_kl_before=stage.guard.kl_before,
                       guard_kl_after=stage.guard.kl_after)
        record(label, stage.name, stage.model, stage.seconds, size_pct is not None, **extra)

    if FLAGS.qat_epochs > 0:
      start = time.time()
      qm = ptq_jax.quantize(model, variables, calib, w_bits=FLAGS.w_bits, a_bits=FLAGS.a_bits,
                            first_last_bits=first_last, ranges=ranges, progress=False,
                            model_name=model_name)
      limit = FLAGS.qat_train_limit or len(train)
      normalize = lambda x: (x / 255.0 - loader.FASHION_MNIST_MEAN) / loader.FASHION_MNIST_STD
      qat, report = qat_train(qm, train.images[:limit], train.labels[:limit], normalize,
                              QATConfig(epochs=FLAGS.qat_epochs),
                              key=jax.random.key(FLAGS.seed), progress=False)
      jax.block_until_ready(jax.tree.leaves(qat.qstate))
      record(f'qat W{FLAGS.w_bits}A{FLAGS.a_bits}', 'qat', qat, time.time() - start, False,
             calib_size=limit, qat_epochs=round(report['epochs'], 2), qat_steps=report['steps'])


if __name__ == '__main__':
  app.run(main)
