"""``python run.py`` as a user runs it, in a child process: the README's default job on
the bundled checkpoint, and bad command lines that must fail with one clear message and
write nothing (``tests/test_cli.py`` runs the jobs in the test process)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args):
  return subprocess.run([sys.executable, os.path.join(ROOT, 'run.py'), *args],
                        capture_output=True, text=True, cwd=ROOT, timeout=1200)


def test_unknown_config_key_is_an_error(tmp_path):
  proc = run_cli('--config.no_such_key=1', f'--workdir={tmp_path / "w"}')
  assert proc.returncode != 0
  assert 'no_such_key' in proc.stderr
  assert not (tmp_path / 'w').exists()


def test_missing_checkpoint_is_an_error(tmp_path):
  proc = run_cli('--config=configs/evaluate.py', f'--config.checkpoint={tmp_path / "nope.msgpack"}', f'--workdir={tmp_path / "w"}')
  assert proc.returncode != 0
  assert 'neither a bundled checkpoint' in proc.stderr
  assert not (tmp_path / 'w' / 'results.json').exists()


def test_corrupt_checkpoint_is_an_error(tmp_path):
  bad = tmp_path / 'bad.msgpack'
  bad.write_bytes(b'\x00\x01garbage')
  proc = run_cli('--config=configs/evaluate.py', f'--config.checkpoint={bad}', f'--workdir={tmp_path / "w"}')
  assert proc.returncode != 0 and 'corrupt' in proc.stderr
  assert 'Traceback' not in proc.stderr  # one clear line, not a stack
  assert not (tmp_path / 'w' / 'results.json').exists()


def test_wrong_data_dir_is_an_error(tmp_path):
  proc = run_cli('--config=configs/evaluate.py', '--config.checkpoint=resnet20_fashion_mnist',
                 f'--config.data.idx_dir={tmp_path / "nowhere"}',
                 f'--config.data.data_dir={tmp_path / "tfds"}', f'--workdir={tmp_path / "w"}')
  assert proc.returncode != 0
  assert 'apt-get install dataset-fashion-mnist' in proc.stderr
  assert not (tmp_path / 'w' / 'results.json').exists()


def test_default_job_on_the_bundled_checkpoint(tmp_path, tfds_dir):
  """`python run.py` (here with small settings): the advanced pipeline's table."""
  proc = run_cli('--config.eval_limit=1000', '--config.calib_size=100',
                 '--config.quant.iterations=5', '--config.quant.bias_steps=5',
                 f'--config.data.data_dir={tfds_dir}', f'--workdir={tmp_path}')
  assert proc.returncode == 0, proc.stderr[-2000:]
  with open(tmp_path / 'results.json') as f:
    records = json.load(f)
  fp32, base = records[0], records[1]
  assert fp32['model'] == base['model'] == 'resnet20' and fp32['test_images'] == 1000
  assert fp32['top1_pct'] >= 92.0
  assert (base['stage'], base['w_bits'], base['a_bits']) == ('ranges', 4, 4)
  assert 10.0 < base['top1_pct'] <= 100.0
  assert [(r.get('run', '-'), r['stage']) for r in records] == [
      ('-', 'fp32'), ('advanced W4A4', 'ranges'), ('advanced W4A4', 'adaquant'),
      ('advanced W4A4', 'bn_tuning'), ('advanced W4A4', 'bias_tuning'),
      ('advanced 13%', 'mixed_precision'), ('advanced 13%', 'bn_tuning'),
      ('advanced 13%', 'bias_tuning')]
  # W4A4 with first and last layer 8-bit is slightly above 12.5% of FP32; 13% fits it.
  assert 12.5 < records[2]['size_pct_of_fp32'] <= records[5]['size_pct_of_fp32'] <= 13.0
  # The mixed run reused the fixed run's AdaQuant states: no second AdaQuant pass.
  assert records[5]['seconds'] < records[2]['seconds']
  assert {'layers.png', 'stages.png', 'quantized.msgpack'} <= set(os.listdir(tmp_path))
  for label in ('FP32', 'advanced W4A4: baseline PTQ', '+ AdaQuant', '+ BN tuning',
                '+ bias tuning', 'advanced 13%: mixed precision'):
    assert label in proc.stdout
