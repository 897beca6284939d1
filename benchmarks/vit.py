"""The NNX ViT on Fashion-MNIST: FP32, then baseline PTQ, AdaQuant and the advanced
pipeline per bit width, each with and without quantized attention matmuls.

  python benchmarks/vit.py
  python benchmarks/vit.py --bits=W8A8,W4A8,W4A4 --iterations=1000

The bundled ``vit_fmnist`` checkpoint (or ``--checkpoint``) is quantized as the NNX
module it is (``ptq_jax.nnx_bridge.to_nnx``): its patch embedding, attention
projections (query/key/value/out), MLP and head are layers (first and last 8-bit).
One advanced-pipeline run per bit width gives the three methods as its cumulative
stages: ``ranges`` = baseline PTQ, ``adaquant`` = + parallel AdaQuant, ``bias_tuning`` =
the whole advanced pipeline (BN tuning is a no-op: no BatchNorm in a ViT). With
``quantize_matmuls`` the run reuses the first run's AdaQuant states (``mixed=``) and its
stages ``matmul_ranges`` / ``matmul_adaquant`` add the calibrated / optimised Q·Kᵀ and
attention·V quantizers. Test top-1 on the 10,000 test images and top-1 agreement with
FP32. Rows merge into results/vit.{json,md} by (stage, bits, matmuls, device).
"""

from __future__ import annotations

import sys

import jax
import numpy as np
from absl import app, flags

from common import describe_device, fashion_mnist, merge_records, write_results
import ptq_jax
from ptq_jax.bundled import resolve_checkpoint
from ptq_jax.nnx_bridge import to_nnx
from ptq_jax.quant.quantizer import parse_option

FLAGS = flags.FLAGS
flags.DEFINE_string('checkpoint', 'vit_fmnist_fashion_mnist', 'Bundled name or path.')
flags.DEFINE_list('bits', ['W8A8', 'W4A8', 'W4A4'], 'Bit widths.')
flags.DEFINE_integer('calib_size', 1000, 'Calibration images.')
flags.DEFINE_integer('iterations', 1000, 'AdaQuant iterations per layer.')
flags.DEFINE_integer('bias_steps', 800, 'KD bias-tuning steps.')
flags.DEFINE_integer('seed', 0, 'Calibration sample and PRNG seed.')
flags.DEFINE_string('out', 'results', 'Output directory.')

NAME = 'vit'
KEY_FIELDS = ('model', 'method', 'stage', 'w_bits', 'a_bits', 'matmuls', 'iterations',
              'device')
# The stages of a run that give each method's row.
METHODS = {'ranges': 'baseline PTQ', 'matmul_ranges': 'baseline PTQ', 'adaquant': 'AdaQuant',
           'matmul_adaquant': 'AdaQuant', 'bias_tuning': 'advanced pipeline'}


def main(_):
  command = 'python benchmarks/vit.py ' + ' '.join(sys.argv[1:])
  model, variables, meta = ptq_jax.load_model(resolve_checkpoint(FLAGS.checkpoint))
  module = to_nnx(model, variables)
  train, test, test_images = fashion_mnist()
  calib = ptq_jax.calibration_set('fashion_mnist', FLAGS.calib_size, FLAGS.seed, data=train)
  fp32_logits = ptq_jax.predict_logits(module, images=test_images)
  fp32_pred = np.argmax(fp32_logits, -1)
  records = []

  def record(method, stage, w_bits, a_bits, matmuls, predict, seconds, size_pct):
    logits = predict(test_images)
    records.append({
        'model': meta['model'], 'method': method, 'stage': stage, 'w_bits': w_bits,
        'a_bits': a_bits, 'matmuls': matmuls, 'calib_size': FLAGS.calib_size,
        'iterations': FLAGS.iterations if method != 'fp32' else 0,
        'top1_pct': round(ptq_jax.top1_accuracy_pct(logits, test.labels), 2),
        'top1_agreement_pct': round(100 * float(np.mean(np.argmax(logits, -1) == fp32_pred)), 2),
        'size_pct_of_fp32': size_pct, 'seconds': round(seconds, 1),
        'device': describe_device(), 'command': command})
    print(records[-1], flush=True)
    write_results(FLAGS.out, NAME, merge_records(FLAGS.out, NAME, records, KEY_FIELDS),
                  'ViT (Flax NNX) on Fashion-MNIST',
                  columns=['model', 'method', 'stage', 'w_bits', 'a_bits', 'matmuls', 'calib_size',
                           'iterations', 'top1_pct', 'top1_agreement_pct', 'size_pct_of_fp32',
                           'seconds', 'device', 'command'],
                  notes='One advanced-pipeline run per bit width and `matmuls` setting (first '
                        'and last layer 8-bit; stages cumulative): baseline PTQ = its ranges '
                        'stage, AdaQuant = + parallel AdaQuant, advanced pipeline = + BN '
                        'tuning (no BatchNorm here) + KD bias tuning. `matmuls`: whether the '
                        'attention matmuls (Q K^T, attention V) are quantized too, per-tensor '
                        'at a_bits (stages matmul_ranges / matmul_adaquant); that run reuses '
                        'the other\'s AdaQuant states, so its seconds leave that AdaQuant out. '
                        '`top1_agreement_pct`: test predictions equal to FP32\'s.')

  record('fp32', 'fp32', 32, 32, 'float', lambda x: fp32_logits, 0.0, 100.0)
  config = ptq_jax.AdaQuantConfig(iterations=FLAGS.iterations)
  for bits in FLAGS.bits:
    w_bits, a_bits = parse_option(bits)
    mixed = None
    for matmuls in (False, True):
      result = ptq_jax.run_pipeline(module, calib=calib, pipeline='advanced', w_bits=w_bits,
                                    a_bits=a_bits, options=sorted({(w_bits, a_bits), (8, 8)}),
                                    adaquant=config, bias_steps=FLAGS.bias_steps,
                                    key=jax.random.key(FLAGS.seed), model_name=meta['model'],
                                    mixed=mixed, quantize_matmuls=matmuls, progress=False)
      mixed = result.mixed   # the layers' AdaQuant states, shared by both settings
      seconds = 0.0
      for stage in result.stages:
        seconds += stage.seconds
        if stage.name not in METHODS or (matmuls and stage.name in ('ranges', 'adaquant')):
          continue   # (with matmuls, those stages' models have float matmuls)
        qm = stage.model
        record(METHODS[stage.name], stage.name, w_bits, a_bits,
               'quantized' if matmuls else 'float', qm.predict, seconds,
               round(100 * qm.size_bits() / qm.fp32_bits(), 2))


if __name__ == '__main__':
  app.run(main)
