"""The deployable JAX artifact of each bundled model: size, agreement with the simulation
it came from, accuracy and latency beside FP32, all measured in one run.

  python benchmarks/export.py          # writes results/export.json and results/export.md

For each bundled model (ResNet-20, MobileNetV2, the NNX ViT with its attention matmuls
quantized) at W8A8, W4A8, W4A4 (first and last layer 8-bit) and mixed precision at 13 %
of the FP32 weight size (light: calibrated ranges, options W8A8 / W4A4): the program
``ptq_jax.export`` writes, its bytes against the FP32 parameters', top-1 agreement and
the largest logit difference with the simulation (``QuantizedModel.apply``) on the
10,000 test images, and the milliseconds per batch of 1 and 64 of three jitted
programs on the same runtime, timed in turn: JAX FP32, the simulation, the artifact.
"""

from __future__ import annotations

import os
import tempfile
import time

import jax
import numpy as np
from absl import app, flags

from common import describe_device, write_results
import ptq_jax
from ptq_jax.evaluation import batched_predict, top1_accuracy_pct
from ptq_jax.data import loader

flags.DEFINE_string('out', 'results', 'Directory for export.json / export.md.')
flags.DEFINE_list('models', ['resnet20_fashion_mnist', 'mobilenet_v2_fmnist_fashion_mnist',
                             'vit_fmnist_fashion_mnist'], 'Bundled checkpoints.')
flags.DEFINE_integer('calib_size', 1000, 'Calibration images (train split).')
flags.DEFINE_integer('repeats', 20, 'Timed calls per program and batch (median kept).')
FLAGS = flags.FLAGS
COMMAND = 'python benchmarks/export.py'
RUNS = (('W8A8', dict(w_bits=8, a_bits=8)), ('W4A8', dict(w_bits=4, a_bits=8)),
        ('W4A4', dict(w_bits=4, a_bits=4)), ('mixed 13%', None))


def median_ms(fn, x, repeats: int) -> float:
  jax.block_until_ready(fn(x))   # compiled and warm
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(x))
    times.append(time.perf_counter() - start)
  return 1000 * float(np.median(times))


def quantized_models(model, variables, calib, name: str, attention: bool):
  for label, bits in RUNS:
    if bits is None:
      if attention:   # mixed precision does not budget attention matmuls
        continue
      mp = ptq_jax.mixed_precision(model, variables, calib, options=('W8A8', 'W4A4'),
                                   model_name=name, progress=False)
      yield label, mp.quantize(size_pct=13)[0]
    else:
      yield label, ptq_jax.quantize(model, variables, calib, first_last_bits=8,
                                    quantize_matmuls=attention, model_name=name,
                                    progress=False, **bits)


def main(_):
  test = loader.load_split('fashion_mnist', 'test')
  images = loader.preprocess('fashion_mnist', test.images)
  calib = ptq_jax.calibration_set('fashion_mnist', n=FLAGS.calib_size, seed=0)
  records, tmp = [], tempfile.mkdtemp()
  for checkpoint in FLAGS.models:
    model, variables, meta = ptq_jax.load_model(ptq_jax.bundled_checkpoints()[checkpoint])
    name = meta['model']
    attention = name.startswith('vit')
    fp32 = jax.jit(lambda x: model.apply(variables, x))
    fp32_top1 = top1_accuracy_pct(batched_predict(fp32, images, 500), test.labels)
    for label, qm in quantized_models(model, variables, calib, name, attention):
      start = time.time()
      report = ptq_jax.export(qm, os.path.join(tmp, f'{name}_{label}.jaxexport'))
      export_seconds = time.time() - start
      program = ptq_jax.load_exported(report.path)
      artifact = jax.jit(program.exported.call)
      sim = np.asarray(qm.predict(images))
      out = np.asarray(batched_predict(artifact, images, 500))
      row = {'model': name, 'method': 'jax artifact', 'bits': label,
             'w_bits': qm.options['w_bits'] or 'mixed', 'a_bits': qm.options['a_bits'] or 'mixed',
             'calib_size': FLAGS.calib_size, 'quantize_matmuls': attention,
             'artifact_bytes': report.bytes, 'fp32_param_bytes': report.fp32_param_bytes,
             'size_ratio_to_fp32': round(report.size_ratio, 4),
             'integer_layers': len(report.integer_layers),
             'float_layers': len(report.float_layers),
             'top1_agreement_with_simulation_pct': round(
                 100 * float(np.mean(sim.argmax(-1) == out.argmax(-1))), 3),
             'max_abs_logit_delta': float(np.abs(sim - out).max()),
             'top1_pct': round(top1_accuracy_pct(out, test.labels), 2),
             'simulation_top1_pct': round(top1_accuracy_pct(sim, test.labels), 2),
             'fp32_top1_pct': round(fp32_top1, 2), 'export_seconds': round(export_seconds, 1)}
      for batch in (1, 64):
        x = images[:batch]
        times = {'fp32': median_ms(fp32, x, FLAGS.repeats),
                 'simulation': median_ms(qm.apply, x, FLAGS.repeats),
                 'artifact': median_ms(artifact, x, FLAGS.repeats)}
        row.update({f'{k}_ms_batch{batch}': round(v, 3) for k, v in times.items()})
        row[f'artifact_speedup_over_fp32_batch{batch}'] = round(times['fp32'] / times['artifact'],
                                                                 2)
      row.update(test_images=len(test), device=describe_device(), command=COMMAND)
      records.append(row)
      print({k: row[k] for k in ('model', 'bits', 'size_ratio_to_fp32',
                                 'top1_agreement_with_simulation_pct', 'max_abs_logit_delta',
                                 'top1_pct', 'fp32_ms_batch64', 'artifact_ms_batch64')},
            flush=True)
  write_results(FLAGS.out, 'export', records, 'Deployable JAX artifacts (ptq_jax.export)',
                notes='One row per bundled model and bits: calibrated ranges (baseline PTQ; '
                      'mixed 13%: light, options W8A8/W4A4), then `ptq_jax.export`. Agreement '
                      'and max |logit delta|: the artifact against the simulation '
                      '(`QuantizedModel.apply`) on the 10,000 Fashion-MNIST test images. '
                      'Latency: median ms per call of jitted JAX FP32, the simulation and the '
                      'artifact (`jax.export` program), timed in turn in this one run on the '
                      'device named; speed-up = FP32 ms / artifact ms on the same runtime. '
                      f'Made by `{COMMAND}`.')


if __name__ == '__main__':
  app.run(main)
