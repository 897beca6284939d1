"""The default job (`python run.py`) run twice in fresh processes, side by side.

  python benchmarks/default_job.py            # two runs, about 6 minutes each on 2 cores

Writes results/default_job.{json,md}: every stage's test top-1 of both runs, and
whether the two runs printed identical numbers (they must: same command, same machine).
Each run is a child process with its own empty work dir, so nothing is shared between
them but the machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from absl import app, flags

from common import describe_device, write_results

FLAGS = flags.FLAGS
flags.DEFINE_integer('repeats', 2, 'How many times to run the default job.')
flags.DEFINE_list('extra', [], 'Extra run.py flags (e.g. --config.eval_limit=1000), for a '
                  'quick check; the results file is only written without them.')
flags.DEFINE_string('out', 'results', 'Output directory.')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LABELS = {'fp32': 'FP32', 'ranges': 'baseline PTQ', 'adaquant': '+ AdaQuant',
          'bn_tuning': '+ BN tuning', 'bias_tuning': '+ bias tuning',
          'mixed_precision': 'mixed precision'}


def run_once(workdir: str) -> list:
  proc = subprocess.run([sys.executable, os.path.join(ROOT, 'run.py'), f'--workdir={workdir}',
                         *FLAGS.extra], cwd=ROOT, capture_output=True, text=True)
  if proc.returncode != 0:
    raise SystemExit(f'run.py failed:\n{proc.stderr[-3000:]}')
  with open(os.path.join(workdir, 'results.json')) as f:
    return json.load(f)


def main(argv):
  del argv
  runs = []
  with tempfile.TemporaryDirectory() as tmp:
    for i in range(FLAGS.repeats):
      runs.append(run_once(os.path.join(tmp, f'run{i}')))
      print(f'run {i + 1}: ' + ' / '.join(f'{r["top1_pct"]:.2f}' for r in runs[-1]), flush=True)
  identical = all([r['top1_pct'] for r in run] == [r['top1_pct'] for r in runs[0]]
                  for run in runs)
  fp32 = runs[0][0]['top1_pct']
  records = []
  for i, run in enumerate(runs):
    for r in run:
      records.append({
          'model': r['model'], 'run': r.get('run', '-'), 'stage': r['stage'],
          'w_bits': r['w_bits'], 'a_bits': r['a_bits'], 'calib_size': r['calib_size'],
          'repeat': i + 1, 'top1_pct': r['top1_pct'],
          'delta_pct': round(r['top1_pct'] - fp32, 2),
          'size_pct_of_fp32': r['size_pct_of_fp32'], 'seconds': r['seconds'],
          'identical_across_repeats': identical, 'device': describe_device(),
          'command': 'python benchmarks/default_job.py'})
  print(f'identical across {len(runs)} runs: {identical}')
  if FLAGS.extra:
    return
  write_results(FLAGS.out, 'default_job', records, 'The default job, run twice', notes=(
      'The quick start\'s job (`python run.py`: configs/default.py) run in fresh processes '
      f'one after the other on one machine. Test top-1 on the {runs[0][0]["test_images"]:,} '
      'Fashion-MNIST test images after each stage; `seconds`: that stage\'s wall time. '
      '`identical_across_repeats`: whether every stage\'s top-1 was the same in every run.'))


if __name__ == '__main__':
  app.run(main)
