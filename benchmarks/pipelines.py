"""Paper-style ablation of the pipelines: each stage's contribution and wall time.

  python benchmarks/pipelines.py                                   # both models
  python benchmarks/pipelines.py --models=resnet20 --pipelines=sequential

Rows: FP32; for the fixed-bit-width `sequential` pipeline at W4A4 (first and last
layer 8-bit) each stage in turn (ranges = baseline PTQ, + sequential AdaQuant, + BN
tuning, + bias tuning); for `light` and `advanced` at 13% of the FP32 weight size
each of their stages. Test top-1, calibration-set top-1 and seconds per stage.
Writes results/pipelines.{json,md}; rows merge by (model, pipeline, stage, device).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
from absl import app, flags

import ptq_jax
from benchmarks.common import fashion_mnist, merge_records
from ptq_jax.results import write_results
from ptq_jax.train import describe_device

FLAGS = flags.FLAGS
flags.DEFINE_list('models', ['resnet20', 'mobilenet_v2_fmnist'], 'Bundled models.')
flags.DEFINE_list('pipelines', ['sequential', 'light', 'advanced'], 'Pipelines to run.')
flags.DEFINE_integer('w_bits', 4, 'Weight bits of the sequential pipeline.')
flags.DEFINE_integer('a_bits', 4, 'Activation bits of the sequential pipeline.')
flags.DEFINE_float('size_pct', 13.0, 'Weight-size budget of the mixed pipelines, % of FP32.')
flags.DEFINE_integer('calib_size', 1000, 'Calibration images.')
flags.DEFINE_integer('iterations', None, 'AdaQuant iterations (default: the library\'s).')
flags.DEFINE_integer('bias_steps', 800, 'KD bias-tuning steps.')
flags.DEFINE_integer('seed', 0, 'Calibration sample and PRNG seed.')
flags.DEFINE_integer('test_limit', 0, 'Evaluate on the first N test images (0: all).')
flags.DEFINE_string('cache_dir', './workdir/sensitivity_cache', 'Mixed-precision cache.')
flags.DEFINE_string('out', 'results', 'Output directory.')

NAME = 'pipelines'
KEY_FIELDS = ('model', 'pipeline', 'stage', 'device')


def main(_):
  command = 'python benchmarks/pipelines.py ' + ' '.join(sys.argv[1:])
  train, test, test_images = fashion_mnist(FLAGS.test_limit)
  records = []
  adaquant = None if FLAGS.iterations is None else ptq_jax.AdaQuantConfig(
      iterations=FLAGS.iterations)

  def save():
    write_results(FLAGS.out, NAME, merge_records(FLAGS.out, NAME, records, KEY_FIELDS),
                  'Pipelines, stage by stage',
                  columns=['model', 'pipeline', 'stage', 'w_bits', 'a_bits', 'calib_size',
                           'size_pct_of_fp32', 'top1_pct', 'calib_top1_pct', 'fp32_top1_pct',
                           'delta_pct', 'seconds', 'device', 'command'],
                  notes='Each row is the model after that stage (stages are cumulative). '
                        '`seconds`: that stage\'s wall time on the device named. sequential: '
                        f'W{FLAGS.w_bits}A{FLAGS.a_bits}, first and last layer 8-bit; light '
                        f'and advanced: mixed precision at {FLAGS.size_pct:g}% of the FP32 '
                        'weight size.')

  for model_name in FLAGS.models:
    model, variables, _ = ptq_jax.load_model(
        ptq_jax.bundled_checkpoints()[f'{model_name}_fashion_mnist'])
    calib = ptq_jax.calibration_set('fashion_mnist', FLAGS.calib_size, FLAGS.seed, data=train)
    calib_labels = train.labels[calib.indices]
    fp32 = ptq_jax.top1_accuracy_pct(ptq_jax.predict_logits(model, variables, test_images),
                                     test.labels)
    base = {'model': model_name, 'calib_size': len(calib), 'fp32_top1_pct': round(fp32, 2),
            'device': describe_device(), 'command': command}
    fp32_calib = ptq_jax.top1_accuracy_pct(ptq_jax.predict_logits(model, variables,
                                                                  calib.images), calib_labels)
    records.append({**base, 'pipeline': '-', 'stage': 'fp32', 'w_bits': 32, 'a_bits': 32,
                    'size_pct_of_fp32': 100.0, 'top1_pct': round(fp32, 2),
                    'calib_top1_pct': round(fp32_calib, 2), 'delta_pct': 0.0, 'seconds': 0.0})
    save()
    for pipeline in FLAGS.pipelines:
      mixed = pipeline != 'sequential'
      result = ptq_jax.run_pipeline(
          model, variables, calib, pipeline, w_bits=FLAGS.w_bits, a_bits=FLAGS.a_bits,
          size_pct=FLAGS.size_pct if mixed else None, adaquant=adaquant,
          bias_steps=FLAGS.bias_steps,
          key=jax.random.key(FLAGS.seed), cache_dir=FLAGS.cache_dir, model_name=model_name,
          progress=False)
      fp32_bits = 32 * sum(l.params for l in result.model.layers)
      for stage in result.stages:
        qm = stage.model
        top1 = ptq_jax.top1_accuracy_pct(qm.predict(test_images), test.labels)
        records.append({
            **base, 'pipeline': pipeline, 'stage': stage.name,
            'w_bits': 'mixed' if mixed else FLAGS.w_bits,
            'a_bits': 'mixed' if mixed else FLAGS.a_bits,
            'size_pct_of_fp32': round(100 * qm.size_bits() / fp32_bits, 2),
            'top1_pct': round(top1, 2),
            'calib_top1_pct': round(ptq_jax.top1_accuracy_pct(qm.predict(calib.images),
                                                              calib_labels), 2),
            'delta_pct': round(top1 - fp32, 2), 'seconds': round(stage.seconds, 1)})
        print({k: records[-1][k] for k in ('model', 'pipeline', 'stage', 'size_pct_of_fp32',
                                           'top1_pct', 'seconds')}, flush=True)
        save()


if __name__ == '__main__':
  app.run(main)
