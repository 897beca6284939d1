"""Wall time on 1, 2 and 4 JAX devices, with unchanged results (ptq_jax.distributed).

  python benchmarks/scaling.py                          # ResNet-20, 1/2/4 CPU host devices
  python benchmarks/scaling.py --models=resnet20,mobilenet_v2_fmnist --device_counts=1,2

Each device count runs in a fresh process (on CPU, ``XLA_FLAGS=
--xla_force_host_platform_device_count=N`` splits the host into N devices; on a
multi-GPU machine pass --noforce_host_devices to use the GPUs present). Stages:
parallel AdaQuant of every layer at W4A4 (first/last 8-bit; layers dealt to the
devices), evaluation on the 10,000 test images (data-parallel) and the sensitivity table
for two options (W8A8 ranges and that AdaQuant state; data-parallel). Rows: seconds
per stage, speed-up over one device, test top-1 and the largest kernel difference from
the one-device run. Writes results/scaling.{json,md}; rows merge by (model, stage,
devices, device).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time


from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_list('models', ['resnet20'], 'Bundled models.')
flags.DEFINE_list('device_counts', ['1', '2', '4'], 'Device counts to compare.')
flags.DEFINE_integer('iterations', 300, 'AdaQuant iterations per layer.')
flags.DEFINE_integer('calib_size', 1000, 'Calibration images.')
flags.DEFINE_bool('force_host_devices', True, 'Split the CPU into N host devices.')
flags.DEFINE_integer('child_devices', 0, 'Internal: run the stages on this many devices.')
flags.DEFINE_string('out', 'results', 'Output directory.')
flags.DEFINE_list('merge_from', [], 'Only merge the rows of these output directories (e.g. '
                  'from a GPU machine) into --out, then exit.')

NAME = 'scaling'
KEY_FIELDS = ('model', 'stage', 'devices', 'device')


def child() -> None:
  """Runs the stages on ``--child_devices`` devices and prints one JSON line per model."""
  import jax
  import numpy as np

  import ptq_jax
  from ptq_jax.stages.sensitivity import sensitivity_table
  from benchmarks.common import fashion_mnist
  from common import describe_device

  devices = jax.devices()[:FLAGS.child_devices]
  if len(devices) < FLAGS.child_devices:
    raise SystemExit(f'Asked for {FLAGS.child_devices} devices, JAX sees {len(jax.devices())}.')
  train, test, test_images = fashion_mnist()
  for model_name in FLAGS.models:
    model, variables, _ = ptq_jax.load_model(
        ptq_jax.bundled_checkpoints()[f'{model_name}_fashion_mnist'])
    calib = ptq_jax.calibration_set('fashion_mnist', FLAGS.calib_size, 0, data=train)
    start = time.time()
    qm = ptq_jax.quantize(model, variables, calib, w_bits=4, a_bits=4, method='adaquant',
                          mode='parallel', key=jax.random.key(0), progress=False,
                          adaquant=ptq_jax.AdaQuantConfig(iterations=FLAGS.iterations),
                          devices=devices)
    jax.block_until_ready(jax.tree.leaves(qm.qstate))
    adaquant_s = time.time() - start
    start = time.time()
    top1 = ptq_jax.top1_accuracy_pct(qm.predict(test_images, devices=devices), test.labels)
    eval_s = time.time() - start
    start = time.time()
    w8a8 = ptq_jax.quantize(model, variables, calib, w_bits=8, a_bits=8, first_last_bits=None,
                            progress=False)
    prepared = ptq_jax.stages.prepare(model, variables, calib.images, progress=False)
    table = sensitivity_table(prepared, {(8, 8): w8a8.qstate, (4, 4): qm.qstate},
                              devices=devices)
    table_s = time.time() - start
    print(json.dumps({
        'model': model_name, 'devices': len(devices), 'device': describe_device(),
        'seconds': {'adaquant_parallel': adaquant_s, 'evaluate_test_set': eval_s,
                    'sensitivity_2_options': table_s},
        'top1_pct': top1,
        'kernels': {p: np.asarray(lq.kernel, np.float64).ravel().tolist()[:64]
                    for p, lq in qm.qstate.items()},
        'delta': np.asarray(table.raw_delta).tolist(),
        'layer_devices': sorted({r.get('device', 'one') for r in qm.layer_reports})}),
        flush=True)


def main(_):
  if FLAGS.child_devices:
    return child()
  import numpy as np

  from benchmarks.common import new_rows_from
  if FLAGS.merge_from:
    return save(new_rows_from(FLAGS.merge_from, FLAGS.out, NAME))

  command = 'python benchmarks/scaling.py ' + ' '.join(sys.argv[1:])
  results = {}
  for n in (int(c) for c in FLAGS.device_counts):
    env = dict(os.environ)
    if FLAGS.force_host_devices:
      env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') +
                          f' --xla_force_host_platform_device_count={n}').strip()
    print(f'{n} device(s)...', flush=True)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), f'--child_devices={n}',
                           f'--models={",".join(FLAGS.models)}',
                           f'--iterations={FLAGS.iterations}',
                           f'--calib_size={FLAGS.calib_size}'],
                          env=env, capture_output=True, text=True)
    if proc.returncode:
      raise SystemExit(f'{n} devices failed:\n{proc.stderr[-3000:]}')
    for line in proc.stdout.splitlines():
      if line.startswith('{'):
        r = json.loads(line)
        results[(r['model'], n)] = r
  records = []
  for (model_name, n), r in sorted(results.items()):
    one = results.get((model_name, 1))
    kernel_diff = (max(float(np.max(np.abs(np.subtract(r['kernels'][p], one['kernels'][p]))))
                       for p in r['kernels']) if one else None)
    delta_diff = (float(np.max(np.abs(np.subtract(r['delta'], one['delta'])))) if one else None)
    for stage, seconds in r['seconds'].items():
      base = one['seconds'][stage] if one else None
      records.append({
          'model': model_name, 'stage': stage, 'devices': n, 'w_bits': 4, 'a_bits': 4,
          'calib_size': FLAGS.calib_size, 'iterations': FLAGS.iterations,
          'seconds': round(seconds, 1),
          'speedup_vs_1_device': round(base / seconds, 2) if base else None,
          'top1_pct': round(r['top1_pct'], 2),
          'max_kernel_diff_vs_1_device': kernel_diff,
          'max_sensitivity_diff_vs_1_device': delta_diff,
          'layer_devices': len(r['layer_devices']), 'device': r['device'],
          'command': command})
      print({k: records[-1][k] for k in ('model', 'stage', 'devices', 'seconds',
                                         'speedup_vs_1_device', 'top1_pct')}, flush=True)
  save(records)


def save(records) -> None:
  from benchmarks.common import merge_records
  from common import write_results
  write_results(FLAGS.out, NAME, merge_records(FLAGS.out, NAME, records, KEY_FIELDS),
                'Scaling over JAX devices',
                columns=['model', 'stage', 'devices', 'w_bits', 'a_bits', 'calib_size',
                         'iterations', 'seconds', 'speedup_vs_1_device', 'top1_pct',
                         'max_kernel_diff_vs_1_device', 'max_sensitivity_diff_vs_1_device',
                         'device', 'command'],
                notes='Each device count in a fresh process. On CPU the devices are host '
                      'devices made by XLA_FLAGS=--xla_force_host_platform_device_count=N: '
                      'they share the same cores, so the speed-up is bounded by how much of '
                      'the cores one device leaves idle; the point of these rows is that '
                      'the work really is split (adaquant_parallel: layers dealt to the '
                      'devices; evaluate and sensitivity: each batch split over them) with '
                      'unchanged results. top1_pct: after parallel AdaQuant at W4A4 '
                      '(first/last 8-bit). Differences from the one-device run: largest '
                      'absolute kernel difference (first 64 weights of every layer) and '
                      'largest sensitivity-table difference. MobileNetV2 on 4 host devices '
                      'ends slightly off the one-device run (kernels up to ~5e-4, top-1 '
                      '0.2 points): XLA\'s CPU backend rounds some of AdaQuant\'s '
                      'backward-pass reductions differently in a process split into 4 host '
                      'devices, and 300 iterations of 4-bit rounding amplify that float-level '
                      'difference. It is not the work split: the same layers on 1 and on 4 '
                      'devices within one such process end identical (checked by hand for '
                      'this model; tests/test_distributed.py checks it on a small one), and '
                      'ResNet-20 shows no difference at all.')


if __name__ == '__main__':
  app.run(main)
