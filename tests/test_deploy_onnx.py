"""The ONNX artifact: the whole quantized network in QDQ form, run by ONNX Runtime with
its integer kernels, equal to the simulation it came from."""

import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import ptq_jax
from ptq_jax.checkpoint import CheckpointError
from ptq_jax.deploy.onnx_artifact import float_onnx_model
from test_deploy import _agree, _mlp, _toy, nnx_quantized


@pytest.fixture(scope='module')
def toy():
  return _toy()


def _export(qm, tmp_path, name='m.onnx'):
  """Exports ``qm`` with its biases on the int32 grid: (that model, report, program)."""
  qm = qm.with_integer_biases()
  report = ptq_jax.export(qm, str(tmp_path / name), format='onnx')
  assert report.bias_rounding < 1e-3   # (steps: float32 rounding of k * step only)
  return qm, report, ptq_jax.load_exported(report.path)


@pytest.mark.parametrize('bits', [dict(w_bits=4, a_bits=4),
                                  dict(w_bits=3, a_bits=6, first_last_bits=None)])
def test_every_layer_kind_round_trips_in_onnxruntime(toy, tmp_path, bits):
  """Catches any layer kind written wrongly (conv layouts, groups, dilation, padding,
  the transposed conv's flipped kernel, DenseGeneral/Einsum contractions, attention's
  batched matmuls, a shared layer's second quantizer, the codes' clip below 8 bits)."""
  model, variables, x = toy
  qm = ptq_jax.quantize(model, variables, x, quantize_matmuls=True, progress=False, **bits)
  qm, report, program = _export(qm, tmp_path)
  assert report.platforms == ('onnxruntime',)
  _agree(program, qm, x)


def test_mixed_bits_float_layers_and_nnx_round_trip(toy, tmp_path):
  model, variables, x = toy
  qm = ptq_jax.quantize(model, variables, x, w_bits=4, a_bits=8, progress=False,
                        overrides={'depthwise': {'w_bits': 2}, 'grouped': {'a_bits': 5},
                                   'pointwise': {'w_bits': None}})
  qm, _, program = _export(qm, tmp_path)
  _agree(program, qm, x)
  qm, x = nnx_quantized()
  qm, _, program = _export(qm, tmp_path, 'nnx.onnx')
  _agree(program, qm, x)


def test_biases_on_the_int32_grid_make_the_simulation_match_the_runtime(toy, tmp_path):
  """Catches the integer kernels' bias rounding going unreported, or
  ``with_integer_biases`` putting a bias off the grid the export uses: a plain model's
  biases move (and the export says by how much), the moved model's do not."""
  model, variables, x = toy
  qm = ptq_jax.quantize(model, variables, x, w_bits=3, a_bits=6, first_last_bits=None,
                        progress=False)
  plain = ptq_jax.export(qm, str(tmp_path / 'plain.onnx'), format='onnx')
  assert 0.05 < plain.bias_rounding <= 0.5
  gridded, report, program = _export(qm, tmp_path)
  assert report.bias_rounding < 1e-3
  assert gridded.settings['integer_biases'] and not np.array_equal(gridded.apply(x), qm.apply(x))
  _agree(program, gridded, x)


def test_the_float_model_is_written_exactly(toy):
  """The converter alone (no quantizers): catches a primitive mapped to the wrong ONNX
  operator or layout, which the quantized round trips could hide behind rounding."""
  model, variables, x = toy
  session = ort.InferenceSession(float_onnx_model(model, variables, x.shape[1:])
                                 .SerializeToString(), providers=['CPUExecutionProvider'])
  want = np.asarray(model.apply(variables, x))
  np.testing.assert_allclose(session.run(None, {'input': x})[0], want, rtol=1e-4,
                             atol=1e-4 * np.abs(want).max())


def test_onnxruntime_computes_the_layers_with_integer_kernels(toy, tmp_path):
  """Catches a QDQ model that ONNX Runtime silently runs in float (a float bias, a Max
  where a Relu belongs, transposes between the DequantizeLinear and its layer)."""
  model, variables, x = toy
  qm = ptq_jax.quantize(model, variables, x, w_bits=8, a_bits=8, quantize_matmuls=True,
                        progress=False)
  _, report, program = _export(qm, tmp_path)
  assert {'QLinearConv', 'QLinearMatMul'} <= set(report.integer_layers)
  assert program.meta['onnxruntime_integer_ops']['QLinearConv'] >= 2


def test_weights_are_stored_as_int8_codes(tmp_path):
  """Catches float kernels in the file: every quantized kernel is an int8 initializer."""
  model, variables, x = _mlp()
  qm = ptq_jax.quantize(model, variables, x, w_bits=4, a_bits=8, first_last_bits=None,
                        progress=False)
  _, report, _ = _export(qm, tmp_path)
  kinds = [numpy_helper.to_array(t).dtype for t in onnx.load(report.path).graph.initializer
           if numpy_helper.to_array(t).size > 1000]
  assert kinds and all(k == np.int8 for k in kinds), kinds
  assert report.size_ratio < 0.3   # (a float kernel: ~1)


def test_a_zero_point_off_by_one_is_caught(toy, tmp_path):
  """The equality check is tight enough to see one input zero point moved by one."""
  model, variables, x = toy
  qm = ptq_jax.quantize(model, variables, x, w_bits=8, a_bits=8, progress=False)
  qm, report, program = _export(qm, tmp_path)
  _agree(program, qm, x)
  m = onnx.load(report.path)
  zp = next(t for t in m.graph.initializer if t.name.startswith('x_zp')
            and 0 < numpy_helper.to_array(t) < 255)
  zp.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(zp) + np.uint8(1), zp.name))
  session = ort.InferenceSession(m.SerializeToString(), providers=['CPUExecutionProvider'])
  with pytest.raises(AssertionError):
    _agree(lambda v: session.run(None, {'input': v})[0], qm, x)


def test_a_damaged_artifact_a_wrong_input_or_a_loop_is_a_clear_error(toy, tmp_path):
  model, variables, x = toy
  qm = ptq_jax.quantize(model, variables, x, w_bits=8, a_bits=8, progress=False)
  _, report, program = _export(qm, tmp_path)
  with pytest.raises(ValueError, match=r'float32 inputs of shape \(batch, 8, 8, 3\)'):
    program(x[:, :4])
  blob = open(report.path, 'rb').read()
  open(report.path, 'wb').write(blob[:len(blob) // 2])
  with pytest.raises(CheckpointError, match='SHA-256'):
    ptq_jax.load_exported(report.path)

  class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Dense(8, name='inp')(x)
      x, _ = jax.lax.scan(lambda c, _: (jnp_tanh(c), None), x, None, length=2)
      return nn.Dense(3, name='out')(x)
  jnp_tanh = jax.numpy.tanh
  xs = np.random.default_rng(0).normal(size=(8, 5)).astype(np.float32)
  scanned = Scanned()
  qm = ptq_jax.quantize(scanned, scanned.init(jax.random.key(0), xs), xs, progress=False)
  path = tmp_path / 'loop.onnx'
  with pytest.raises(ValueError, match='scan'):
    ptq_jax.export(qm, str(path), format='onnx')
  assert not path.exists() and not (tmp_path / 'loop.onnx.json').exists()


def test_symmetric_weights_are_int8_with_zero_point_0_and_survive_save_load(toy, tmp_path):
  """RangeConfig(weight_symmetric=True): symmetric weights, asymmetric inputs (the scheme
  ONNX Runtime's int8 kernels take). Catches the flag reaching the inputs too, getting
  lost on save/load, or 8-bit weights written as uint8 with zero points (its slow path)."""
  model, variables, x = toy
  ranges = ptq_jax.RangeConfig(weight_symmetric=True)
  qm = ptq_jax.quantize(model, variables, x, w_bits=8, a_bits=8, ranges=ranges,
                        progress=False)
  quants = [lq for lq in qm.qstate.values() if hasattr(lq, 'w_quant')]
  assert all(lq.w_quant.symmetric and not lq.a_quant.symmetric for lq in quants)
  qm.save(str(tmp_path / 'q.msgpack'))
  loaded = ptq_jax.QuantizedModel.load(str(tmp_path / 'q.msgpack'), model)
  np.testing.assert_array_equal(loaded.apply(x), qm.apply(x))
  _, report, program = _export(loaded, tmp_path)
  assert program.meta['uint8_weight_layers'] == []
  asymmetric = ptq_jax.quantize(model, variables, x, w_bits=8, a_bits=8, progress=False)
  _, _, program = _export(asymmetric, tmp_path, 'asym.onnx')
  assert 'conv' in program.meta['uint8_weight_layers']


class TwoConvs(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3), name='a')(x))
    x = nn.relu(nn.Conv(8, (3, 3), name='b')(x))
    return nn.Dense(3, name='head')(x.mean(axis=(1, 2)))


def test_a_dead_channel_with_a_large_bias_fits_the_int32_grid(tmp_path):
  """A channel whose weights are all zero has a weight step near 1e-13, so its bias
  needs ~2^40 at step s_x s_w: catches the bias clipped to int32 (a wrong output there)
  or left float (the conv then off ONNX Runtime's integer kernel)."""
  x = np.random.default_rng(0).normal(size=(16, 8, 8, 3)).astype(np.float32)
  model = TwoConvs()
  params = jax.tree.map(np.array, model.init(jax.random.key(0), x)['params'])
  params['a']['kernel'][..., 3] = 0.0
  params['a']['bias'][3] = 5.0
  qm = ptq_jax.quantize(model, {'params': params}, x, w_bits=8, a_bits=8,
                        ranges=ptq_jax.RangeConfig(weight_symmetric=True), progress=False)
  qm, report, program = _export(qm, tmp_path)
  assert report.bias_rounding < 1e-3
  assert program.meta['onnxruntime_integer_ops'].get('QLinearConv') == 1   # (a; b feeds no Q)
  _agree(program, qm, x)


ONNX_LOADER = '''
import sys
class Block:
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in ('ptq_jax', 'flax', 'jax'):
      raise ImportError(name + ' is blocked')
sys.meta_path.insert(0, Block())
import numpy as np
import onnxruntime as ort
logits = ort.InferenceSession(sys.argv[1]).run(None, {'input': np.load(sys.argv[2])})[0]
np.save(sys.argv[3], logits)
print(sorted(m for m in sys.modules if m.split('.')[0] in ('ptq_jax', 'flax', 'jax')))
'''


def test_the_onnx_model_runs_with_onnxruntime_alone(toy, tmp_path):
  """README's ONNX loader: a process that cannot import ptq_jax, flax or jax runs the
  model and gets the simulation's outputs."""
  model, variables, x = toy
  qm = ptq_jax.quantize(model, variables, x, w_bits=4, a_bits=8, progress=False)
  qm, report, _ = _export(qm, tmp_path)
  np.save(tmp_path / 'x.npy', x[:5])
  proc = subprocess.run([sys.executable, '-c', ONNX_LOADER, report.path, str(tmp_path / 'x.npy'),
                         str(tmp_path / 'y.npy')], capture_output=True, text=True, timeout=600,
                        cwd='/')
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip() == '[]'
  _agree(lambda v: np.load(tmp_path / 'y.npy'), qm, x[:5])
