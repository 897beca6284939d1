"""Quantization core: quantizers, folding, the quantized forward pass, export, errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ptq_jax
from ptq_jax import checkpoint as ckpt
from ptq_jax.models import create_model
from ptq_jax.quant import export, quantizer
from ptq_jax.quant.folding import fold_batchnorm
from ptq_jax.quant.percentile import percentile as sort_free_percentile
from ptq_jax.quant.interceptor import LayerQuant, apply_quantized, quantized_layer_output
from ptq_jax.quant.quantizer import (QuantizerState, fake_quant, init_range, quantize_to_int,
                                     reshape_for)


class ToyNet(nn.Module):
  """Written here, not in ptq_jax.models: strided, grouped and depthwise convs, a
  BatchNorm not preceded by a conv, a residual add and a Dense head."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    norm = lambda: nn.BatchNorm(use_running_average=not train)
    x = norm()(x)                                             # BN on the raw input
    x = nn.relu(norm()(nn.Conv(8, (3, 3), strides=2)(x)))     # strided conv + BN + ReLU
    y = nn.Conv(8, (3, 3), feature_group_count=2, use_bias=False)(x)  # grouped
    y = nn.relu6(norm()(y))
    y = nn.Conv(8, (3, 3), feature_group_count=8, padding=[(1, 1), (0, 2)])(y)  # depthwise
    x = x + norm()(y)                                         # residual add, no activation
    x = nn.Conv(12, (1, 1), kernel_dilation=1)(x)             # no BN, no activation
    return nn.Dense(5)(jnp.mean(x, axis=(1, 2)))


def random_variables(model, x, seed=0):
  """Initial variables with every parameter and BN statistic perturbed, so that folding
  and quantization see non-trivial values. The init is one jitted program and the noise
  comes from NumPy: op by op, MobileNetV2's hundreds of small random ops each compile,
  which took over half a minute on 2 cores."""
  variables = jax.jit(model.init)(jax.random.key(seed), x)
  rng = np.random.default_rng(seed + 1)
  noisy = lambda a, noise: jax.device_put(np.asarray(a) + noise.astype(a.dtype))
  stats = jax.tree.map(lambda a: noisy(a, 0.5 * rng.uniform(size=a.shape)),
                       variables['batch_stats'])
  params = jax.tree.map(lambda a: noisy(a, 0.1 * rng.standard_normal(a.shape)),
                        variables['params'])
  return {'params': params, 'batch_stats': stats}


@pytest.fixture(scope='module')
def toy():
  model = ToyNet()
  x = jax.random.normal(jax.random.key(7), (32, 12, 12, 3))
  return model, random_variables(model, x), x


# --- quantizers --------------------------------------------------------------------------

@pytest.mark.parametrize('bits', [2, 3, 4, 8])
@pytest.mark.parametrize('symmetric', [False, True])
def test_at_most_2_pow_b_levels_and_exact_on_grid(bits, symmetric):
  x = jax.random.normal(jax.random.key(bits), (4096,)) * 3
  q = init_range(x, bits, 'minmax', symmetric=symmetric)
  y = fake_quant(x, q)
  assert len(np.unique(np.asarray(y))) <= 2**bits
  codes = quantize_to_int(x, q)
  assert int(codes.max()) - int(codes.min()) <= 2**bits - 1
  np.testing.assert_allclose(fake_quant(y, q), y, atol=1e-5)   # idempotent on the grid
  assert float(jnp.abs(fake_quant(jnp.zeros(()), q))) == 0.0    # zero is representable
  step = q.range / (2**bits - 1 if not symmetric else 2**(bits - 1) - 1)
  assert float(jnp.max(jnp.abs(y - x))) <= float(step) / 2 + 1e-5  # min/max: no clipping


def test_straight_through_gradients():
  q = QuantizerState(jnp.float32(2.0), jnp.float32(-1.0), 4)
  x = jnp.linspace(-0.9, 0.9, 11)
  gx = jax.grad(lambda x: jnp.sum(fake_quant(x, q)))(x)
  np.testing.assert_allclose(gx, jnp.ones_like(x))   # identity inside the range
  gx_out = jax.grad(lambda x: jnp.sum(fake_quant(x, q)))(jnp.array([5.0, -5.0]))
  np.testing.assert_allclose(gx_out, 0.0)             # clipped values get no gradient
  g = jax.grad(lambda q: jnp.sum(fake_quant(jnp.array([5.0, 0.37]), q)))(q)
  assert float(g.range) != 0.0 and np.isfinite(float(g.low))


def test_mse_and_percentile_clip_outliers():
  x = jnp.concatenate([jax.random.normal(jax.random.key(0), (10000,)), jnp.array([60.0])])
  full = init_range(x, 4, 'minmax')
  for method in ('mse', 'percentile'):
    q = init_range(x, 4, method)
    assert float(q.range) < float(full.range)
    assert float(jnp.mean((fake_quant(x, q) - x)**2)) < float(jnp.mean((fake_quant(x, full) - x)**2))


@pytest.mark.parametrize('dist,bits,symmetric', [
    ('normal', 4, False), ('relu', 8, False), ('student', 4, True), ('discrete', 2, False),
    ('lognormal', 8, True), ('constant', 4, False)])
def test_mse_search_from_histogram_is_the_exhaustive_search(dist, bits, symmetric):
  """The per-tensor MSE range from the histogram (ptq_jax.quant.mse_search) is the one
  scoring every candidate on the tensor picks: catches a wrong moment formula, a
  candidate dropped from the exact re-scoring or a score other than the plain one."""
  rng = np.random.default_rng(bits)
  x = {'normal': rng.normal(size=(40, 50)), 'relu': np.maximum(rng.normal(size=(8, 9, 9, 30)), 0),
       'student': rng.standard_t(2.0, size=20000), 'lognormal': np.exp(2 * rng.normal(size=5000)),
       'discrete': np.round(3 * rng.normal(size=20000)) / 3,
       'constant': np.full(100, 0.5)}[dist].astype(np.float32)
  got = jax.jit(lambda v: quantizer.init_mse(v, bits, None, symmetric, exhaustive=False))(x)
  want = jax.jit(lambda v: quantizer.init_mse(v, bits, None, symmetric, exhaustive=True))(x)
  np.testing.assert_array_equal(got.range, want.range)
  np.testing.assert_array_equal(got.low, want.low)


def test_per_channel_ranges():
  w = jnp.stack([jnp.linspace(-1, 1, 50), jnp.linspace(-8, 2, 50)], axis=-1)
  q = init_range(w, 4, 'minmax', channel_axis=-1)
  np.testing.assert_allclose(q.range, [2.0, 10.0], rtol=1e-6)
  np.testing.assert_allclose(q.low, [-1.0, -8.0], rtol=1e-6)
  assert float(jnp.max(jnp.abs(fake_quant(w, reshape_for(q, 2)) - w))) <= 10 / 15 / 2 + 1e-5


# --- tracing and folding ------------------------------------------------------------------

def test_trace_of_a_model_written_here(toy):
  model, variables, x = toy
  layers = ptq_jax.trace(model, variables, x[:1])
  assert [l.kind for l in layers] == ['conv'] * 4 + ['dense']
  strided, grouped, depthwise, pointwise, head = layers
  assert (strided.bn_path, strided.activation) == ('BatchNorm_1', 'relu')
  assert (grouped.groups, grouped.bn_path, grouped.activation) == (2, 'BatchNorm_2', 'relu6')
  assert (depthwise.groups, depthwise.bn_path, depthwise.activation) == (8, 'BatchNorm_3', 'none')
  assert pointwise.bn_path is None and head.bn_path is None
  # Hand counts: 12x12 -> 6x6 at stride 2; depthwise padding (1,1),(0,2) keeps 6x6.
  assert strided.macs == 6 * 6 * 8 * 9 * 3 and strided.params == 9 * 3 * 8 + 8
  assert grouped.macs == 6 * 6 * 8 * 9 * 4 and grouped.params == 9 * 4 * 8
  assert depthwise.macs == 6 * 6 * 8 * 9 and depthwise.output_shape == (6, 6, 8)
  assert depthwise.geometry.padding == ((1, 1), (0, 2)) and strided.geometry.strides == (2, 2)
  assert head.macs == 12 * 5 and head.params == 12 * 5 + 5


@pytest.mark.parametrize('name', ['resnet20', 'mobilenet_v2_fmnist'])
def test_folding_equivalence(name):
  model = create_model(name)
  x = jax.random.normal(jax.random.key(0), (8, 28, 28, 1))
  variables = random_variables(model, x)
  layers = ptq_jax.trace(model, variables, x[:1])
  folded = fold_batchnorm(layers, variables)
  state = {p: LayerQuant(f.kernel, f.bias) for p, f in folded.items()}
  bns = frozenset(l.bn_path for l in layers if l.bn_path)
  expected = jax.jit(model.apply)(variables, x)   # (compiled: MobileNetV2 op by op is slow)
  actual = jax.jit(lambda v, s, x: apply_quantized(model, v, s, bns, x))(variables, state, x)
  np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5 * float(jnp.abs(expected).max()))


def test_folding_equivalence_toy(toy):
  model, variables, x = toy
  layers = ptq_jax.trace(model, variables, x[:1])
  state = {p: LayerQuant(f.kernel, f.bias) for p, f in fold_batchnorm(layers, variables).items()}
  bns = frozenset(l.bn_path for l in layers if l.bn_path)
  np.testing.assert_allclose(apply_quantized(model, variables, state, bns, x),
                             model.apply(variables, x), rtol=1e-4, atol=1e-5)


# --- quantize(), the policy, save/load, export ----------------------------------------------

def test_quantize_bits_policy_and_overrides(toy):
  model, variables, x = toy
  qm = ptq_jax.quantize(model, variables, np.asarray(x), w_bits=4, a_bits=4)
  bits = qm.bits()
  paths = [l.path for l in qm.layers]
  assert bits[paths[0]] == (8, 8) and bits[paths[-1]] == (8, 8)
  assert all(bits[p] == (4, 4) for p in paths[1:-1])
  alike = ptq_jax.quantize(model, variables, np.asarray(x), w_bits=3, a_bits=5,
                           first_last_bits=None, overrides={paths[2]: {'w_bits': 2}})
  assert alike.bits()[paths[0]] == (3, 5) and alike.bits()[paths[2]] == (2, 5)
  report = alike.report
  assert [r['path'] for r in report] == paths and report[2]['weight_bits_total'] == 2 * report[2]['params']


def test_more_bits_means_closer_outputs(toy):
  model, variables, x = toy
  ref = model.apply(variables, x)
  errors = [float(jnp.mean((ptq_jax.quantize(model, variables, np.asarray(x), w_bits=b, a_bits=b,
                                             first_last_bits=None).apply(x) - ref)**2))
            for b in (3, 5, 8)]
  assert errors[0] > errors[1] > errors[2]
  assert errors[2] < 1e-3 * float(jnp.mean(ref**2))


def test_per_channel_inputs(toy, tmp_path):
  model, variables, x = toy
  qm = ptq_jax.quantize(model, variables, np.asarray(x), w_bits=4, a_bits=4,
                        ranges=ptq_jax.RangeConfig(per_channel_inputs=True))
  first = qm.qstate[qm.layers[0].path].a_quant
  assert first.range.shape == (3,)  # one range per input channel
  assert bool(jnp.all(jnp.isfinite(qm.apply(x))))
  with pytest.raises(ValueError, match='per-channel input quantizers'):
    export.export_integer(qm, str(tmp_path / 'int.msgpack'))
  assert not (tmp_path / 'int.msgpack').exists()


def test_save_load_identical_outputs(toy, tmp_path):
  model, variables, x = toy
  qm = ptq_jax.quantize(model, variables, np.asarray(x), w_bits=4, a_bits=6,
                        ranges=ptq_jax.RangeConfig('mse', symmetric=True))
  path = str(tmp_path / 'q.msgpack')
  qm.save(path)
  loaded = ptq_jax.QuantizedModel.load(path, model)
  assert loaded.bits() == qm.bits() and loaded.settings == qm.settings
  np.testing.assert_array_equal(loaded.apply(x), qm.apply(x))
  with pytest.raises(ptq_jax.CheckpointError, match='another model'):
    ptq_jax.QuantizedModel.load(path, create_model('resnet20'))
  # A file written before the settings had their name (meta key 'options') still loads.
  tree, meta = ckpt.load_checkpoint(path)
  meta['options'] = meta.pop('settings')
  ckpt.save_checkpoint(path, tree, meta)
  assert ptq_jax.QuantizedModel.load(path, model).settings == qm.settings


def test_models_with_the_same_bits_share_one_compiled_forward(toy):
  """Pipeline stages (same model and bits, other values) reuse one program; other bit
  widths compile their own."""
  from ptq_jax.quantized_model import _quantized_forward
  model, variables, x = toy
  x = np.asarray(x)
  a = ptq_jax.quantize(model, variables, x[:16], w_bits=5, a_bits=7)
  b = ptq_jax.quantize(model, variables, x[16:], w_bits=5, a_bits=7)
  before = _quantized_forward._cache_size()
  out_a = a.apply(x[:9])
  assert _quantized_forward._cache_size() == before + 1
  out_b = b.apply(x[:9])
  assert _quantized_forward._cache_size() == before + 1
  assert not np.array_equal(out_a, out_b)  # other ranges, same program
  ptq_jax.quantize(model, variables, x, w_bits=6, a_bits=7).apply(x[:9])
  assert _quantized_forward._cache_size() == before + 2


@pytest.mark.parametrize('bits,symmetric', [(4, False), (3, True), (8, False), (2, False)])
def test_integer_reference_equals_fake_quant(toy, tmp_path, bits, symmetric):
  model, variables, x = toy
  qm = ptq_jax.quantize(model, variables, np.asarray(x), w_bits=bits, a_bits=bits,
                        first_last_bits=None, ranges=ptq_jax.RangeConfig(symmetric=symmetric))
  path = str(tmp_path / 'int.msgpack')
  export.export_integer(qm, path)
  records = export.load_integer(path)
  assert list(records) == [l.path for l in qm.layers]
  inputs = {}
  apply_quantized(model, variables, qm.qstate, qm.folded_bns, x,
                  on_layer=lambda p, v: inputs.setdefault(p, v))
  modules = {}

  def grab(next_fun, args, kwargs, context):
    if context.module.path:
      modules.setdefault('/'.join(context.module.path), context.module.clone(parent=None))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(grab):
    model.apply(variables, x[:1])
  for layer in qm.layers:
    record = records[layer.path]
    packed = record['w_codes']
    expected_bytes = int(np.prod(layer.kernel_shape))
    assert packed.size == ((expected_bytes + 1) // 2 if bits <= 4 else expected_bytes)
    fake = quantized_layer_output(modules[layer.path], qm.qstate[layer.path], inputs[layer.path])
    integer = export.integer_layer_output(record, inputs[layer.path])
    scale = float(jnp.abs(fake).max())
    np.testing.assert_allclose(integer, fake, atol=1e-5 * scale, rtol=1e-5)


def test_pack_unpack_round_trip():
  rng = np.random.default_rng(0)
  for bits in (2, 3, 4, 5, 8):
    codes = rng.integers(0, 2**bits, (3, 3, 5, 7)).astype(np.uint8)
    np.testing.assert_array_equal(export.unpack_codes(export.pack_codes(codes, bits), bits,
                                                      codes.shape), codes)


# --- bad input -----------------------------------------------------------------------------

@pytest.mark.parametrize('kwargs,match', [
    (dict(w_bits=1), 'w_bits=1 is not supported'),
    (dict(a_bits=9), 'a_bits=9 is not supported'),
    (dict(w_bits=4.5), 'w_bits=4.5'),
    (dict(first_last_bits=16), 'first_last_bits=16'),
    (dict(overrides={'Conv_0': {'w_bits': 12}}), 'Conv_0 w_bits=12'),
])
def test_bad_options(toy, kwargs, match):
  model, variables, x = toy
  with pytest.raises(ValueError, match=match):
    ptq_jax.quantize(model, variables, np.asarray(x[:4]), **kwargs)


def test_bad_range_config():
  with pytest.raises(ValueError, match="method='kl'"):
    ptq_jax.RangeConfig('kl')
  with pytest.raises(ValueError, match="weight_method='max'"):
    ptq_jax.RangeConfig(weight_method='max')


def test_bad_calibration_data(toy):
  model, variables, x = toy
  bad = np.asarray(x[:4]).copy()
  bad[2, 0, 0, 0] = np.nan
  with pytest.raises(ValueError, match=r'NaN or Inf values in 1 image\(s\) \(first indices \[2\]'):
    ptq_jax.quantize(model, variables, bad)
  bad[2, 0, 0, 0] = np.inf
  with pytest.raises(ValueError, match='NaN or Inf'):
    ptq_jax.quantize(model, variables, bad)
  with pytest.raises(ValueError, match='calibration set is empty'):
    ptq_jax.quantize(model, variables, np.zeros((0, 12, 12, 3), np.float32))
  with pytest.raises(ValueError, match='preprocessed floats'):
    ptq_jax.quantize(model, variables, np.zeros((4, 12, 12, 3), np.uint8))


def test_wrong_calibration_shape_is_named():
  model = create_model('resnet20')
  variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  wrong = np.zeros((4, 32, 32, 3), np.float32)
  with pytest.raises(ValueError, match=r'shape \(32, 32, 3\).*\(28, 28, 1\)'):
    ptq_jax.quantize(model, variables, wrong, input_shape=(28, 28, 1))
  with pytest.raises(ValueError, match=r'cannot run with these variables on calibration images of shape \(32, 32, 3\)'):
    ptq_jax.quantize(model, variables, wrong)


@pytest.mark.parametrize('n,p', [(1000, 99.99), (12345, 99.9), (7, 80.0), (1000, 100.0),
                                 (3001, 60.0), (1, 99.0)])
def test_percentile_by_order_statistics_is_jnp_percentile(n, p):
  """The sort-free percentile (ptq_jax.quant.percentile) gives jnp.percentile's very
  numbers, both tails, per channel and per tensor, with ties and signed zeros: catches
  an off-by-one rank or digit, other interpolation weights or a wrong float ordering of negative numbers."""
  x = np.random.default_rng(n).normal(size=(n, 3)).astype(np.float32)
  x[::7], x[::11], x[5:50] = 0.0, -0.0, 1.5
  for q in (p, 100 - p):
    want = jax.jit(lambda v: jnp.percentile(v, q, axis=0))(x)
    np.testing.assert_array_equal(jax.jit(lambda v: sort_free_percentile(v, q))(x), want)
    # one tensor (the radix select), not per channel (the binary search)
    for radix in (True, False):
      np.testing.assert_array_equal(
          jax.jit(lambda v: sort_free_percentile(v, q, radix))(x[:, 1]), want[1])
