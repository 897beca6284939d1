"""Reconstruction methods side by side: does any end below its own starting PTQ?

  python benchmarks/reconstruction.py                     # ResNet-20, W4A4 and W2A4
  python benchmarks/reconstruction.py --models=resnet20,mobilenet_v2_fmnist --bits=4/4,2/4
  python benchmarks/reconstruction.py --start=mse       # every method from MSE ranges
  python benchmarks/reconstruction.py --first_last_bits=0 --input_bits=0,8   # all layers 4-bit,
                                                        # input 4-bit / kept 8-bit

For each model and bit width (first and last layer 8-bit): the starting point
(calibrated min/max or, with --start=mse, MSE ranges), then each reconstruction method
from it (METHODS below),
in one run on one machine. Accuracy is measured on 5000 train images outside the
calibration set (``val_top1_pct``, what any choice of default would use) and on the test
split (``top1_pct``); ``start_val_top1_pct`` repeats the starting point's, and
``layers_worse`` counts layers whose reconstruction error ended above where it started
(``layers_guarded``: layers where the guard kept an earlier state). Rows merge into
results/reconstruction.{json,md} by (model, start, method, bits, mode, iterations, device).
"""

from __future__ import annotations

import itertools
import sys
import time

import jax
import numpy as np
from absl import app, flags

from common import describe_device, fashion_mnist, held_out, merge_records, write_results
import ptq_jax

# Each method: how it reconstructs from the calibrated start.
METHODS = {
    'adaquant_paper': dict(guard=False),   # the paper's AdaQuant: the last state
    'adaquant_guard': dict(guard=True),    # + the guard: the best measured state
    # + weight-range updates relative to each channel's starting range
    'adaquant_guard_relative': dict(guard=True, weight_range_updates='relative'),
    # + the weight quantizer's range kept where calibration put it
    'adaquant_guard_fixed_wrange': dict(guard=True, lr_w_quant=0.0),
    # + QDrop: half of the input elements skip input quantization in each step
    'adaquant_guard_qdrop': dict(guard=True, drop_prob=0.5),
    # learned rounding (AdaRound's idea) instead of free weight updates, + the guard
    'adaround_guard': dict(guard=True, rounding='learned'),
    # block-wise: the layers of each block of the traced graph fitted jointly to the float
    # block's output, + the guard; with free updates, learned rounding or QDrop
    'block_guard': dict(guard=True, unit='block'),
    'block_adaround_guard': dict(guard=True, unit='block', rounding='learned'),
    'block_qdrop_guard': dict(guard=True, unit='block', drop_prob=0.5),
    # block-wise, learned rounding and QDrop together (QDrop's own setting)
    'block_adaround_qdrop_guard': dict(guard=True, unit='block', rounding='learned',
                                       drop_prob=0.5),
    # block-wise learned rounding, the guard measuring on 20% of the calibration images
    # held out of the optimisation
    'block_adaround_holdout': dict(guard=True, unit='block', rounding='learned',
                                   guard_holdout=0.2),
}

FLAGS = flags.FLAGS
flags.DEFINE_list('models', ['resnet20'], 'Bundled models.')
flags.DEFINE_list('bits', ['4/4', '2/4'], 'W/A bit widths (first and last layer 8-bit).')
flags.DEFINE_list('methods', list(METHODS), f'From {list(METHODS)}.')
flags.DEFINE_enum('mode', 'parallel', ['parallel', 'sequential'], 'AdaQuant mode.')
flags.DEFINE_enum('start', 'minmax', ['minmax', 'mse'], 'Range initialisation every method '
                  'starts from.')
flags.DEFINE_integer('iterations', 1000, 'AdaQuant iterations per layer (or block).')
flags.DEFINE_integer('first_last_bits', 8, 'Bits of the first and last layer; 0: the same as '
                     'every other layer.')
flags.DEFINE_list('input_bits', ['0'], "Bits of the network input (the first layer's input), "
                  'each a run; 0: as the first layer is quantized. The image is 8-bit data.')
flags.DEFINE_integer('calib_size', 1000, 'Calibration images.')
flags.DEFINE_integer('val_size', 5000, 'Held-out train images for validation.')
flags.DEFINE_integer('seed', 0, 'Calibration sample and AdaQuant seed.')
flags.DEFINE_string('out', 'results', 'Output directory.')

NAME = 'reconstruction'
KEY_FIELDS = ('model', 'start', 'method', 'w_bits', 'a_bits', 'first_last_bits', 'mode',
              'iterations', 'calib_size', 'device')


def main(_):
  command = 'python benchmarks/reconstruction.py ' + ' '.join(sys.argv[1:])
  unknown = set(FLAGS.methods) - set(METHODS)
  if unknown:
    raise app.UsageError(f'Unknown methods {sorted(unknown)}; choose from {list(METHODS)}.')
  bits = [tuple(int(b) for b in pair.split('/')) for pair in FLAGS.bits]
  train, test, test_images = fashion_mnist()
  calib = ptq_jax.calibration_set('fashion_mnist', FLAGS.calib_size, FLAGS.seed, data=train)
  val_images, val_labels = held_out(train, calib.indices, FLAGS.val_size, FLAGS.seed + 1)
  records = []
  for name in FLAGS.models:
    model, variables, _ = ptq_jax.load_model(ptq_jax.bundled_checkpoints()[f'{name}_fashion_mnist'])
    fp32_test = ptq_jax.top1_accuracy_pct(ptq_jax.predict_logits(model, variables, test_images),
                                          test.labels)
    first = ptq_jax.trace(model, variables, calib.images[:1])[0].path   # (its input: the image)
    for (w_bits, a_bits), input_bits in itertools.product(bits, map(int, FLAGS.input_bits)):
      common = dict(w_bits=w_bits, a_bits=a_bits, first_last_bits=FLAGS.first_last_bits or None,
                    progress=False, ranges=ptq_jax.RangeConfig(FLAGS.start))
      policy = FLAGS.first_last_bits or 'alike'
      if input_bits:   # the first layer's input at the data's own bits
        common['overrides'] = {first: {'a_bits': input_bits}}
        policy = f'{policy}, input {input_bits}-bit'
      start = time.time()
      base = ptq_jax.quantize(model, variables, calib, **common)
      seconds = time.time() - start
      start_val = ptq_jax.top1_accuracy_pct(base.predict(val_images), val_labels)
      start_test = ptq_jax.top1_accuracy_pct(base.predict(test_images), test.labels)

      def record(method, val, test_top1, seconds, **extra):
        start_row = method.startswith('ptq_')
        records.append({
            'model': name, 'start': FLAGS.start, 'method': method, 'w_bits': w_bits,
            'a_bits': a_bits, 'first_last_bits': policy,
            'mode': FLAGS.mode if not start_row else '-',
            'iterations': FLAGS.iterations if not start_row else 0,
            'calib_size': FLAGS.calib_size, 'start_val_top1_pct': round(start_val, 2),
            'val_top1_pct': round(val, 2), 'start_top1_pct': round(start_test, 2),
            'top1_pct': round(test_top1, 2), 'delta_val_pct': round(val - start_val, 2),
            'fp32_top1_pct': round(fp32_test, 2), 'delta_fp32_pct': round(test_top1 - fp32_test, 2),
            **extra, 'seconds': round(seconds, 1), 'device': describe_device(),
            'command': command})
        print(records[-1], flush=True)
        save(records)

      record(f'ptq_{FLAGS.start}', start_val, start_test, seconds)
      for method in FLAGS.methods:
        config = ptq_jax.AdaQuantConfig(iterations=FLAGS.iterations, **METHODS[method])
        start = time.time()
        qm = ptq_jax.quantize(model, variables, calib, method='adaquant', mode=FLAGS.mode,
                              adaquant=config, key=jax.random.key(FLAGS.seed), **common)
        seconds = time.time() - start
        reports = qm.layer_reports
        record(method, ptq_jax.top1_accuracy_pct(qm.predict(val_images), val_labels),
               ptq_jax.top1_accuracy_pct(qm.predict(test_images), test.labels), seconds,
               layers=len(reports),
               layers_worse=sum(r['rel_error_after'] > r['rel_error_before'] for r in reports),
               layers_worse_at_last_step=sum(r['rel_error_last_step'] > r['rel_error_before']
                                             for r in reports),
               layers_guarded=sum(bool(r['guard_acted']) for r in reports),
               mean_layer_error_ratio=round(float(np.mean(
                   [r['rel_error_after'] / max(r['rel_error_before'], 1e-30)
                    for r in reports])), 4))


def save(records) -> None:
  rows = merge_records(FLAGS.out, NAME, records, KEY_FIELDS)
  for row in rows:   # (rows measured before --start / --first_last_bits: min/max, 8-bit)
    row.setdefault('start', 'minmax')
    row.setdefault('first_last_bits', 8)
  key = lambda r: tuple(r.get(k) for k in KEY_FIELDS)
  latest = {key(r): r for r in rows}
  rows = [r for r in rows if latest[key(r)] is r]
  write_results(FLAGS.out, NAME, rows,
                'Reconstruction methods from the same calibrated start',
                columns=['model', 'start', 'method', 'w_bits', 'a_bits', 'first_last_bits', 'mode',
                         'iterations', 'calib_size', 'start_val_top1_pct', 'val_top1_pct',
                         'delta_val_pct', 'start_top1_pct', 'top1_pct', 'fp32_top1_pct',
                         'delta_fp32_pct', 'layers', 'layers_worse',
                         'layers_worse_at_last_step', 'layers_guarded',
                         'mean_layer_error_ratio', 'seconds', 'device', 'command'],
                notes='`first_last_bits`: the bits of the first and last layer (`alike`: '
                      'the same as the others; `input 8-bit`: the network input, 8-bit data, '
                      'kept at 8 bits). `start`: the range initialisation '
                      '(min/max or MSE) every method of that row begins from; `start_*`: that '
                      'calibrated start\'s accuracy. `val_top1_pct`: 5000 train images outside '
                      'the calibration set; `top1_pct`: the test split (reported, never used '
                      'to choose). `layers_worse`: layers whose relative reconstruction '
                      'error on the calibration set ended above its start; '
                      '`layers_worse_at_last_step`: the same for the last optimiser step '
                      '(what the paper\'s AdaQuant returns); `layers_guarded`: layers where '
                      'the guard kept an earlier state. Block-wise methods (`block_*`) count blocks '
                      'in `layers`, `layers_worse`... (a block: a residual block, else a layer). '
                      '`*_holdout`: the guard measures on 20% of the calibration images held '
                      'out of the optimisation, and the layer counts and '
                      '`mean_layer_error_ratio` are on those images. The same options on '
                      'models trained elsewhere (EfficientNet-Lite0 on photos, MiniLM on '
                      'sentences, full settings): results/external_models.md.')


if __name__ == '__main__':
  app.run(main)
