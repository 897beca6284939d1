"""run.py jobs: training and evaluation end to end, and bad command lines."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import evaluate as evaluate_config
from configs import train_resnet20
import ptq_jax
from ptq_jax.quant.export import load_integer
from ptq_jax import checkpoint as ckpt
from ptq_jax.jobs import registry as jobs
from ptq_jax.jobs.outputs import verify_outputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def trained(tmp_path_factory, tfds_dir):
  """A ResNet-20 trained for two steps on 256 images: a real checkpoint, quickly."""
  config = train_resnet20.get_config()
  config.data.data_dir = tfds_dir
  config.num_epochs, config.train_limit, config.eval_limit = 1, 256, 200
  workdir = str(tmp_path_factory.mktemp('train'))
  card = jobs.run(config, workdir)
  return workdir, card


def test_train_job_writes_checkpoint_and_model_card(trained):
  workdir, card = trained
  assert sorted(os.listdir(workdir)) == ['model_card.json', 'resnet20_fashion_mnist.msgpack',
                                         'train_log.jsonl']
  with open(os.path.join(workdir, 'model_card.json')) as f:
    on_disk = json.load(f)
  for key in ('test_top1_pct', 'config', 'seed', 'training_seconds', 'command', 'device'):
    assert key in on_disk
  assert 0.0 <= on_disk['test_top1_pct'] <= 100.0
  assert on_disk['config']['train_limit'] == 256
  model, variables, meta = ckpt.load_model(os.path.join(workdir, 'resnet20_fashion_mnist.msgpack'))
  assert meta['model'] == 'resnet20' and meta['test_top1_pct'] == card['test_top1_pct']


def test_evaluate_job_reproduces_the_model_card(trained, tfds_dir, tmp_path):
  workdir, card = trained
  config = evaluate_config.get_config()
  config.checkpoint = os.path.join(workdir, 'resnet20_fashion_mnist.msgpack')
  config.data.data_dir = tfds_dir
  config.eval_limit = 200
  result = jobs.run(config, str(tmp_path))
  with open(tmp_path / 'results.json') as f:
    records = json.load(f)
  assert records == [result]
  assert result['top1_pct'] == card['test_top1_pct']  # same 200 test images, same weights
  assert result['num_examples'] == 200 and result['params'] == 270618


def test_quantize_job_writes_reloadable_outputs(trained, tfds_dir, tmp_path):
  from configs import ptq_baseline
  config = ptq_baseline.get_config()
  config.checkpoint = os.path.join(trained[0], 'resnet20_fashion_mnist.msgpack')
  config.data.data_dir = tfds_dir
  config.calib_size, config.eval_limit = 64, 200
  config.export = 'jax,onnx'
  records = jobs.run(config, str(tmp_path))
  assert [r['method'] for r in records] == ['fp32', 'baseline_ptq (minmax)']
  assert sorted(os.listdir(tmp_path)) == ['integer.msgpack', 'layers.md', 'manifest.json',
                                          'quantized.jaxexport', 'quantized.jaxexport.json',
                                          'quantized.msgpack', 'quantized.onnx',
                                          'quantized.onnx.json', 'results.json']
  manifest = verify_outputs(str(tmp_path))   # one run's consistent set
  assert manifest['job'] == 'quantize' and len(manifest['files']) == 8
  model, _, _ = ckpt.load_model(config.checkpoint)
  qm = ptq_jax.QuantizedModel.load(str(tmp_path / 'quantized.msgpack'), model)
  assert qm.bits()['conv_init'] == (8, 8) and qm.bits()['BasicBlock_0/Conv_0'] == (4, 4)
  assert len(load_integer(str(tmp_path / 'integer.msgpack'))) == 22
  # The deployable program computes what the saved model computes.
  x = np.random.default_rng(0).normal(size=(4, 28, 28, 1)).astype(np.float32)
  program = ptq_jax.load_exported(str(tmp_path / 'quantized.jaxexport'))
  assert np.array_equal(np.asarray(program(x)).argmax(-1), np.asarray(qm.apply(x)).argmax(-1))
  assert ptq_jax.load_exported(str(tmp_path / 'quantized.onnx'))(x).shape == (4, 10)
  config.export = 'tflite, jax'
  with pytest.raises(ValueError, match=r"config.export names \['tflite'\]"):
    jobs.run(config, str(tmp_path / 'other'))
  assert not os.path.exists(tmp_path / 'other')


def test_mixed_precision_job(trained, tfds_dir, tmp_path):
  from configs import mixed_precision
  config = mixed_precision.get_config()
  config.checkpoint = os.path.join(trained[0], 'resnet20_fashion_mnist.msgpack')
  config.data.data_dir = tfds_dir
  config.calib_size, config.eval_limit = 32, 100
  config.mixed.method, config.mixed.options = 'ptq', ('W8A8', 'W4A4')
  config.mixed.cache_dir = str(tmp_path / 'cache')
  config.budgets = ('size_pct=16', 'size_pct=13,bops_pct=3')
  records = jobs.run(config, str(tmp_path / 'work'))
  assert [r['method'] for r in records] == ['fp32', 'mixed_precision', 'mixed_precision']
  assert records[1]['size_pct_of_fp32'] <= 16 and records[2]['bops_pct_of_fp32'] <= 3
  assert sorted(os.listdir(tmp_path / 'work')) == ['manifest.json', 'mixed.msgpack',
                                                   'results.json', 'results.md', 'sensitivity.md']
  model, _, _ = ckpt.load_model(config.checkpoint)
  qm = ptq_jax.QuantizedModel.load(str(tmp_path / 'work' / 'mixed.msgpack'), model)
  assert set(qm.bits().values()) <= {(8, 8), (4, 4)}
  config.budgets = ('size_pct=1',)  # below every layer at 4 bits: a clear error
  with pytest.raises(ptq_jax.InfeasibleBudgetError, match='smallest feasible'):
    jobs.run(config, str(tmp_path / 'work2'))


def test_pipeline_job(trained, tfds_dir, tmp_path):
  from configs import pipeline
  config = pipeline.get_config()
  config.checkpoint = os.path.join(trained[0], 'resnet20_fashion_mnist.msgpack')
  config.data.data_dir = tfds_dir
  config.calib_size, config.eval_limit = 32, 100
  config.quant.iterations, config.quant.bias_steps = 3, 3
  config.quant.options = ('W8A8', 'W4A4')  # (six by default: slow to calibrate here)
  config.quant.cache_dir = str(tmp_path / 'cache')
  # (AdaQuant through the job: the default-job test; the pipelines: test_pipelines.py)
  config.pipelines = ('light', 'light@13')
  config.quant.stage_guard = True
  config.quant.range_method = 'mse'
  records = jobs.run(config, str(tmp_path / 'work'))
  assert {r.get('range_method') for r in records[1:]} == {'mse'}
  assert [(r['pipeline'], r['stage']) for r in records] == [
      ('-', 'fp32'), ('light', 'ranges'), ('light', 'bn_tuning'),
      ('light', 'mixed_precision'), ('light', 'bn_tuning')]
  # The guard ran around every stage after a run's first, and only there.
  assert [type(r.get('stage_kept')) for r in records] == [type(None), type(None), bool,
                                                          type(None), bool]
  assert sorted(os.listdir(tmp_path / 'work')) == [
      'manifest.json', 'quantized.jaxexport', 'quantized.jaxexport.json', 'quantized.msgpack',
      'results.json', 'results.md', 'stages.png']
  assert verify_outputs(str(tmp_path / 'work'))['job'] == 'pipeline'
  assert records[-1]['size_pct_of_fp32'] <= 13.0
  for bad, message in [(('fast',), 'is not one of'), (('advanced@x',), 'must be a number'),
                       (('sequential@13',), 'fixed bit'), ((), 'is empty')]:
    config.pipelines = bad
    with pytest.raises(ValueError, match=message):
      jobs.run(config, str(tmp_path / 'work2'))
  config.pipelines, config.quant.range_method = ('light',), 'median'
  with pytest.raises(ValueError, match="config.quant.range_method: .*'median' is not one of"):
    jobs.run(config, str(tmp_path / 'work2'))
  assert not os.path.exists(tmp_path / 'work2')


def run_cli(*args):
  return subprocess.run([sys.executable, os.path.join(ROOT, 'run.py'), *args],
                        capture_output=True, text=True, cwd=ROOT, timeout=1200)


def _write(path, text):
  path.write_text(text)
  return str(path)


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


def test_wrong_data_dir_is_an_error(tmp_path, trained):
  checkpoint = os.path.join(trained[0], 'resnet20_fashion_mnist.msgpack')
  proc = run_cli('--config=configs/evaluate.py', f'--config.checkpoint={checkpoint}',
                 f'--config.data.idx_dir={tmp_path / "nowhere"}',
                 f'--config.data.data_dir={tmp_path / "tfds"}', f'--workdir={tmp_path / "w"}')
  assert proc.returncode != 0
  assert 'apt-get install dataset-fashion-mnist' in proc.stderr
  assert not (tmp_path / 'w' / 'results.json').exists()


def test_default_job_on_the_bundled_checkpoint(tmp_path, tfds_dir):
  """`python run.py` (here with small settings): the advanced pipeline's table."""
  proc = run_cli('--config.eval_limit=1000', '--config.calib_size=64',
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
