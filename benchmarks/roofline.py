"""Where reconstruction's time goes on this machine: each AdaQuant step kind and whole-model
iteration beside the fp32 FLOP/s this device attains, measured in the same run.

  python benchmarks/roofline.py                   # every row (~30 min on 2 CPU cores)
  python benchmarks/roofline.py --kinds=conv3x3,depthwise --models= --ranges=

Rows (``results/roofline.{json,md}``):

* ``attainable``: a 2048^3 matmul and a 3x3 conv (32x56x56x128 -> 128) through XLA,
  the best of five calls each; the larger is the attainable fp32 FLOP/s every other row
  is divided by. ``attainable memory``: ``a * c + d`` over a 512 MiB float32 array (far
  beyond the caches), best of five: the bandwidth of the memory roof.
* single-layer step kinds (W4A4, minibatch 50 of ``--calib_size`` cached inputs, the
  default settings): dense (64 tokens x 384 -> 384), 3x3 conv (32 -> 32 at 14x14),
  1x1 conv (96 -> 96 at 14x14), depthwise 3x3 (96 channels at 14x14), a stride-2 3x3
  conv (32 -> 64 at 28x28), the 3x3 conv with learned rounding and with QDrop (0.5).
* whole-model iterations (every AdaQuant layer, W4A4 or W4A8 for EfficientNet-Lite0,
  first and last layer 8-bit, parallel mode, ``--model_calib`` random inputs):
  ResNet-20 and MobileNetV2 (F-MNIST) layer-wise and block-wise, EfficientNet-Lite0 and
  MobileNetV2 at 224x224.
* ``--ranges``: activation-range initialisation (min/max, MSE, percentile) of
  MobileNetV2 at 224x224 on ``--range_images`` random images, seconds.

ms per iteration is the difference of two runs that differ only in their iteration count
(compilation, captures, the float targets and the guard's error passes cancel),
divided by that difference. FLOPs are counted from the shapes: 6 x MACs x minibatch
per layer (forward, input gradient and kernel gradient), elementwise work not counted.
Bytes likewise: the minibatch's inputs and outputs in float32, each read in the forward
pass and again in the backward pass (2 x 4 x minibatch x (input + output elements) per
layer), a lower bound of a step's traffic. ``roof_ms`` = max(FLOPs / attainable FLOP/s,
bytes / attainable bandwidth): what the step would take at the roof that binds it
(``bound``); ``fraction_of_roof`` = roof_ms / ms_per_iteration. A working set that stays
in the caches can beat the memory roof (the fraction is then above what DRAM allows).
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, Dict, List, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from common import concurrency_fields, describe_device, merge_records, read_results, write_results
import ptq_jax
from ptq_jax.linear import LayerGeometry
from ptq_jax.quant.interceptor import LayerQuant
from ptq_jax.quant.quantizer import init_range
from ptq_jax.stages.adaquant import AdaQuantConfig, AdaQuantRuntime, run_adaquant
from ptq_jax.stages.adaquant import layer as adaquant
from ptq_jax.stages.prepare import prepare
from ptq_jax.trace import LayerInfo

KINDS = ('dense', 'conv3x3', 'conv1x1', 'depthwise', 'stride2', 'learned_rounding', 'qdrop')
MODELS = ('resnet20', 'resnet20_blocks', 'mobilenet_v2_fmnist', 'mobilenet_v2_fmnist_blocks',
          'efficientnet_lite0', 'mobilenet_v2_224')
flags.DEFINE_list('kinds', list(KINDS), f'Single-layer step kinds: {", ".join(KINDS)}.')
flags.DEFINE_list('models', list(MODELS), f'Whole-model iterations: {", ".join(MODELS)}.')
flags.DEFINE_list('forward', ['resnet20'], 'Bundled models whose W4A4 quantized forward '
                  'pass over 250 images is timed (the unit of the BN-tuning, sensitivity and '
                  'evaluation passes).')
flags.DEFINE_list('ranges', ['minmax', 'mse', 'percentile'],
                  'Activation-range methods timed on MobileNetV2 at 224x224.')
flags.DEFINE_integer('calib_size', 1000, 'Cached inputs of a single layer.')
flags.DEFINE_integer('iterations', 100, 'Extra iterations timed per single layer.')
flags.DEFINE_integer('model_calib', 64, 'Random inputs of a whole-model run.')
flags.DEFINE_integer('model_iterations', 0, 'Extra iterations timed per whole model (0: '
                     '40 at 28x28, 4 at 224x224).')
flags.DEFINE_integer('range_images', 32, 'Images of the range-initialisation rows.')
flags.DEFINE_string('out', 'results', 'Output directory.')
FLAGS = flags.FLAGS
NAME = 'roofline'
COMMAND = ' '.join(['python benchmarks/roofline.py'] + sys.argv[1:])
MINIBATCH = 50


def best_seconds(fn: Callable[[], Any], repeats: int = 5) -> float:
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return min(times)


def attainable() -> List[Dict[str, Any]]:
  """fp32 FLOP/s of a large matmul and a large conv through XLA on this device."""
  a = jax.random.normal(jax.random.key(0), (2048, 2048))
  mm = jax.jit(lambda a: a @ a)
  x = jax.random.normal(jax.random.key(1), (32, 56, 56, 128))
  k = jax.random.normal(jax.random.key(2), (3, 3, 128, 128))
  conv = jax.jit(lambda x, k: jax.lax.conv_general_dilated(
      x, k, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')))
  rows = []
  big = jnp.ones((128 * 2**20,), jnp.float32)   # 512 MiB
  stream = jax.jit(lambda a: a * 1.0001 + 1.0)
  seconds = best_seconds(lambda: stream(big))
  rows.append({'model': 'stream a*c+d over 512 MiB', 'stage': 'attainable memory',
               'mbytes': round(2 * big.nbytes / 1e6, 1),
               'ms_per_iteration': round(1000 * seconds, 3),
               'gbytes_per_s': round(2 * big.nbytes / seconds / 1e9, 2)})
  del big
  for name, flops, fn in (('matmul 2048^3', 2 * 2048**3, lambda: mm(a)),
                          ('conv 3x3 32x56x56x128->128', 2 * 32 * 56 * 56 * 9 * 128 * 128,
                           lambda: conv(x, k))):
    seconds = best_seconds(fn)
    rows.append({'model': name, 'stage': 'attainable', 'gflop': round(flops / 1e9, 3),
                 'ms_per_iteration': round(1000 * seconds, 3),
                 'gflop_per_s': round(flops / seconds / 1e9, 1)})
  return rows


def _layer(kind: str, key) -> Tuple[LayerInfo, LayerQuant, jnp.ndarray, jnp.ndarray]:
  """A synthetic layer of ``kind`` (its LayerInfo, W4A4 min/max start, cached inputs,
  float targets)."""
  k1, k2, k3 = jax.random.split(key, 3)
  if kind == 'dense':
    tokens, c_in, c_out = 64, 384, 384
    kernel_shape, groups, in_shape, out_shape = (c_in, c_out), 1, (tokens, c_in), (tokens, c_out)
    geom, macs, act = LayerGeometry('dense'), tokens * c_in * c_out, 'none'
  else:
    c_in, c_out, size, k, stride, groups = {
        'conv1x1': (96, 96, 14, 1, 1, 1), 'depthwise': (96, 96, 14, 3, 1, 96),
        'stride2': (32, 64, 28, 3, 2, 1)}.get(kind, (32, 32, 14, 3, 1, 1))
    pads = jax.lax.padtype_to_pads((size, size), (k, k), (stride, stride), 'SAME')
    geom = LayerGeometry('conv', (stride, stride), tuple(map(tuple, pads)), (1, 1), (1, 1),
                         groups)
    out = -(-size // stride)
    kernel_shape = (k, k, c_in // groups, c_out)
    in_shape, out_shape = (size, size, c_in), (out, out, c_out)
    macs, act = out * out * c_out * k * k * (c_in // groups), 'relu'
  layer = LayerInfo(f'roofline/{kind}', geom.kind, kernel_shape, groups, in_shape, out_shape,
                    int(np.prod(kernel_shape)) + kernel_shape[-1], macs, geom, activation=act)
  fan_in = int(np.prod(kernel_shape[:-1]))
  kernel = jax.random.normal(k1, kernel_shape) * (2.0 / fan_in)**0.5
  bias = 0.1 * jax.random.normal(k2, (kernel_shape[-1],))
  xs = jax.nn.relu(jax.random.normal(k3, (FLAGS.calib_size,) + in_shape))
  lq = LayerQuant(kernel, bias, init_range(kernel, 4, 'minmax', channel_axis=-1),
                  init_range(xs[:100], 4, 'minmax'))
  return layer, lq, xs, adaquant.float_target(geom, act, LayerQuant(kernel, bias), xs)


def _difference(run: Callable[[int], Any], base: int, extra: int) -> float:
  """Seconds per iteration: (time of base + extra iterations - time of base) / extra,
  after a compiling run of each."""
  run(base), run(base + extra)
  timed = {}
  for n in (base, base + extra, base, base + extra):
    start = time.perf_counter()
    jax.block_until_ready(jax.tree.leaves(run(n)))
    timed.setdefault(n, []).append(time.perf_counter() - start)
  return (min(timed[base + extra]) - min(timed[base])) / extra


def single_layer(kind: str) -> Dict[str, Any]:
  layer, lq, xs, ys = _layer(kind, jax.random.key(0))
  settings = {'learned_rounding': {'rounding': 'learned'}, 'qdrop': {'drop_prob': 0.5}}
  def run(n):
    config = AdaQuantConfig(iterations=n, batch_size=MINIBATCH, **settings.get(kind, {}))
    return adaquant.optimize_layer(layer, lq, xs, ys, config, jax.random.key(1),
                                   runtime=AdaQuantRuntime())[0]
  seconds = _difference(run, 4, FLAGS.iterations)
  return {'timed_iterations': FLAGS.iterations, 'model': f'{kind} ({_shape_label(layer)})',
          'stage': 'adaquant step',
          'w_bits': 4, 'a_bits': 4, 'calib_size': FLAGS.calib_size, 'minibatch': MINIBATCH,
          'layers': 1, 'gflop': round(6 * layer.macs * MINIBATCH / 1e9, 4),
          'mbytes': round(_step_bytes([layer], MINIBATCH) / 1e6, 2),
          'ms_per_iteration': round(1000 * seconds, 3)}


def _step_bytes(layers, minibatch: int, passes: int = 2) -> int:
  """Lower bound of a step's memory traffic: each layer's minibatch inputs and outputs
  (float32) read once per pass (a step: the forward and the backward pass)."""
  return sum(passes * 4 * minibatch * (int(np.prod(l.input_shape))
                                       + int(np.prod(l.output_shape))) for l in layers)


def _shape_label(layer: LayerInfo) -> str:
  if layer.kind == 'dense':
    return f'{layer.input_shape[0]} tokens, {layer.kernel_shape[0]}->{layer.kernel_shape[1]}'
  k, s = layer.kernel_shape[0], layer.geometry.strides[0]
  c_in = layer.input_shape[-1]
  return (f'{k}x{k} {c_in}->{layer.kernel_shape[-1]} at {layer.input_shape[0]}x'
          f'{layer.input_shape[1]}' + (f' stride {s}' if s > 1 else '')
          + (' depthwise' if layer.groups > 1 else ''))


def _model(name: str):
  """(model, variables, input shape, a_bits) of a whole-model row."""
  if name == 'efficientnet_lite0':
    from ptq_jax.importers.efficientnet import INPUT_SHAPE, load_efficientnet_lite0
    return (*load_efficientnet_lite0(), INPUT_SHAPE, 8)
  if name == 'mobilenet_v2_224':
    from ptq_jax.importers.torchvision_mobilenet import INPUT_SHAPE, load_mobilenet_v2
    return (*load_mobilenet_v2(), INPUT_SHAPE, 4)
  bundled = {'resnet20': 'resnet20', 'resnet20_blocks': 'resnet20',
             'mobilenet_v2_fmnist': 'mobilenet_v2_fmnist',
             'mobilenet_v2_fmnist_blocks': 'mobilenet_v2_fmnist'}[name]
  model, variables, _ = ptq_jax.load_model(
      ptq_jax.bundled_checkpoints()[f'{bundled}_fashion_mnist'])
  return model, variables, (28, 28, 1), 4


def whole_model(name: str) -> Dict[str, Any]:
  model, variables, shape, a_bits = _model(name)
  images = np.asarray(jax.random.uniform(jax.random.key(0), (FLAGS.model_calib,) + shape))
  base = ptq_jax.quantize(model, variables, images[:16], w_bits=4, a_bits=a_bits,
                          first_last_bits=8)
  prepared = prepare(model, variables, images, progress=False)
  unit = 'block' if name.endswith('_blocks') else 'layer'
  batch = min(MINIBATCH, FLAGS.model_calib)

  def run(n):
    config = AdaQuantConfig(iterations=n, batch_size=batch, unit=unit)
    return run_adaquant(prepared, base.qstate, 'parallel', config, jax.random.key(1))[0]
  extra = FLAGS.model_iterations or (4 if shape[0] > 100 else 40)
  seconds = _difference(run, 4, extra)
  layers = [l for l in base.layers if l.geometry is not None]
  return {'model': f'{name} (all {len(layers)} layers, {unit}-wise)',
          'stage': 'adaquant iteration', 'w_bits': 4, 'a_bits': a_bits,
          'calib_size': FLAGS.model_calib, 'minibatch': batch, 'layers': len(layers),
          'timed_iterations': extra,
          'gflop': round(sum(6 * l.macs * batch for l in layers) / 1e9, 3),
          'mbytes': round(_step_bytes(layers, batch) / 1e6, 1),
          'ms_per_iteration': round(1000 * seconds, 1)}


def forward_row(name: str) -> Dict[str, Any]:
  """ms of one W4A4 quantized forward pass (``QuantizedModel.predict``'s program) over a
  batch of 250 images: the unit every whole-network pass of the stages is made of."""
  model, variables, shape, _ = _model(name)
  images = jax.random.uniform(jax.random.key(0), (250,) + shape)
  base = ptq_jax.quantize(model, variables, np.asarray(images[:16]), w_bits=4, a_bits=4,
                          first_last_bits=8)
  seconds = best_seconds(lambda: base.apply(images))
  layers = [l for l in base.layers if l.geometry is not None]
  return {'model': f'{name} (250 images)', 'stage': 'quantized forward', 'w_bits': 4,
          'a_bits': 4, 'minibatch': 250, 'layers': len(layers),
          'gflop': round(sum(2 * l.macs * 250 for l in layers) / 1e9, 3),
          'mbytes': round(_step_bytes(layers, 250, passes=1) / 1e6, 1),
          'ms_per_iteration': round(1000 * seconds, 2)}


def range_rows() -> List[Dict[str, Any]]:
  from ptq_jax.importers.torchvision_mobilenet import INPUT_SHAPE, load_mobilenet_v2
  model, variables = load_mobilenet_v2()
  images = np.asarray(jax.random.uniform(jax.random.key(0),
                                         (FLAGS.range_images,) + INPUT_SHAPE))
  rows = []
  for method in FLAGS.ranges:
    run = lambda: ptq_jax.quantize(model, variables, images, w_bits=4, a_bits=4,
                                   ranges=ptq_jax.RangeConfig(method=method)).qstate
    run()   # compiled
    start = time.perf_counter()
    run()
    rows.append({'model': 'mobilenet_v2_224', 'stage': f'ranges ({method})', 'w_bits': 4,
                 'a_bits': 4, 'calib_size': FLAGS.range_images,
                 'seconds': round(time.perf_counter() - start, 2)})
    print(rows[-1], flush=True)
  return rows


def main(_):
  # The attainable rows are the denominators of the step rows measured beside them: a
  # run with neither step kinds nor models (range rows only) leaves them as they are.
  peak = attainable() if FLAGS.kinds or FLAGS.models or FLAGS.forward else []
  for row in peak:
    print(row, flush=True)
  best = max([r['gflop_per_s'] for r in peak if 'gflop_per_s' in r] or [0.0])
  bandwidth = max([r['gbytes_per_s'] for r in peak if 'gbytes_per_s' in r] or [0.0])
  rows = list(peak)
  for kind in FLAGS.kinds:
    rows.append(single_layer(kind))
    print(rows[-1], flush=True)
  for name in FLAGS.models:
    rows.append(whole_model(name))
    print(rows[-1], flush=True)
  for name in FLAGS.forward:
    rows.append(forward_row(name))
    print(rows[-1], flush=True)
  for row in rows:
    if 'gflop' in row and row['stage'] != 'attainable':
      row['gflop_per_s'] = round(row['gflop'] / (row['ms_per_iteration'] / 1000), 1)
      row['fraction_of_attainable'] = round(row['gflop_per_s'] / best, 3)
      compute_ms, memory_ms = row['gflop'] / best * 1e3, row['mbytes'] / bandwidth
      row['roof_ms'] = round(max(compute_ms, memory_ms), 3)
      row['bound'] = 'compute' if compute_ms >= memory_ms else 'memory'
      row['fraction_of_roof'] = round(row['roof_ms'] / row['ms_per_iteration'], 3)
  if FLAGS.ranges:
    rows += range_rows()
  fields = {'device': describe_device(), 'command': COMMAND, **concurrency_fields()}
  rows = [{**r, **fields} for r in rows]
  write(merge_records(FLAGS.out, NAME, rows, ('model', 'stage', 'device')))


def write(records):
  write_results(FLAGS.out, NAME, records, 'Roofline: AdaQuant step kinds against attainable '
                'fp32 FLOP/s',
                columns=['model', 'stage', 'w_bits', 'a_bits', 'calib_size', 'minibatch',
                         'layers', 'gflop', 'mbytes', 'ms_per_iteration', 'gflop_per_s',
                         'fraction_of_attainable', 'gbytes_per_s', 'roof_ms', 'bound',
                         'fraction_of_roof', 'seconds', 'device', 'command',
                         'concurrent_processes'],
                notes='`attainable` rows: the best of five calls of a large matmul and a '
                      'large conv through XLA, measured in the same run as the others; '
                      '`fraction_of_attainable` divides by the larger. `gflop`: 6 x MACs x '
                      'minibatch per layer (forward, input and kernel gradients; '
                      'elementwise work not counted). `attainable memory`: a*c+d streamed over '
                      'a 512 MiB array (read and write). `mbytes`: 2 x 4 x minibatch x (input + '
                      'output elements) per layer (inputs and outputs read in the forward and '
                      'in the backward pass), a lower bound of the traffic. `roof_ms`: '
                      'max(gflop / attainable FLOP/s, mbytes / attainable bandwidth), the roof '
                      'that binds (`bound`); `fraction_of_roof` = roof_ms / ms_per_iteration '
                      '(working sets held in the caches can beat the memory roof). ms per '
                      'iteration: the difference of two runs differing only in iteration '
                      'count, divided by it (compilation, captures and error passes cancel). '
                      '`quantized forward`: one W4A4 forward pass over 250 images (FLOPs 2 x '
                      'MACs, bytes each layer\'s input and output once). Whole-model rows '
                      'run parallel AdaQuant on random inputs (the cost does not depend on '
                      'the values). `ranges (...)`: seconds of `ptq_jax.quantize` with '
                      'that activation-range method, after a compiling call.')


if __name__ == '__main__':
  app.run(main)
