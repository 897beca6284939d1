"""AdaQuant per-layer step speed: ms per iteration of one layer (or every layer of a model).

  python benchmarks/adaquant_speed.py     # ~2 min on 2 CPU cores
  python benchmarks/adaquant_speed.py --depthwise --channels=96 --steps_per_call=1
      # a MobileNetV2 depthwise layer (3x3, one filter per channel; --stride=2 too)
  python benchmarks/adaquant_speed.py --model=mobilenet_v2_fmnist --steps_per_call=1 \
      --iterations=50    # every layer of a bundled model, summed (~5 min on 2 CPU cores)

The default layer: a 3x3 conv 32->32 at 14x14, minibatch 50 out of 1000 cached
calibration inputs, W4A4, weights + bias + both quantizers optimised. No PyTorch
reference is timed here: a comparison must be measured side by side in one run.
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

from common import describe_device, merge_records, read_results, write_results
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
                    'mobilenet_v2_fmnist): one row with the summed ms per iteration.')
flags.DEFINE_integer('iterations', 200, 'Timed iterations per driver.')
flags.DEFINE_list('steps_per_call', ['1', '10', '50'], 'Drivers to time.')
flags.DEFINE_string('out', 'results', 'Output directory.')
flags.DEFINE_string('name', 'adaquant_speed', 'Results file name.')
flags.DEFINE_bool('render_only', False, 'Rewrite results/NAME.md from NAME.json only.')


def _timed(layer, lq, xs, ys, key, iterations, steps_per_call):
  config = AdaQuantConfig(iterations=iterations, batch_size=50)
  runtime = AdaQuantRuntime(steps_per_call=steps_per_call)
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
  xs = jax.nn.relu(jax.random.normal(k3, (1000, s, s, c)))
  lq = LayerQuant(kernel, bias, init_range(kernel, 4, 'minmax', channel_axis=-1),
                  init_range(xs[:100], 4, 'minmax'))
  return name, [(layer, lq, xs, adaquant.float_target(geom, 'relu', LayerQuant(kernel, bias),
                                                      xs))]


def model_layers(key):
  """Every AdaQuant layer of a bundled model at W4A4 (first and last layer 8-bit), each
  with 1000 random non-negative inputs of its shape (the step's cost does not depend on
  the values) and their float targets."""
  model, variables, _ = ptq_jax.load_model(
      ptq_jax.bundled_checkpoints()[f'{FLAGS.model}_fashion_mnist'])
  images = np.asarray(jax.random.uniform(key, (100, 28, 28, 1)))
  base = ptq_jax.quantize(model, variables, images, w_bits=4, a_bits=4, first_last_bits=8)
  cases = []
  for i, layer in enumerate(l for l in base.layers if l.geometry is not None):
    lq = base.qstate[layer.path]
    xs = jax.nn.relu(jax.random.normal(jax.random.fold_in(key, i),
                                       (1000,) + tuple(layer.input_shape)))
    cases.append((layer, lq, xs, adaquant.float_target(
        layer.geometry, layer.activation, LayerQuant(lq.kernel, lq.bias), xs)))
  return f'{FLAGS.model} (all {len(cases)} layers)', cases


def ms_per_iteration(layer, lq, xs, ys, key, steps) -> Tuple[float, dict]:
  """One layer's ms per iteration with ``steps`` steps per call, after compilation."""
  config = AdaQuantConfig(iterations=steps, batch_size=50)
  adaquant.optimize_layer(layer, lq, xs, ys, config, key,
                          runtime=AdaQuantRuntime(steps_per_call=steps))   # compile
  # optimize_layer also measures the reconstruction error before and after; time
  # that alone (0 iterations) and subtract it, so only the steps are counted.
  overhead = min(_timed(layer, lq, xs, ys, key, 0, steps)[0] for _ in range(3))
  seconds, report = _timed(layer, lq, xs, ys, key, FLAGS.iterations, steps)
  return 1000 * (seconds - overhead) / FLAGS.iterations, report


def main(_):
  if FLAGS.render_only:
    return write(read_results(FLAGS.out, FLAGS.name))
  key = jax.random.key(0)
  name, cases = model_layers(key) if FLAGS.model else synthetic_layer(key)
  records = []
  command = 'python benchmarks/adaquant_speed.py ' + ' '.join(sys.argv[1:])
  for steps in (int(v) for v in FLAGS.steps_per_call):
    ms, reports = 0.0, []
    for layer, lq, xs, ys in cases:
      layer_ms, report = ms_per_iteration(layer, lq, xs, ys, key, steps)
      ms += layer_ms
      reports.append(report)
    errors = ({'rel_error_before': round(reports[0]['rel_error_before'], 5),
               'rel_error_after': round(reports[0]['rel_error_after'], 5)}
              if len(cases) == 1 else {'layers': len(cases)})
    records.append({'model': name, 'method': 'adaquant_layer',
                    'driver': 'python loop' if steps == 1 else f'fori_loop x{steps}',
                    'steps_per_call': steps, 'w_bits': 4, 'a_bits': 4, 'calib_size': 1000,
                    'minibatch': 50, 'iterations': FLAGS.iterations, 'ms_per_iteration': round(ms, 2),
                    **errors, 'device': describe_device(), 'command': command})
    print(name, records[-1]['driver'], f'{ms:.2f} ms/iteration')
  write(merge_records(FLAGS.out, FLAGS.name, records, ('model', 'driver', 'device')))


def write(records):
  # Rows of earlier versions divided by a PyTorch figure copied from notes, not measured
  # beside them: that column and its quotient are dropped, never shown as a speed-up.
  records = [{k: (' '.join(t for t in v.split() if not t.startswith('--reference_ms='))
                  if k == 'command' else v) for k, v in r.items()
              if k not in ('reference_ms_per_iteration', 'speedup_vs_reference')}
             for r in records]
  write_results(FLAGS.out, FLAGS.name, records, 'AdaQuant per-layer step speed',
                columns=['model', 'driver', 'w_bits', 'a_bits', 'minibatch', 'iterations',
                         'layers', 'ms_per_iteration',
                         'rel_error_before', 'rel_error_after', 'device', 'command'],
                notes='One AdaQuant step = minibatch sampling, forward/backward through the '
                      'fake-quantized layer and four Adam updates. No PyTorch reference is '
                      'timed here (an earlier version divided by a figure copied from notes; '
                      'that column was dropped). Timed after compilation; the time optimize_layer spends measuring the '
                      'reconstruction error (a 0-iteration call) is subtracted. `dwconv` '
                      'rows: a depthwise 3x3 conv as in MobileNetV2. '
                      '`(all N layers)` rows: one step of every AdaQuant layer of a bundled '
                      'model at W4A4 (first and last layer 8-bit), summed: the cost of one '
                      'iteration of the whole model.')


if __name__ == '__main__':
  app.run(main)
