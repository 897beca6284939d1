"""Why MobileNetV2 fails at W4A4: which layers' 4-bit inputs or weights do the damage.

For torchvision's MobileNetV2 (224x224), min/max ranges on ``--calib_size`` unlabelled
Debian photos (as ``benchmarks/imagenet.py`` calibrates):

* ``sensitivity`` rows: per layer, the KL divergence from FP32 (on the calibration
  photos) with only that layer quantized, at W8A4 (its input at 4 bits, its weights at
  8) and at W4A8 (its weights at 4 bits), everything else float
  (``ptq_jax.stages.sensitivity``), with the layer's input range.
* ``keep_a8`` rows: the whole network at W8A4 or W4A4 (first and last layer 8-bit)
  with the ``k`` layers of largest W8A4 sensitivity given 8-bit inputs; top-1
  agreement with FP32 on the held-out Debian photos (never the labelled ImageNet set:
  this chooses nothing, it explains).
* ``per-channel inputs`` rows: W8A4 and W4A4 with one 4-bit range per input channel
  (``RangeConfig(per_channel_inputs=True)``, not expressible in the integer export).
* ``reconstructed`` rows: W8A4 (first and last 8-bit) through the sequential pipeline
  with the project's best reconstruction (block-wise, learned rounding, QDrop 0.5,
  stage guard; BN tuning towards FP32, no bias tuning), each stage's agreement: whether
  reconstruction recovers 4-bit inputs when the weights are not the problem.
* ``bias tuning`` rows: W4A8 min/max PTQ (first and last 8-bit), then ``--bias_steps``
  of KD bias tuning with each of ``ptq_jax``'s bias optimisers from that same state: the
  KD loss on the calibration photos before and after, and the agreement after (whether
  the reference's SGD lr 0.1 suits a 1,000-class network).

  python benchmarks/imagenet_ablation.py
  python benchmarks/imagenet_ablation.py --parts=sensitivity,keep --act_ranges=mse
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any, Dict, List, Tuple

import jax
import numpy as np
from absl import app, flags

from common import concurrency_fields, describe_device, merge_records, write_results
import ptq_jax
from ptq_jax.data import photos
from ptq_jax.evaluation import batched_predict
from ptq_jax.importers import torchvision_mobilenet
from ptq_jax.quant.calibrate import input_channel_absmax
from ptq_jax.stages.bias_tuning import BIAS_OPTIMIZERS, bias_optimizer, kd_tune
from ptq_jax.stages.prepare import prepare
from ptq_jax.stages.sensitivity import sensitivity_table

flags.DEFINE_integer('calib_size', 256, 'Unlabelled Debian photos for calibration.')
flags.DEFINE_integer('sensitivity_images', 128, 'Calibration photos the sensitivity pass uses.')
flags.DEFINE_list('keep', ['0', '1', '2', '4', '8', '16'], 'k: most sensitive layers kept at A8.')
flags.DEFINE_list('parts', ['sensitivity', 'keep', 'per_channel', 'reconstruct', 'bias'],
                  'Which rows to (re)measure.')
flags.DEFINE_integer('reconstruct_iterations', 200, 'AdaQuant iterations per block.')
flags.DEFINE_integer('bias_steps', 50, 'Bias-tuning steps of the bias rows.')
flags.DEFINE_enum('act_ranges', 'minmax', ['minmax', 'mse'],
                  'Activation range initialisation of the sensitivity and keep rows (weights: '
                  'min/max).')
flags.DEFINE_string('out', 'results', 'Output directory.')
FLAGS = flags.FLAGS
NAME = 'imagenet_ablation'
COMMAND = ' '.join(['python benchmarks/imagenet_ablation.py'] + sys.argv[1:])


def channel_shares(channel_max: np.ndarray, step: float) -> Dict[str, float]:
  """Shares of input channels whose max |x| is under half a step / two steps."""
  return {'channels': len(channel_max),
          'channels_under_half_step_pct': round(100 * float(np.mean(channel_max < step / 2)), 1),
          'channels_under_two_steps_pct': round(100 * float(np.mean(channel_max < 2 * step)), 1)}


def agreement(qmodel, evaluation: np.ndarray, fp32: np.ndarray) -> float:
  predicted = np.asarray(batched_predict(jax.jit(qmodel.apply), evaluation, 50)).argmax(-1)
  return round(100 * float(np.mean(predicted == fp32)), 2)


def ranges_suffix() -> str:
  """What a row's stage name says of ``--act_ranges`` (nothing for min/max)."""
  if FLAGS.act_ranges == 'minmax':
    return ''
  return f', {FLAGS.act_ranges.upper()} activation ranges'


def sensitivity_rows(model, variables, calib) -> Tuple[List[Dict[str, Any]], List[str]]:
  """The per-layer rows, and the layers by decreasing W8A4 sensitivity."""
  options = {(8, 4): None, (4, 8): None}
  for option in options:
    options[option] = ptq_jax.quantize(model, variables, calib, w_bits=option[0],
                                       a_bits=option[1], first_last_bits=None,
                                       ranges=ptq_jax.RangeConfig(FLAGS.act_ranges,
                                                                  weight_method='minmax'),
                                       model_name='mobilenet_v2', progress=False)
  prepared = prepare(model, variables, calib[:FLAGS.sensitivity_images], progress=False)
  table = sensitivity_table(prepared, {o: q.qstate for o, q in options.items()})
  state = options[(8, 4)].qstate
  kinds = {l.path: l.kind for l in prepared.layers}
  channel_max = input_channel_absmax(prepared, table.paths, 32)
  rows = []
  for i, path in enumerate(table.paths):
    a = state[path].a_quant
    rows.append({'model': 'mobilenet_v2', 'stage': 'sensitivity' + ranges_suffix(),
                 'layer': path,
                 'kind': kinds[path], 'calib_size': FLAGS.sensitivity_images,
                 'input_low': round(float(a.low), 3),
                 'input_high': round(float(a.low + a.range), 3),
                 **channel_shares(channel_max[path], float(a.range) / 15),
                 'kl_w8a4': float(f'{table.raw_delta[i, 0]:.4g}'),
                 'kl_w4a8': float(f'{table.raw_delta[i, 1]:.4g}'),
                 'seconds': round(table.seconds, 1)})
  print(f'sensitivity: {table.seconds:.0f} s', flush=True)
  return rows, [table.paths[i] for i in np.argsort(-table.raw_delta[:, 0])]


def main(_):
  parts = set(FLAGS.parts)
  if 'keep' in parts and 'sensitivity' not in parts:
    raise app.UsageError('--parts=keep needs sensitivity (it keeps the most sensitive layers).')
  model, variables = torchvision_mobilenet.load_mobilenet_v2()
  preprocess = torchvision_mobilenet.preprocess_images
  calib_photos, held_out = photos.photo_splits(FLAGS.calib_size, seed=0)
  calib = preprocess(photos.load_photos(calib_photos))
  evaluation = preprocess(photos.load_photos(held_out))
  fp32 = np.asarray(batched_predict(jax.jit(lambda x: model.apply(variables, x)), evaluation,
                                    50)).argmax(-1)
  rows: List[Dict[str, Any]] = []
  common = {'model': 'mobilenet_v2', 'a_bits': 4, 'calib_size': FLAGS.calib_size,
            'eval_images': len(evaluation)}
  order: List[str] = []
  if 'sensitivity' in parts:
    found, order = sensitivity_rows(model, variables, calib)
    rows += found

  for w_bits in (8, 4) if 'keep' in parts else ():
    for k in (int(v) for v in FLAGS.keep):
      start = time.time()
      overrides = {p: {'a_bits': 8} for p in order[:k]}
      qmodel = ptq_jax.quantize(model, variables, calib, w_bits=w_bits, a_bits=4,
                                first_last_bits=8, overrides=overrides or None,
                                ranges=ptq_jax.RangeConfig(FLAGS.act_ranges,
                                                           weight_method='minmax'),
                                model_name='mobilenet_v2', progress=False)
      rows.append({**common, 'stage': f'keep_a8 k={k}{ranges_suffix()}', 'w_bits': w_bits,
                   'kept_at_a8': ', '.join(order[:k]),
                   'top1_agreement_pct': agreement(qmodel, evaluation, fp32),
                   'seconds': round(time.time() - start, 1)})
      print(rows[-1], flush=True)

  for w_bits in (8, 4) if 'per_channel' in parts else ():
    start = time.time()   # each input channel with its own 4-bit range
    qmodel = ptq_jax.quantize(model, variables, calib, w_bits=w_bits, a_bits=4,
                              first_last_bits=8, model_name='mobilenet_v2', progress=False,
                              ranges=ptq_jax.RangeConfig(per_channel_inputs=True))
    rows.append({**common, 'stage': 'per-channel inputs', 'w_bits': w_bits,
                 'top1_agreement_pct': agreement(qmodel, evaluation, fp32),
                 'seconds': round(time.time() - start, 1)})
    print(rows[-1], flush=True)

  if 'reconstruct' in parts:   # W8A4: does reconstruction recover the 4-bit inputs?
    start = time.time()
    result = ptq_jax.run_pipeline(
        model, variables, calib, 'sequential', w_bits=8, a_bits=4, first_last_bits=8,
        adaquant=ptq_jax.AdaQuantConfig(iterations=FLAGS.reconstruct_iterations, unit='block',
                                        rounding='learned', drop_prob=0.5),
        bias_steps=0, bn_target='fp', stage_guard=True, model_name='mobilenet_v2',
        progress=False)
    for stage in result.stages:
      rows.append({**common, 'stage': f'reconstructed: {stage.name}', 'w_bits': 8,
                   'top1_agreement_pct': agreement(stage.model, evaluation, fp32),
                   'seconds': round(stage.seconds, 1)})
      print(rows[-1], flush=True)
    print(f'reconstruction: {time.time() - start:.0f} s', flush=True)

  if 'bias' in parts:   # the bias optimisers from one W4A8 PTQ state
    start = time.time()
    base = ptq_jax.quantize(model, variables, calib, w_bits=4, a_bits=8, first_last_bits=8,
                            model_name='mobilenet_v2', progress=False)
    bias = {**common, 'w_bits': 4, 'a_bits': 8}
    rows.append({**bias, 'stage': 'bias tuning: start (W4A8 min/max PTQ)', 'bias_steps': 0,
                 'top1_agreement_pct': agreement(base, evaluation, fp32),
                 'seconds': round(time.time() - start, 1)})
    prepared = prepare(model, variables, calib, model_name='mobilenet_v2', progress=False)
    for name in BIAS_OPTIMIZERS:
      start = time.time()
      state, report = kd_tune(prepared, base.qstate, 'bias', steps=FLAGS.bias_steps,
                              optimizer=bias_optimizer(name))
      tuned = dataclasses.replace(base, qstate=state)
      rows.append({**bias, 'stage': f'bias tuning: {name}', 'bias_steps': FLAGS.bias_steps,
                   'kd_loss_before': round(report['kd_loss_before'], 4),
                   'kd_loss_after': round(report['kd_loss_after'], 4),
                   'top1_agreement_pct': agreement(tuned, evaluation, fp32),
                   'seconds': round(time.time() - start, 1)})
      print(rows[-1], flush=True)

  fields = {'device': describe_device(), 'command': COMMAND, **concurrency_fields()}
  rows = [{**r, **fields} for r in rows]
  write_results(FLAGS.out, NAME, merge_records(FLAGS.out, NAME, rows,
                                               ('model', 'stage', 'layer', 'w_bits', 'device')),
                'MobileNetV2 at 4-bit activations: where the error comes from',
                columns=['model', 'stage', 'layer', 'kind', 'w_bits', 'a_bits', 'calib_size',
                         'input_low', 'input_high', 'channels',
                         'channels_under_half_step_pct', 'channels_under_two_steps_pct', 'kl_w8a4', 'kl_w4a8', 'kept_at_a8',
                         'bias_steps', 'kd_loss_before', 'kd_loss_after',
                         'top1_agreement_pct', 'eval_images', 'seconds', 'device', 'command'],
                notes='torchvision MobileNetV2, min/max ranges from unlabelled Debian photos. '
                      '`sensitivity`: KL(FP32 || model) on the calibration photos with only '
                      'that layer quantized (W8A4: its input at 4 bits; W4A8: its weights at '
                      '4 bits), every other layer float; `input_low`/`input_high`: its '
                      '4-bit input range (`MSE activation ranges`: from the MSE search, '
                      'weights still min/max); `channels_under_...`: input channels whose max |x| '
                      '(calibration photos) is under half a 4-bit step of that range (every '
                      'value rounds to the zero point) or under two steps. `keep_a8 k`: every layer quantized (first and last '
                      '8-bit) but the k most W8A4-sensitive layers with 8-bit inputs; '
                      '`per-channel inputs`: every input channel its own 4-bit range; '
                      '`reconstructed`: W8A4 through block-wise learned rounding with QDrop '
                      'and the stage guard (each stage); `bias tuning`: W4A8 min/max PTQ, '
                      'then KD bias tuning (minibatch 50) with each bias optimiser '
                      "(`sgd`: lr 0.1, the paper's; `adam`: lr 1e-3) from the same state, "
                      'KD loss (mean KL to FP32) on the calibration photos before and after; '
                      'top-1 agreement with FP32 on the held-out Debian photos.')


if __name__ == '__main__':
  app.run(main)
