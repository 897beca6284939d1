"""Whole-model AdaQuant timing on an ImageNet-sized network (meant for a GPU).

  python benchmarks/resnet50_gpu.py                       # ResNet-50, 1000 images, 1000 its
  python benchmarks/resnet50_gpu.py --calib_size=64 --iterations=20 --image_size=64  # smoke

Times parallel-mode AdaQuant of every conv/dense layer of ResNet-50 (all at W4A4;
random weights, synthetic N(0, 1) calibration images: the timing does not depend on
their values):
wall time per stage (range calibration, AdaQuant), ms per iteration per layer, and
the achieved TFLOP/s of the AdaQuant steps, counting forward and backward as three
times the layer's forward MACs x 2 FLOPs x minibatch. Writes results/NAME.{json,md}
(default ``resnet50_gpu``), merging rows by (model, device, stage). Then times the
sensitivity table for two options (W8A8 ranges and the AdaQuant state).
"""

from __future__ import annotations

import os
import sys
import time


import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from common import describe_device, merge_records, new_rows_from, write_results
import ptq_jax
from ptq_jax.data.loader import CalibrationSet
from ptq_jax.models import create_model
from ptq_jax.stages.sensitivity import sensitivity_table

FLAGS = flags.FLAGS
flags.DEFINE_string('model', 'resnet50', 'Registered model name.')
flags.DEFINE_integer('image_size', 224, 'Input resolution.')
flags.DEFINE_integer('calib_size', 1000, 'Calibration images.')
flags.DEFINE_integer('iterations', 1000, 'AdaQuant iterations per layer.')
flags.DEFINE_integer('batch_size', 50, 'AdaQuant minibatch.')
flags.DEFINE_integer('w_bits', 4, 'Weight bits.')
flags.DEFINE_integer('a_bits', 4, 'Activation bits.')
flags.DEFINE_float('capture_budget_mb', 0.0, 'Device memory for captured layer inputs '
                   '(fewer, larger capture groups on a big GPU); 0: 35% of the device memory '
                   '(16 GiB where the device does not say).')
flags.DEFINE_integer('eval_batch_size', 0, 'AdaQuantConfig.eval_batch_size: the batch of each '
                     'layer\'s float-target and error passes (0: the default, the minibatch '
                     'on a GPU; 1000: the whole set, as before).')
flags.DEFINE_integer('steps_per_call', 0, 'AdaQuantConfig.steps_per_call (0: the default, every '
                     'step in one call on a GPU). With batched passes and every step in one '
                     'call, each layer is one program (layer_program=one).')
flags.DEFINE_bool('sensitivity', True, 'Also time the sensitivity table for two options.')
flags.DEFINE_string('out', 'results', 'Output directory.')
flags.DEFINE_list('merge_from', [], 'Only merge the rows of these output directories (e.g. '
                  'from a GPU machine) into --out, then exit.')
flags.DEFINE_string('name', 'resnet50_gpu', 'Results file name.')

KEY_FIELDS = ('model', 'stage', 'device', 'calib_size', 'iterations', 'compilation',
              'compilation_cache', 'xla_flags', 'eval_batch', 'layer_program')


def main(_):
  if FLAGS.merge_from:
    return save(new_rows_from(FLAGS.merge_from, FLAGS.out, FLAGS.name))
  command = 'python benchmarks/resnet50_gpu.py ' + ' '.join(sys.argv[1:])
  if os.environ.get('XLA_FLAGS'):   # part of how the row was measured
    command = f"XLA_FLAGS='{os.environ['XLA_FLAGS']}' {command}"
  cache_state = compilation_cache_state()
  model = create_model(FLAGS.model)
  shape = (FLAGS.image_size, FLAGS.image_size, 3)
  variables = jax.jit(lambda k: model.init(k, jnp.zeros((1,) + shape), train=False))(
      jax.random.key(0))
  images = np.asarray(jax.random.normal(jax.random.key(1), (FLAGS.calib_size,) + shape),
                      np.float32)
  calib = CalibrationSet(images, np.arange(FLAGS.calib_size), 'synthetic', 'train', 1)
  layers = ptq_jax.trace(model, variables, images[:1])
  config = ptq_jax.AdaQuantConfig(iterations=FLAGS.iterations, batch_size=FLAGS.batch_size)
  runtime = ptq_jax.AdaQuantRuntime(
      capture_budget_mb=FLAGS.capture_budget_mb or capture_budget(),
      eval_batch_size=FLAGS.eval_batch_size or None, steps_per_call=FLAGS.steps_per_call or None)
  print(f'capture budget {runtime.capture_budget_mb:.0f} MB', flush=True)
  compiles = CompileLog()
  jax.monitoring.register_event_duration_secs_listener(compiles)
  start = time.time()
  qm = ptq_jax.quantize(model, variables, calib, w_bits=FLAGS.w_bits, a_bits=FLAGS.a_bits,
                        first_last_bits=None, method='adaquant', mode='parallel', adaquant=config,
                        runtime=runtime, key=jax.random.key(0))
  jax.block_until_ready(qm.qstate)
  total = time.time() - start
  jax.monitoring.unregister_event_duration_listener(compiles)
  print(f'compiled {compiles.count} programs in {compiles.seconds:.1f}s: {compiles.summary()}',
        flush=True)
  reports = qm.layer_reports
  step_seconds = sum(r['seconds'] for r in reports)
  macs = {l.path: l.macs for l in layers}
  flops = sum(6 * macs[r['path']] * FLAGS.batch_size * FLAGS.iterations for r in reports)
  base = {'model': FLAGS.model, 'method': 'adaquant_parallel', 'w_bits': FLAGS.w_bits,
          'a_bits': FLAGS.a_bits, 'calib_size': FLAGS.calib_size,
          'iterations': FLAGS.iterations, 'layers': len(reports),
          'compilation': 'at first call',
          'compilation_cache': cache_state,
          'eval_batch': runtime.eval_batches(FLAGS.calib_size, config) or 'whole set / 250',
          'layer_program': ('one' if runtime.single_program(FLAGS.calib_size, config)
                            else 'separate'),
          **({'xla_flags': os.environ['XLA_FLAGS']} if os.environ.get('XLA_FLAGS') else {}),
          'device': describe_device(), 'command': command}
  records = [
      {**base, 'stage': 'range_calibration', 'seconds': round(qm.timings['prepare_seconds'] + qm.timings['ranges_seconds'], 1)},
      {**base, 'stage': 'adaquant_all_layers', 'seconds': round(qm.timings['adaquant_seconds'], 1),
       'ms_per_iteration_per_layer': round(
           1000 * step_seconds / (len(reports) * FLAGS.iterations), 3),
       'tflops_per_s': round(flops / step_seconds / 1e12, 2),
       'seconds_in_layer_optimisation': round(step_seconds, 1),
       'programs_compiled': compiles.count, 'seconds_compiling': round(compiles.seconds, 1),
       **peak_device_mb()},
  ]
  save(records)  # kept even if the sensitivity stage below does not finish
  if not FLAGS.sensitivity:
    return
  # The sensitivity table for two options: this W4A4 state and W8A8 ranges.
  start = time.time()
  w8a8 = ptq_jax.quantize(model, variables, calib, w_bits=8, a_bits=8, first_last_bits=None,
                          progress=False)
  prepared = ptq_jax.stages.prepare(model, variables, images)
  options = {(8, 8): w8a8.qstate, (FLAGS.w_bits, FLAGS.a_bits): qm.qstate}
  table_start = time.time()
  table = sensitivity_table(prepared, options)
  sensitivity_seconds = time.time() - table_start
  sensitivity_total = time.time() - start
  records += [
      {**base, 'stage': 'sensitivity_table_2_options', 'seconds': round(sensitivity_seconds, 1),
       'seconds_with_w8a8_ranges': round(sensitivity_total, 1),
       'table_cells': int(np.size(table.delta))},
      {**base, 'stage': 'total', 'seconds': round(total + sensitivity_total, 1),
       **peak_device_mb()},
  ]
  save(records)


class CompileLog:
  """Counts the programs XLA compiled (or loaded from the persistent cache) and sums
  their seconds, per jitted function: JAX's backend-compile events, from every thread."""

  def __init__(self, report_over_seconds: float = 1.0):
    self.by_function: dict = {}
    self.report_over_seconds = report_over_seconds
    self.start = time.time()

  def __call__(self, event: str, seconds: float, fun_name: str = '?', **_) -> None:
    if event == '/jax/core/compile/backend_compile_duration':
      count, total = self.by_function.get(fun_name, (0, 0.0))
      self.by_function[fun_name] = (count + 1, total + seconds)
      if seconds >= self.report_over_seconds:   # live, so a run cut short still says why
        print(f'[{time.time() - self.start:6.1f}s] compiled {fun_name} in {seconds:.1f}s '
              f'({self.count} programs, {self.seconds:.1f}s so far)', flush=True)

  @property
  def count(self) -> int:
    return sum(c for c, _ in self.by_function.values())

  @property
  def seconds(self) -> float:
    return sum(t for _, t in self.by_function.values())

  def summary(self) -> str:
    top = sorted(self.by_function.items(), key=lambda kv: -kv[1][1])[:8]
    return ', '.join(f'{name}: {c} in {t:.1f}s' for name, (c, t) in top)


def compilation_cache_state() -> str:
  """'off', 'cold' (an empty persistent cache) or 'warm' (programs compiled earlier)."""
  directory = jax.config.jax_compilation_cache_dir
  if not directory or not jax.config.jax_enable_compilation_cache:
    return 'off'
  return 'warm' if os.path.isdir(directory) and os.listdir(directory) else 'cold'


def capture_budget() -> float:
  stats = jax.devices()[0].memory_stats() or {}
  limit = stats.get('bytes_limit')
  return 0.35 * limit / 2**20 if limit else 16384.0


def peak_device_mb():
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get('peak_bytes_in_use')
  return {'peak_device_mb': round(peak / 2**20)} if peak else {}


def save(records):
  for r in records:
    print(r, flush=True)
  os.makedirs(FLAGS.out, exist_ok=True)
  write_results(FLAGS.out, FLAGS.name, merge_records(FLAGS.out, FLAGS.name, records, KEY_FIELDS),
                f'Parallel AdaQuant of every layer of {FLAGS.model}',
                columns=['model', 'stage', 'w_bits', 'a_bits', 'calib_size', 'iterations',
                         'layers', 'compilation', 'compilation_cache', 'xla_flags', 'eval_batch',
                         'layer_program', 'seconds',
                         'seconds_in_layer_optimisation', 'seconds_waiting_for_compilation',
                         'programs_compiled', 'seconds_compiling', 'ms_per_iteration_per_layer',
                         'tflops_per_s', 'seconds_with_w8a8_ranges', 'peak_device_mb', 'device',
                         'command'],
                notes=('Random weights and synthetic calibration images (timing only), '
                       'every layer at W4A4. ms/iteration: each layer\'s optimisation time '
                       '(its steps plus the before/after error measurement, not the capture '
                       'of its inputs) over its iterations; TFLOP/s counts 6 x MACs x '
                       'minibatch per iteration over the same time (compilation excluded '
                       'where it happens ahead of time). seconds: the stage\'s wall time, '
                       'compilation and input capture included; of which '
                       'seconds_in_layer_optimisation in the layers\' own work and '
                       'seconds_waiting_for_compilation waiting for programs still compiling. '
                       'programs_compiled and seconds_compiling: the programs XLA compiled (or '
                       'loaded from the persistent cache) during range calibration and '
                       'AdaQuant, and their summed time over all threads. compilation: at '
                       'first call = each program compiled when its first layer came up; '
                       'ahead of time = all compiled up front on a thread pool while inputs '
                       'are captured (rows of an earlier version; that path was removed since no '
                       'row showed it faster). '
                       'compilation_cache: JAX\'s persistent compilation cache off, empty at '
                       'the start (cold) or holding the programs of an earlier run (warm). '
                       'eval_batch: the batch of each layer\'s float-target and error passes '
                       '(blank: measured before it was an option, when they ran over the '
                       'whole set and in batches of 250). layer_program: one = each layer\'s '
                       'target, errors and steps in one compiled program (per layer geometry); '
                       'separate = a program for each (blank: measured before the single '
                       'program existed). sensitivity_table_2_options: dL for '
                       'every layer at W8A8 (calibrated ranges) and at the AdaQuant state '
                       'above, on all calibration images; total: every stage.'))


if __name__ == '__main__':
  app.run(main)
