"""AdaQuant per-layer step speed: ms per iteration of one layer (or every layer of a model).

  python benchmarks/adaquant_speed.py     # ~2 min on 2 CPU cores
  python benchmarks/adaquant_speed.py --depthwise --channels=96 --steps_per_call=1
      # a MobileNetV2 depthwise layer (3x3, one filter per channel; --stride=2 too)
  python benchmarks/adaquant_speed.py --model=mobilenet_v2_fmnist --steps_per_call=1 \
      --iterations=50    # every layer of a bundled model, summed (~5 min on 2 CPU cores)
  python benchmarks/adaquant_speed.py --model=efficientnet_lite0 --steps_per_call=1 \
      --iterations=20 --minibatch=32 --calib_size=64 --micro_batch=0,auto
      # every layer of EfficientNet-Lite0 at 224x224, W4A8, with and without
      # micro-batches (~15 min on 2 CPU cores)

The default layer: a 3x3 conv 32->32 at 14x14, minibatch 50 out of 1000 cached
calibration inputs, W4A4, weights + bias + both quantizers optimised. The PyTorch
reference is timed beside ptq_jax, in one run, by ``benchmarks/reference_adaquant.py``
(its rows land in the same results file).
Each driver is timed after its compilation:
``steps_per_call=1`` is a Python loop over a jitted step, larger values run that many
steps inside one ``lax.fori_loop`` per call. Rows are merged into
results/adaquant_speed.{json,md} by layer, driver and device.
``--render_only`` rewrites results/NAME.md from its JSON without timing anything.
"""

from __future__ import annotations

import sys
import time
from typing import Tuple


import jax
import numpy as np
from absl import app, flags

from common import describe_device, merge_records, read_results, write_adaquant_speed
import ptq_jax
from ptq_jax.stages.adaquant import AdaQuantConfig, AdaQuantRuntime
from ptq_jax.stages.adaquant import layer as adaquant
from ptq_jax.linear import LayerGeometry
from ptq_jax.quant.interceptor import LayerQuant
from ptq_jax.quant.quantizer import init_range
from ptq_jax.trace import LayerInfo

FLAGS = flags.FLAGS
flags.DEFINE_integer('channels', 32, 'Input = output channels of the conv.')
flags.DEFINE_integer('size', 14, 'Spatial size of the layer input.')
flags.DEFINE_bool('depthwise', False, 'A depthwise 3x3 conv (one filter per channel) instead '
                  'of a dense one.')
flags.DEFINE_integer('stride', 1, 'Stride of the conv.')
flags.DEFINE_string('model', '', 'Time every layer of this bundled model instead (e.g. '
                    'mobilenet_v2_fmnist), or of efficientnet_lite0 (W4A8): one row with '
                    'the summed ms per iteration.')
flags.DEFINE_integer('minibatch', 50, 'AdaQuant minibatch.')
flags.DEFINE_integer('calib_size', 1000, 'Cached inputs per layer.')
flags.DEFINE_list('micro_batch', ['auto'], "Micro-batch settings to time: 'auto' "
                  '(AdaQuantRuntime default) or a size (0: the whole minibatch at once).')
flags.DEFINE_integer('iterations', 200, 'Timed iterations per driver.')
flags.DEFINE_list('steps_per_call', ['1', '10', '50'], 'Drivers to time.')
flags.DEFINE_string('out', 'results', 'Output directory.')
flags.DEFINE_string('name', 'adaquant_speed', 'Results file name.')
flags.DEFINE_bool('render_only', False, 'Rewrite results/NAME.md from NAME.json only.')


def _timed(layer, lq, xs, ys, key, iterations, steps_per_call, micro):
  config = AdaQuantConfig(iterations=iterations, batch_size=FLAGS.minibatch)
  runtime = AdaQuantRuntime(steps_per_call=steps_per_call, micro_batch=micro)
  start = time.perf_counter()
  _, report = adaquant.optimize_layer(layer, lq, xs, ys, config, key, runtime=runtime)
  return time.perf_counter() - start, report


def synthetic_layer(key):
  """The default conv layer (or the depthwise / strided variant the flags ask for): its
  name, LayerInfo, starting state, 1000 inputs and float targets."""
  c, s, stride = FLAGS.channels, FLAGS.size, FLAGS.stride
  k1, k2, k3 = jax.random.split(key, 3)
  groups, c_in = (c, 1) if FLAGS.depthwise else (1, c)
  pads = jax.lax.padtype_to_pads((s, s), (3, 3), (stride, stride), 'SAME')
  geom = LayerGeometry('conv', (stride, stride), tuple(map(tuple, pads)), (1, 1), (1, 1),
                       groups)
  out = -(-s // stride)
  layer = LayerInfo('bench/conv', 'conv', (3, 3, c_in, c), groups, (s, s, c), (out, out, c),
                    9 * c_in * c + c, out * out * c * 9 * c_in, geom, activation='relu')
  kernel = jax.random.normal(k1, (3, 3, c_in, c)) * (2.0 / (9 * c_in))**0.5
  name = (f'dwconv{c}_{s}x{s}' if FLAGS.depthwise else f'conv{c}x{c}_{s}x{s}') + (
      f'_stride{stride}' if stride > 1 else '')
  bias = 0.1 * jax.random.normal(k2, (c,))
  xs = jax.nn.relu(jax.random.normal(k3, (FLAGS.calib_size, s, s, c)))
  lq = LayerQuant(kernel, bias, init_range(kernel, 4, 'minmax', channel_axis=-1),
                  init_range(xs[:100], 4, 'minmax'))
  return name, 1, [(layer, lq, xs, adaquant.float_target(geom, 'relu', LayerQuant(kernel, bias),
                                                         xs))]


def a_bits_of(model_name: str) -> int:
  """Activation bits of the measured model: 8 for EfficientNet-Lite0 (its target W4A8),
  4 for everything else."""
  return 8 if model_name == 'efficientnet_lite0' else 4


def model_layers(key):
  """Every AdaQuant layer of a bundled model at W4A4 (or EfficientNet-Lite0 at W4A8),
  first and last layer 8-bit, each with ``calib_size`` random non-negative inputs of its
  shape (the step's cost does not depend on the values) and their float targets, made
  one layer at a time (a generator: EfficientNet's inputs do not fit in memory at once)."""
  if FLAGS.model == 'efficientnet_lite0':
    from ptq_jax.importers.efficientnet import INPUT_SHAPE, load_efficientnet_lite0
    model, variables = load_efficientnet_lite0()
    shape = INPUT_SHAPE
  else:
    model, variables, _ = ptq_jax.load_model(
        ptq_jax.bundled_checkpoints()[f'{FLAGS.model}_fashion_mnist'])
    shape = (28, 28, 1)
  images = np.asarray(jax.random.uniform(key, (16,) + shape))
  base = ptq_jax.quantize(model, variables, images, w_bits=4, a_bits=a_bits_of(FLAGS.model),
                          first_last_bits=8)
  layers = [l for l in base.layers if l.geometry is not None]

  def cases():
    for i, layer in enumerate(layers):
      lq = base.qstate[layer.path]
      xs = jax.nn.relu(jax.random.normal(jax.random.fold_in(key, i),
                                         (FLAGS.calib_size,) + tuple(layer.input_shape)))
      yield layer, lq, xs, adaquant.float_target(
          layer.geometry, layer.activation, LayerQuant(lq.kernel, lq.bias), xs)
  return f'{FLAGS.model} (all {len(layers)} layers)', len(layers), cases()


def ms_per_iteration(layer, lq, xs, ys, key, steps, micro) -> Tuple[float, dict]:
  """One layer's ms per iteration with ``steps`` steps per call, after compilation."""
  config = AdaQuantConfig(iterations=steps, batch_size=FLAGS.minibatch)
  adaquant.optimize_layer(layer, lq, xs, ys, config, key, runtime=AdaQuantRuntime(
      steps_per_call=steps, micro_batch=micro))   # compile
  # optimize_layer also measures the reconstruction error before and after; time
  # that alone (0 iterations) and subtract it, so only the steps are counted.
  overhead = min(_timed(layer, lq, xs, ys, key, 0, steps, micro)[0] for _ in range(3))
  seconds, report = _timed(layer, lq, xs, ys, key, FLAGS.iterations, steps, micro)
  return 1000 * (seconds - overhead) / FLAGS.iterations, report


def main(_):
  if FLAGS.render_only:
    return write(read_results(FLAGS.out, FLAGS.name))
  key = jax.random.key(0)
  name, count, cases = model_layers(key) if FLAGS.model else synthetic_layer(key)
  settings = [(int(v), m) for v in FLAGS.steps_per_call for m in FLAGS.micro_batch]
  micro_of = {m: None if m == 'auto' else int(m) for m in FLAGS.micro_batch}
  ms = {s: 0.0 for s in settings}
  reports = {s: [] for s in settings}
  for layer, lq, xs, ys in cases:   # each layer's cases once, every setting on them
    for steps, m in settings:
      layer_ms, report = ms_per_iteration(layer, lq, xs, ys, key, steps, micro_of[m])
      ms[steps, m] += layer_ms
      reports[steps, m].append(report)
    print(layer.path, {f'{s}/{m}': round(v, 1) for (s, m), v in ms.items()}, flush=True)
  records = []
  command = 'python benchmarks/adaquant_speed.py ' + ' '.join(sys.argv[1:])
  for steps, m in settings:
    first = reports[steps, m][0]
    errors = ({'rel_error_before': round(first['rel_error_before'], 5),
               'rel_error_after': round(first['rel_error_after'], 5)}
              if count == 1 else {'layers': count})
    records.append({'model': name, 'method': 'adaquant_layer',
                    'driver': 'python loop' if steps == 1 else f'fori_loop x{steps}',
                    'steps_per_call': steps, 'micro_batch': 'off' if m == '0' else m,
                    'w_bits': 4, 'a_bits': a_bits_of(FLAGS.model),
                    'calib_size': FLAGS.calib_size, 'minibatch': FLAGS.minibatch,
                    'iterations': FLAGS.iterations,
                    'ms_per_iteration': round(ms[steps, m], 2),
                    **errors, 'device': describe_device(), 'command': command})
    print(name, records[-1]['driver'], m, f'{ms[steps, m]:.2f} ms/iteration')
  write(merge_records(FLAGS.out, FLAGS.name, records,
                      ('model', 'driver', 'micro_batch', 'minibatch', 'device')))


def write(records):
  write_adaquant_speed(FLAGS.out, FLAGS.name, records)


if __name__ == '__main__':
  app.run(main)
