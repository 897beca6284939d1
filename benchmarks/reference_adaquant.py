"""ptq_jax's AdaQuant step beside the reference implementation's, on the same layer and
data, timed alternately in one process.

  python benchmarks/reference_adaquant.py --calibtip_dir=PATH/TO/CalibTIP

The reference is CalibTIP's own ``adaquant()`` (``utils/adaquant.py`` of the public
repository itayhubara/CalibTIP) on its ``QConv2d`` (``models/modules/quantize.py``):
Adam on the weight, the bias and both quantizers' ranges and zero points, minibatch
50 out of 1,000 cached inputs, W4A4 per-channel weights. ptq_jax's side is
``stages.adaquant.layer.optimize_layer`` on the same layer (its Python-loop driver),
the same inputs (NHWC) and float targets. One-time set-up, nothing installed at run
time: PyTorch importable by this interpreter (``pip install torch``; a separate venv
works if it can also import ptq_jax) and a checkout of CalibTIP (``git clone
https://github.com/itayhubara/CalibTIP``, or its files anywhere). Each round times
``--iterations`` steps of each implementation (the time of ``4 + iterations`` steps less
that of 4, so fixed costs such as error evaluations cancel on both sides), one after the
other; the medians over
``--rounds`` rounds and their ratio are merged into results/adaquant_speed.{json,md}
(driver ``python loop, beside CalibTIP``).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from typing import Any, Tuple

import jax
import numpy as np
from absl import app, flags

from common import concurrency_fields, describe_device, merge_records, write_adaquant_speed
from ptq_jax.linear import LayerGeometry
from ptq_jax.quant.interceptor import LayerQuant
from ptq_jax.quant.quantizer import init_range
from ptq_jax.stages.adaquant import AdaQuantConfig, AdaQuantRuntime
from ptq_jax.stages.adaquant import layer as adaquant
from ptq_jax.trace import LayerInfo

flags.DEFINE_string('calibtip_dir', os.environ.get('CALIBTIP_DIR', ''),
                    'A checkout of github.com/itayhubara/CalibTIP (default $CALIBTIP_DIR).')
flags.DEFINE_list('layers', ['32x14', '64x7', '16x28'],
                  'Layers: CHANNELSxSIZE, a 3x3 conv CHANNELS -> CHANNELS at SIZE x SIZE.')
flags.DEFINE_integer('iterations', 100, 'Timed steps per implementation and round.')
flags.DEFINE_integer('rounds', 3, 'Alternating rounds (the median is kept).')
flags.DEFINE_string('out', 'results', 'Output directory.')
FLAGS = flags.FLAGS
NAME = 'adaquant_speed'
COMMAND = ' '.join(['python benchmarks/reference_adaquant.py'] + [
    a for a in sys.argv[1:] if not a.startswith('--calibtip_dir')])
CALIB, MINIBATCH, BITS = 1000, 50, 4
BASE = 4   # steps of the run whose time is subtracted, on both sides


def reference_modules(directory: str) -> Tuple[Any, Any, Any]:
  """(torch, CalibTIP's quantize module, its adaquant module), or a clear error."""
  try:
    import torch
  except ImportError as e:
    raise SystemExit(f'PyTorch is not importable ({e}): pip install torch, once.') from e
  paths = [os.path.join(directory, 'models', 'modules', 'quantize.py'),
           os.path.join(directory, 'utils', 'adaquant.py')]
  if not directory or not all(os.path.isfile(p) for p in paths):
    raise SystemExit('--calibtip_dir must be a checkout of github.com/itayhubara/CalibTIP '
                     f'holding {", ".join(os.path.relpath(p, directory or ".") for p in paths)}.')
  loaded = []
  for name, path in zip(('calibtip_quantize', 'calibtip_adaquant'), paths):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    loaded.append(module)
  return torch, loaded[0], loaded[1]


def layer_data(channels: int, size: int, key):
  """The layer (kernel HWIO, bias), 1,000 non-negative inputs (NHWC) and the float
  layer's ReLU outputs."""
  k1, k2, k3 = jax.random.split(key, 3)
  kernel = np.asarray(jax.random.normal(k1, (3, 3, channels, channels))
                      * (2.0 / (9 * channels))**0.5, np.float32)
  bias = np.asarray(0.1 * jax.random.normal(k2, (channels,)), np.float32)
  xs = np.asarray(jax.nn.relu(jax.random.normal(k3, (CALIB, size, size, channels))),
                  np.float32)
  return kernel, bias, xs


def ptq_jax_case(kernel, bias, xs):
  """(LayerInfo, starting LayerQuant, inputs, float targets) for ptq_jax's step."""
  c, s = kernel.shape[-1], xs.shape[1]
  geom = LayerGeometry('conv', (1, 1), ((1, 1), (1, 1)), (1, 1), (1, 1), 1)
  layer = LayerInfo('bench/conv', 'conv', kernel.shape, 1, (s, s, c), (s, s, c),
                    kernel.size + c, s * s * kernel.size, geom, activation='relu')
  lq = LayerQuant(kernel, bias, init_range(kernel, BITS, 'minmax', channel_axis=-1),
                  init_range(xs[:100], BITS, 'minmax'))
  ys = adaquant.float_target(geom, 'relu', LayerQuant(kernel, bias), xs)
  return layer, lq, xs, ys


def ptq_jax_seconds(case, key, iterations: int) -> Tuple[float, Tuple[float, float]]:
  """Seconds of ``iterations`` steps of ptq_jax's AdaQuant on the layer: the time of a
  run with ``BASE + iterations`` steps less that of one with ``BASE`` (the error passes
  before, between and after the steps are the same in both and cancel)."""
  layer, lq, xs, ys = case
  runtime = AdaQuantRuntime(steps_per_call=1)
  run = lambda n: adaquant.optimize_layer(layer, lq, xs, ys, AdaQuantConfig(
      iterations=n, batch_size=MINIBATCH), key, runtime=runtime)
  run(BASE)   # compiled
  start = time.perf_counter()
  run(BASE)
  overhead = time.perf_counter() - start
  start = time.perf_counter()
  _, report = run(BASE + iterations)
  return (time.perf_counter() - start - overhead,
          (report['mse_before'], report['mse_after']))


def reference_seconds(torch, quantize, adaquant_ref, kernel, bias, xs,
                      iterations: int) -> Tuple[float, Tuple[float, float]]:
  """CalibTIP's ``adaquant()`` on its ``QConv2d`` with the same layer and data."""
  c = kernel.shape[-1]
  layer = quantize.QConv2d(c, c, 3, padding=1, bias=True, num_bits=BITS,
                           num_bits_weight=BITS, measure=False)
  with torch.no_grad():
    layer.weight.copy_(torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()))
    layer.bias.copy_(torch.from_numpy(bias.copy()))
    inputs = torch.from_numpy(xs.transpose(0, 3, 1, 2).copy())
    w = layer.weight.reshape(c, -1)   # min/max ranges, as CalibTIP's measure pass sets
    layer.quantize_weight.running_zero_point.copy_(w.min(1)[0].reshape(c, 1, 1, 1))
    layer.quantize_weight.running_range.copy_((w.max(1)[0] - w.min(1)[0]).reshape(c, 1, 1, 1))
    layer.quantize_input.running_zero_point.fill_(float(inputs[:100].min()))
    layer.quantize_input.running_range.fill_(float(inputs[:100].max() - inputs[:100].min()))
    outputs = torch.relu(torch.nn.functional.conv2d(inputs, layer.weight, layer.bias,
                                                     padding=1))
  test_in, test_out = inputs[:MINIBATCH], outputs[:MINIBATCH]
  call = lambda n: adaquant_ref.adaquant(layer, inputs, outputs, test_in, test_out, iters=n,
                                         progress=False, batch_size=MINIBATCH, relu=True)
  call(BASE)   # warm
  start = time.perf_counter()
  call(BASE)
  overhead = time.perf_counter() - start
  start = time.perf_counter()
  errors = call(BASE + iterations)   # (its MSE on one minibatch before and after)
  return time.perf_counter() - start - overhead, errors


def main(_):
  torch, quantize, adaquant_ref = reference_modules(FLAGS.calibtip_dir)
  records, key = [], jax.random.key(0)
  for spec in FLAGS.layers:
    channels, size = (int(v) for v in spec.split('x'))
    kernel, bias, xs = layer_data(channels, size, key)
    case = ptq_jax_case(kernel, bias, xs)
    ours, theirs = [], []
    for _ in range(FLAGS.rounds):
      seconds, ref_errors = reference_seconds(torch, quantize, adaquant_ref, kernel, bias, xs,
                                              FLAGS.iterations)
      theirs.append(seconds)
      seconds, our_errors = ptq_jax_seconds(case, key, FLAGS.iterations)
      ours.append(seconds)
    ms = lambda t: round(1000 * float(np.median(t)) / FLAGS.iterations, 3)
    records.append({'model': f'conv{channels}x{channels}_{size}x{size}',
                    'method': 'adaquant_layer', 'driver': 'python loop, beside CalibTIP',
                    'micro_batch': 'auto', 'w_bits': BITS, 'a_bits': BITS,
                    'calib_size': CALIB, 'minibatch': MINIBATCH,
                    'iterations': FLAGS.iterations, 'rounds': FLAGS.rounds,
                    'ms_per_iteration': ms(ours), 'calibtip_ms_per_iteration': ms(theirs),
                    'speedup_over_calibtip': round(float(np.median(theirs) / np.median(ours)),
                                                   2),
                    'reference_mse_before': round(float(ref_errors[0]), 6),
                    'reference_mse_after': round(float(ref_errors[1]), 6),
                    'ptq_jax_mse_before': round(float(our_errors[0]), 6),
                    'ptq_jax_mse_after': round(float(our_errors[1]), 6),
                    'reference': f'CalibTIP adaquant(), torch {torch.__version__}',
                    'device': describe_device(), 'command': COMMAND, **concurrency_fields()})
    print(records[-1], flush=True)
  write_adaquant_speed(FLAGS.out, NAME, merge_records(
      FLAGS.out, NAME, records, ('model', 'driver', 'micro_batch', 'minibatch', 'device')))


if __name__ == '__main__':
  app.run(main)
