"""The NNX ViT on Fashion-MNIST: FP32, then the advanced pipeline's stages per bit width.

  python benchmarks/vit.py
  python benchmarks/vit.py --bits=W8A8,W4A8,W4A4 --iterations=1000

The bundled ``vit_fmnist`` checkpoint (or ``--checkpoint``) is quantized as the NNX
module it is (``ptq_jax.nnx_bridge.to_nnx``): its patch embedding, attention
projections (query/key/value/out), MLP and head are layers; the attention matmuls
themselves stay float (not an option yet). Stages of the advanced pipeline are
cumulative: ``ranges`` is baseline PTQ, then AdaQuant (parallel), BN tuning (no BN in a
ViT: a no-op) and KD bias tuning. Test top-1 on the 10,000 test images and top-1
agreement with FP32. Rows merge into results/vit.{json,md} by (stage, bits, device).
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
KEY_FIELDS = ('model', 'method', 'stage', 'w_bits', 'a_bits', 'iterations', 'device')


def main(_):
  command = 'python benchmarks/vit.py ' + ' '.join(sys.argv[1:])
  model, variables, meta = ptq_jax.load_model(resolve_checkpoint(FLAGS.checkpoint))
  module = to_nnx(model, variables)
  train, test, test_images = fashion_mnist()
  calib = ptq_jax.calibration_set('fashion_mnist', FLAGS.calib_size, FLAGS.seed, data=train)
  fp32_logits = ptq_jax.predict_logits(module, images=test_images)
  fp32_pred = np.argmax(fp32_logits, -1)
  records = []

  def record(method, stage, w_bits, a_bits, predict, seconds, size_pct):
    logits = predict(test_images)
    records.append({
        'model': meta['model'], 'method': method, 'stage': stage, 'w_bits': w_bits,
        'a_bits': a_bits, 'calib_size': FLAGS.calib_size,
        'iterations': FLAGS.iterations if method != 'fp32' else 0,
        'top1_pct': round(ptq_jax.top1_accuracy_pct(logits, test.labels), 2),
        'top1_agreement_pct': round(100 * float(np.mean(np.argmax(logits, -1) == fp32_pred)), 2),
        'size_pct_of_fp32': size_pct, 'seconds': round(seconds, 1),
        'device': describe_device(), 'command': command})
    print(records[-1], flush=True)
    write_results(FLAGS.out, NAME, merge_records(FLAGS.out, NAME, records, KEY_FIELDS),
                  'ViT (Flax NNX) on Fashion-MNIST',
                  columns=['model', 'method', 'stage', 'w_bits', 'a_bits', 'calib_size',
                           'iterations', 'top1_pct', 'top1_agreement_pct', 'size_pct_of_fp32',
                           'seconds', 'device', 'command'],
                  notes='Stages are cumulative (advanced pipeline, fixed bits, first and last '
                        'layer 8-bit): ranges = baseline PTQ, then parallel AdaQuant, BN '
                        'tuning (no BatchNorm here), KD bias tuning. Attention matmuls (Q K^T, '
                        'A V) stay float. `top1_agreement_pct`: test predictions equal to '
                        'FP32\'s.')

  record('fp32', 'fp32', 32, 32, lambda x: fp32_logits, 0.0, 100.0)
  config = ptq_jax.AdaQuantConfig(iterations=FLAGS.iterations)
  for bits in FLAGS.bits:
    w_bits, a_bits = parse_option(bits)
    result = ptq_jax.run_pipeline(module, calib=calib, pipeline='advanced', w_bits=w_bits,
                                  a_bits=a_bits, adaquant=config, bias_steps=FLAGS.bias_steps,
                                  key=jax.random.key(FLAGS.seed), model_name=meta['model'],
                                  progress=False)
    for stage in result.stages:
      qm = stage.model
      record('advanced', stage.name, w_bits, a_bits, qm.predict, stage.seconds,
             round(100 * qm.size_bits() / qm.fp32_bits(), 2))



if __name__ == '__main__':
  app.run(main)
