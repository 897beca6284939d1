"""The deployable JAX artifact: the whole quantized network as one jax.export program
with integer weights, equal to the simulation it came from, runnable with jax alone."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import nnx

import ptq_jax
from ptq_jax.checkpoint import CheckpointError
from ptq_jax.deploy import integer as deploy_integer


class AllKinds(nn.Module):
  """Every layer kind the library quantizes, a folded and an unfolded BatchNorm, a
  shared layer (two call sites) and an attention block."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Conv(8, (3, 3), name='conv')(x)))
    x = nn.Conv(8, (3, 3), feature_group_count=8, strides=2, name='depthwise')(x)
    x = nn.Conv(8, (3, 3), feature_group_count=2, kernel_dilation=2, name='grouped')(x)
    x = nn.ConvTranspose(6, (2, 2), strides=(2, 2), name='transpose')(nn.relu(x))
    x = nn.Conv(8, (1, 1), name='pointwise')(x)
    tokens = x.reshape(x.shape[0], -1, 8)
    tokens = tokens + nn.MultiHeadDotProductAttention(num_heads=2, name='attn')(tokens)
    shared = nn.Dense(8, name='shared')
    tokens = shared(nn.gelu(shared(tokens)))
    heads = nn.Einsum((8, 2, 4), 'btd,dhk->bthk', name='heads')(tokens)   # two output axes
    tokens = heads.reshape(heads.shape[:2] + (8,))
    y = nn.DenseGeneral(6, axis=(-2, -1), name='general')(tokens[:, :4])
    y = nn.Einsum((6, 5), 'bi,ij->bj', name='einsum')(nn.relu(y))
    return nn.Dense(4, name='head')(y)


def _toy(seed=0):
  x = np.random.default_rng(seed).normal(size=(24, 8, 8, 3)).astype(np.float32)
  model = AllKinds()
  variables = model.init(jax.random.key(0), x)
  stats = jax.tree.map(lambda v: v + 0.3, variables['batch_stats'])   # non-trivial BN
  return model, {'params': variables['params'], 'batch_stats': stats}, x


def _agree(program, qm, x, rtol=1e-4):
  """The artifact's outputs equal the simulation's: logits within float32 rounding of
  them (relative to the logits' scale), and the same top-1 wherever the simulation's
  top two are further apart than that (a random toy model has exact ties)."""
  want, got = np.asarray(qm.apply(x)), np.asarray(program(x))
  assert got.shape == want.shape
  tolerance = rtol * np.abs(want).max()
  np.testing.assert_allclose(got, want, atol=tolerance, rtol=rtol)
  top2 = np.sort(want, axis=-1)[:, -2:]
  decided = top2[:, 1] - top2[:, 0] > 4 * tolerance
  assert decided.mean() > 0.5   # (the check below compares something)
  assert np.array_equal(got.argmax(-1)[decided], want.argmax(-1)[decided])


@pytest.fixture(scope='module')
def toy():
  return _toy()


@pytest.mark.parametrize('bits,cpu', [
    (dict(w_bits=8, a_bits=8), 'integer'), (dict(w_bits=8, a_bits=8), 'float'),
    (dict(w_bits=4, a_bits=4), 'integer'), (dict(w_bits=4, a_bits=4), 'float'),
    (dict(w_bits=3, a_bits=6, first_last_bits=None), 'integer')])
def test_every_layer_kind_round_trips_equal_to_the_simulation(toy, tmp_path, bits, cpu):
  """Catches any layer whose integer computation differs from its fake-quantized one
  (geometry, zero points, packing, a shared layer's second input quantizer), in int32
  accumulation and in the CPU's float32 contraction of the same integers."""
  model, variables, x = toy
  qm = ptq_jax.quantize(model, variables, x, quantize_matmuls=True, progress=False, **bits)
  report = ptq_jax.export(qm, str(tmp_path / 'm.jaxexport'), cpu=cpu)
  assert report.cpu_arithmetic == cpu
  assert 'shared' in report.integer_layers and 'transpose' in report.integer_layers
  assert report.float_layers == () and report.integer_attention == ('attn',)
  _agree(ptq_jax.load_exported(report.path), qm, x)


def test_mixed_bits_per_layer_and_float_layers_round_trip(toy, tmp_path):
  """Each layer keeps its own bits; a layer left float (None) computes in float."""
  model, variables, x = toy
  qm = ptq_jax.quantize(model, variables, x, w_bits=4, a_bits=8, progress=False,
                        overrides={'depthwise': {'w_bits': 2}, 'grouped': {'a_bits': 5},
                                   'pointwise': {'w_bits': None}})
  report = ptq_jax.export(qm, str(tmp_path / 'm.jaxexport'))
  assert report.float_layers == ('pointwise',)
  _agree(ptq_jax.load_exported(report.path), qm, x)


class NNXNet(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.head = nnx.Linear(8, 4, rngs=rngs)

  def __call__(self, x):
    return self.head(nnx.relu(self.conv(x)).mean(axis=(1, 2)))


def nnx_quantized():
  x = np.random.default_rng(1).normal(size=(16, 6, 6, 3)).astype(np.float32)
  return ptq_jax.quantize(NNXNet(nnx.Rngs(0)), calib=x, w_bits=4, a_bits=8, progress=False), x


def test_an_nnx_model_round_trips(tmp_path):
  qm, x = nnx_quantized()
  report = ptq_jax.export(qm, str(tmp_path / 'nnx.jaxexport'))
  _agree(ptq_jax.load_exported(report.path), qm, x)


def _mlp(width=256):
  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(10)(nn.relu(nn.Dense(width)(nn.relu(nn.Dense(width)(x)))))
  x = np.random.default_rng(2).normal(size=(32, 64)).astype(np.float32)
  model = MLP()
  return model, model.init(jax.random.key(0), x), x


def test_weights_are_stored_as_codes_and_4_bits_are_packed(tmp_path):
  """Catches float kernels reaching the program, or 4-bit codes stored one per byte:
  the W8 artifact is about a quarter of FP32, the W4 one about half of W8."""
  model, variables, x = _mlp()
  sizes = {}
  for w in (8, 4):
    qm = ptq_jax.quantize(model, variables, x, w_bits=w, a_bits=8, first_last_bits=None,
                          progress=False)
    sizes[w] = ptq_jax.export(qm, str(tmp_path / f'w{w}.jaxexport'))
  assert sizes[8].size_ratio < 0.32 and sizes[4].size_ratio < 0.2   # (a float kernel: ~1)
  assert sizes[4].bytes < 0.62 * sizes[8].bytes   # (4-bit codes one per byte: ~1)


def test_the_program_uses_integer_convolutions_and_matmuls(toy, tmp_path):
  """The integer path is really integer: the program's layers contract int8 (or int16
  at 8 bits) operands into int32."""
  model, variables, x = toy
  qm = ptq_jax.quantize(model, variables, x, w_bits=4, a_bits=4, progress=False)
  ptq_jax.export(qm, str(tmp_path / 'm.jaxexport'))
  text = ptq_jax.load_exported(str(tmp_path / 'm.jaxexport')).exported.mlir_module()
  assert 'xi8>' in text and 'xi32>' in text and 'stablehlo.convolution' in text
  assert 'stablehlo.dot_general' in text


def test_a_zero_point_off_by_one_is_caught(toy, tmp_path, monkeypatch):
  """The equality check can fail: one weight zero point moved by one step breaks it."""
  model, variables, x = toy
  qm = ptq_jax.quantize(model, variables, x, w_bits=4, a_bits=4, progress=False)
  original = deploy_integer.integer_layer

  def off_by_one(path, lq):
    layer = original(path, lq)
    if path == 'conv':
      zp = layer.w_zero_point.copy()
      zp[0] += 1
      layer = deploy_integer.dataclasses.replace(layer, w_zero_point=zp)
    return layer
  monkeypatch.setattr('ptq_jax.deploy.jax_artifact.integer_layer', off_by_one)
  report = ptq_jax.export(qm, str(tmp_path / 'bad.jaxexport'))
  with pytest.raises(AssertionError):
    _agree(ptq_jax.load_exported(report.path), qm, x)


LOADER = '''
import sys
class Block:
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in ('ptq_jax', 'flax'):
      raise ImportError(name + ' is blocked')
sys.meta_path.insert(0, Block())
import hashlib, json
import numpy as np
from jax import export
path = sys.argv[1]
blob = open(path, 'rb').read()
assert hashlib.sha256(blob).hexdigest() == json.load(open(path + '.json'))['sha256']
program = export.deserialize(bytearray(blob))
x = np.load(sys.argv[2])
np.save(sys.argv[3], np.asarray(program.call(x)))
print(sorted(m for m in sys.modules if m.split('.')[0] in ('ptq_jax', 'flax')))
'''


def test_the_artifact_runs_with_jax_alone(toy, tmp_path):
  """README's loader: a process that cannot import ptq_jax or flax runs the program and
  gets the simulation's outputs."""
  model, variables, x = toy
  qm = ptq_jax.quantize(model, variables, x, w_bits=4, a_bits=8, quantize_matmuls=True,
                        progress=False)
  path = str(tmp_path / 'm.jaxexport')
  ptq_jax.export(qm, path)
  np.save(tmp_path / 'x.npy', x[:5])
  proc = subprocess.run([sys.executable, '-c', LOADER, path, str(tmp_path / 'x.npy'),
                         str(tmp_path / 'y.npy')], capture_output=True, text=True, timeout=600,
                        cwd='/')
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip() == '[]'
  np.testing.assert_allclose(np.load(tmp_path / 'y.npy'), np.asarray(qm.apply(x[:5])),
                             rtol=1e-4, atol=1e-4 * float(np.abs(qm.apply(x[:5])).max()))


def test_a_damaged_artifact_or_a_wrong_input_is_a_clear_error(toy, tmp_path):
  model, variables, x = toy
  qm = ptq_jax.quantize(model, variables, x, w_bits=8, a_bits=8, progress=False)
  path = str(tmp_path / 'm.jaxexport')
  ptq_jax.export(qm, path)
  program = ptq_jax.load_exported(path)
  with pytest.raises(ValueError, match=r'float32 inputs of shape \(batch, 8, 8, 3\)'):
    program(x[:, :4])
  with pytest.raises(ValueError, match='float32'):
    program(x.astype(np.float64))
  blob = open(path, 'rb').read()
  open(path, 'wb').write(blob[:len(blob) // 2])   # truncated
  with pytest.raises(CheckpointError, match='SHA-256'):
    ptq_jax.load_exported(path)
  open(path, 'wb').write(blob)
  meta = json.load(open(path + '.json'))
  os.remove(path + '.json')
  with pytest.raises(CheckpointError, match='missing'):
    ptq_jax.load_exported(path)
  json.dump(dict(meta, format='other'), open(path + '.json', 'w'))
  with pytest.raises(CheckpointError, match='not a ptq_jax export'):
    ptq_jax.load_exported(path)


def test_what_cannot_be_exported_is_refused_before_anything_is_written(toy, tmp_path):
  model, variables, x = toy
  qm = ptq_jax.quantize(model, variables, x, w_bits=4, a_bits=4, progress=False,
                        ranges=ptq_jax.RangeConfig(per_channel_inputs=True))
  path = tmp_path / 'm.jaxexport'
  with pytest.raises(ValueError, match='conv has per-channel input quantizers'):
    ptq_jax.export(qm, str(path))
  assert not path.exists()
  with pytest.raises(ValueError, match="format='tflite' is not one of"):
    ptq_jax.export(qm, str(path), format='tflite')
  with pytest.raises(ValueError, match="cpu='fast' is not one of"):
    ptq_jax.export(qm, str(path), cpu='fast')
  with pytest.raises(ValueError, match='is a directory'):
    ptq_jax.export(ptq_jax.quantize(model, variables, x, progress=False), str(tmp_path))
