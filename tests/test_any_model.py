"""Models from outside the bundled ones: whatever ptq_jax cannot quantize is an error
naming it (or, opted in, float with a warning and counted at 32 bits); BatchNorm on a
non-feature axis is left unfolded; models without a ``train`` argument run; PyTorch
weights after a channel-first flatten are permuted by a documented rule."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ptq_jax
from ptq_jax.quant.export import export_integer, load_integer
from ptq_jax.float_ops import UnsupportedLayerError
from ptq_jax.importers import from_flax_tree, from_nchw, to_flax_tree
from ptq_jax.importers.mapping import LayoutRule, MappingError


class WithParam(nn.Module):
  """A custom layer contracting its own parameter with jnp.dot."""

  @nn.compact
  def __call__(self, x):
    w = self.param('w', nn.initializers.lecun_normal(), (x.shape[-1], 6))
    return jnp.dot(x, w)


class Mixed(nn.Module):
  """Dense layers around one operation ptq_jax does not quantize, chosen by ``kind``."""
  kind: str

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(12, name='first')(x))
    if self.kind == 'dense_general_inner_axis':   # contracts an axis that is not last
      x = nn.DenseGeneral(5, axis=1, name='odd')(x.reshape(x.shape[0], 3, 4))
      x = x.reshape(x.shape[0], -1)
    elif self.kind == 'einsum':
      x = nn.Einsum((12, 6), '...i,ij->...j', name='odd')(x)
    elif self.kind == 'custom':
      x = WithParam(name='odd')(x)
    elif self.kind == 'shared':   # shared weights, called with two input shapes
      odd = nn.Dense(12, name='odd')
      x = odd(jnp.stack([x, nn.relu(odd(x))], axis=1)).mean(axis=1)
    return nn.Dense(4, name='last')(x)


def data(shape=(32, 10), seed=0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@pytest.mark.parametrize('kind', ['dense_general_inner_axis', 'einsum', 'custom', 'shared'])
def test_an_operation_ptq_jax_cannot_quantize_is_an_error_or_float_by_choice(kind):
  model, x = Mixed(kind), data()
  variables = model.init(jax.random.key(0), x)
  with pytest.raises(UnsupportedLayerError, match=r"odd .*unsupported='keep_float'"):
    ptq_jax.quantize(model, variables, x, w_bits=4, a_bits=8, progress=False)
  with pytest.warns(UserWarning, match='Kept in float32'):
    qm = ptq_jax.quantize(model, variables, x, w_bits=4, a_bits=8, first_last_bits=None,
                          progress=False, unsupported='keep_float')
  assert [l.path for l in qm.layers] == ['first', 'last']
  odd_params = sum(np.size(a) for a in jax.tree.leaves(variables['params']['odd']))
  kernel_only = kind != 'shared'   # the contracted operand; a shared module: all its params
  float_params = sum(op.params for op in qm.float_ops)
  assert float_params == (variables['params']['odd'][
      'kernel' if kind != 'custom' else 'w'].size if kernel_only else odd_params)
  layer_params = sum(l.params for l in qm.layers)
  assert qm.size_bits() == 4 * layer_params + 32 * float_params
  assert qm.fp32_bits() == 32 * (layer_params + float_params)
  assert [r['path'] for r in qm.report][-1] == 'odd' and qm.report[-1]['w_bits'] is None
  # The float operation really is float: the output stays close to the FP32 model's.
  err = np.abs(np.asarray(qm.apply(x)) - np.asarray(model.apply(variables, x))).max()
  assert err < 0.2 * np.abs(np.asarray(model.apply(variables, x))).max()


class Siamese(nn.Module):
  """A Dense used at two sites (a BatchNorm after the first only), or two copies of it."""
  shared: bool

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(16, name='first')(x))
    odd = nn.Dense(16, name='odd')
    x = nn.relu(nn.BatchNorm(use_running_average=True, name='bn')(odd(x)))
    x = nn.relu((odd if self.shared else nn.Dense(16, name='odd2'))(3.0 * x))
    return nn.Dense(4, name='last')(x)


def test_a_shared_layer_is_one_kernel_with_an_input_quantizer_per_site(tmp_path):
  x = data((64, 10))
  shared = Siamese(True)
  variables = jax.tree.map(np.asarray, shared.init(jax.random.key(0), x))
  rng = np.random.default_rng(3)
  variables['batch_stats']['bn'] = {'mean': rng.normal(size=16).astype(np.float32),
                                    'var': rng.uniform(0.2, 3, 16).astype(np.float32)}
  copies = {'params': dict(variables['params'], odd2=variables['params']['odd']),
            'batch_stats': variables['batch_stats']}
  fp = np.asarray(shared.apply(variables, x))
  np.testing.assert_allclose(Siamese(False).apply(copies, x), fp, rtol=1e-5)
  kw = dict(w_bits=8, a_bits=8, first_last_bits=None, progress=False)
  qm = ptq_jax.quantize(shared, variables, x, **kw)
  twin = ptq_jax.quantize(Siamese(False), copies, x, **kw)
  (odd,) = [l for l in qm.layers if l.path == 'odd']
  assert odd.sites == 2 and odd.bn_path is None and not qm.float_ops   # BN not folded
  assert len(qm.qstate['odd'].site_a_quants) == 1
  err = lambda m: np.abs(np.asarray(m.apply(x)) - fp).mean()
  assert err(qm) < 2 * err(twin)
  ada = ptq_jax.quantize(shared, variables, x, method='adaquant', mode='sequential',
                         adaquant=ptq_jax.AdaQuantConfig(iterations=20, batch_size=16),
                         **dict(kw, w_bits=4))
  (report,) = [r for r in ada.layer_reports if r['path'] == 'odd']
  assert report['sites'] == 2 and report['rel_error_after'] < report['rel_error_before']
  ada.save(str(tmp_path / 'q.msgpack'))
  again = ptq_jax.QuantizedModel.load(str(tmp_path / 'q.msgpack'), shared)
  np.testing.assert_array_equal(again.apply(x), ada.apply(x))


def test_mixed_precision_refuses_float_operations():
  model, x = Mixed('einsum'), data()
  variables = model.init(jax.random.key(0), x)
  with pytest.raises(UnsupportedLayerError):
    ptq_jax.mixed_precision(model, variables, x, options=('W8A8',), progress=False)
  with pytest.warns(UserWarning), pytest.raises(UnsupportedLayerError, match='Mixed precision'):
    ptq_jax.run_pipeline(model, variables, x, 'light', size_pct=50, options=('W8A8', 'W4A8'),
                         unsupported='keep_float', progress=False)


class AttentionBlock(nn.Module):
  """A pre-norm transformer block: Flax's attention projects with nn.DenseGeneral."""

  @nn.compact
  def __call__(self, x):
    h = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=16, name='attn')(
        nn.LayerNorm()(x))
    x = x + h
    x = x + nn.Dense(8, name='mlp_out')(nn.gelu(nn.Dense(32, name='mlp_in')(nn.LayerNorm()(x))))
    return nn.Dense(4, name='head')(x.mean(axis=1))


def test_attention_projections_are_quantized_layers():
  model, x = AttentionBlock(), data((32, 6, 8))
  variables = model.init(jax.random.key(0), x)
  projections = ['attn/query', 'attn/key', 'attn/value', 'attn/out']
  qm = ptq_jax.quantize(model, variables, x, w_bits=4, a_bits=8, first_last_bits=None,
                        progress=False)
  assert not qm.float_ops
  rows = {r['path']: r for r in qm.report}
  assert all(rows[p]['w_bits'] == 4 and rows[p]['weight_rel_mse'] > 0 for p in projections)
  assert rows['attn/query']['kernel_shape'] == '8x16' and rows['attn/out']['kernel_shape'] == '16x8'
  assert qm.size_bits() == 4 * sum(l.params for l in qm.layers)
  fp = np.asarray(model.apply(variables, x))
  ada = ptq_jax.quantize(model, variables, x, w_bits=4, a_bits=8, first_last_bits=None,
                         method='adaquant', mode='sequential',
                         adaquant=ptq_jax.AdaQuantConfig(iterations=12, batch_size=16),
                         progress=False)
  reports = {r['path']: r for r in ada.layer_reports}   # optimised, never made worse
  assert all(reports[p]['rel_error_after'] <= reports[p]['rel_error_before'] for p in projections)
  assert any(reports[p]['rel_error_after'] < reports[p]['rel_error_before'] for p in projections)
  assert np.abs(ada.apply(x) - fp).mean() < np.abs(qm.apply(x) - fp).mean()


def test_a_saved_attention_model_reloads(tmp_path):
  model, x = AttentionBlock(), data((16, 6, 8))
  variables = model.init(jax.random.key(0), x)
  qm = ptq_jax.quantize(model, variables, x, w_bits=4, a_bits=8, progress=False)
  qm.save(str(tmp_path / 'q.msgpack'))
  again = ptq_jax.QuantizedModel.load(str(tmp_path / 'q.msgpack'), model)
  np.testing.assert_array_equal(again.apply(x), qm.apply(x))


def test_smoothing_is_exact_in_float_and_tames_an_outlier_channel(tmp_path):
  """RangeConfig(smooth_alpha=...): with the quantizers removed the smoothed layers
  compute the float model exactly; with an outlier input channel, W8A4 error falls;
  the smoothing survives save/load and the integer export."""
  model, x = AttentionBlock(), data((32, 6, 8))
  x[:, :, 3] *= 30.0
  variables = model.init(jax.random.key(0), x)
  fp = np.asarray(model.apply(variables, x))
  common = dict(w_bits=8, a_bits=4, first_last_bits=None, progress=False)
  plain = ptq_jax.quantize(model, variables, x, **common)
  smooth = ptq_jax.quantize(model, variables, x, ranges=ptq_jax.RangeConfig(smooth_alpha=0.5),
                            **common)
  assert all(lq.smooth is not None for lq in smooth.qstate.values())
  unquantized = dataclasses.replace(smooth, qstate={
      p: lq.replace(w_quant=None, a_quant=None) for p, lq in smooth.qstate.items()})
  np.testing.assert_allclose(unquantized.apply(x), fp, rtol=1e-4, atol=1e-4)
  assert np.abs(smooth.apply(x) - fp).mean() < 0.7 * np.abs(plain.apply(x) - fp).mean()
  smooth.save(str(tmp_path / 's.msgpack'))
  again = ptq_jax.QuantizedModel.load(str(tmp_path / 's.msgpack'), model)
  np.testing.assert_array_equal(again.apply(x), smooth.apply(x))
  from ptq_jax.quant.capture import InputCapture
  from ptq_jax.quant.export import integer_layer_output
  records = export_integer(smooth, str(tmp_path / 'int.msgpack'))
  layer = smooth.layers[0]
  xs = InputCapture(model, variables, smooth.folded_bns)(smooth.qstate, x, [layer.path])[layer.path]
  from ptq_jax.quant.interceptor import quantized_input, quantized_weight
  expected = quantized_input(smooth.qstate[layer.path], xs) @ quantized_weight(
      smooth.qstate[layer.path]) + smooth.qstate[layer.path].bias
  np.testing.assert_allclose(integer_layer_output(records[layer.path], xs), expected,
                             rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match='smooth_alpha'):
    ptq_jax.RangeConfig(smooth_alpha=1.5)


class ChannelFirstBN(nn.Module):
  """A conv whose output BatchNorm normalises axis 1 (H here), not the features."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3), name='conv')(x)
    x = nn.BatchNorm(use_running_average=True, axis=1, name='bn')(x)
    return nn.Dense(3, name='head')(x.reshape(x.shape[0], -1))


def test_batchnorm_on_another_axis_is_not_folded_and_stays_exact():
  model, x = ChannelFirstBN(), data((8, 6, 6, 2))
  variables = model.init(jax.random.key(0), x)
  rng = np.random.default_rng(1)
  stats = variables['batch_stats']['bn']
  variables['batch_stats']['bn'] = {'mean': jnp.asarray(rng.normal(size=stats['mean'].shape)),
                                    'var': jnp.asarray(rng.uniform(0.2, 3, stats['var'].shape))}
  qm = ptq_jax.quantize(model, variables, x, w_bits=None, a_bits=None, first_last_bits=None,
                        progress=False)
  assert qm.layers[0].bn_path is None
  np.testing.assert_allclose(qm.apply(x), model.apply(variables, x), rtol=1e-5, atol=1e-5)


class NoTrainArgument(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.relu(nn.Dense(8)(x)))


class TrainsByDefault(nn.Module):
  """Dropout active unless deterministic=True: inference must pass it."""

  @nn.compact
  def __call__(self, x, deterministic: bool = False):
    x = nn.Dropout(0.5, deterministic=deterministic)(nn.relu(nn.Dense(8)(x)))
    return nn.Dense(3)(x)


@pytest.mark.parametrize('model', [NoTrainArgument(), TrainsByDefault()],
                         ids=['no train argument', 'deterministic=False by default'])
def test_evaluation_and_quantization_call_any_model_in_inference_mode(model):
  x = data()
  variables = model.init(jax.random.key(0), x)
  expected = model.apply(variables, x, **({'deterministic': True}
                                         if isinstance(model, TrainsByDefault) else {}))
  np.testing.assert_allclose(ptq_jax.predict_logits(model, variables, x), expected, rtol=1e-5,
                             atol=1e-6)
  qm = ptq_jax.quantize(model, variables, x, w_bits=8, a_bits=8, progress=False)
  np.testing.assert_allclose(qm.predict(x), expected, atol=0.1)


class CircularConv(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), padding='CIRCULAR', name='circ')(x))
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


def test_adaquant_says_which_layers_it_cannot_optimise():
  model, x = CircularConv(), data((16, 6, 6, 2))
  variables = model.init(jax.random.key(0), x)
  with pytest.warns(UserWarning, match=r"AdaQuant leaves \['circ'\]"):
    qm = ptq_jax.quantize(model, variables, x, w_bits=4, a_bits=8, method='adaquant',
                          adaquant=ptq_jax.AdaQuantConfig(iterations=2), progress=False)
  assert qm.bits()['circ'] == (8, 8)   # quantized (first layer), not left float


class Decoder(nn.Module):
  """Transposed convs (SAME with stride, VALID with dilation, explicit padding) and
  Einsum projections (to two feature axes, and from them)."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.ConvTranspose(6, (3, 3), strides=(2, 2), name='up')(x))
    x = nn.relu(nn.ConvTranspose(5, (2, 3), strides=(1, 2), padding='VALID',
                                 kernel_dilation=(2, 1), name='wide')(x))
    x = nn.ConvTranspose(4, (3, 3), padding=((1, 2), (0, 1)), name='explicit')(x)
    x = x.reshape(x.shape[0], -1, 4)
    x = nn.Einsum((4, 2, 3), 'btd,dhk->bthk', name='heads')(x)   # output features (h, k)
    return nn.Einsum((2, 3, 3), 'bthk,hko->bto', name='proj')(x).mean(axis=1)


def test_transposed_convs_and_einsum_are_quantized_layers(tmp_path):
  model, x = Decoder(), data((16, 5, 4, 3))
  variables = model.init(jax.random.key(0), x)
  fp = np.asarray(model.apply(variables, x))
  layers = ['up', 'wide', 'explicit', 'heads', 'proj']
  exact = ptq_jax.quantize(model, variables, x, w_bits=None, a_bits=None,
                           first_last_bits=None, progress=False)   # the geometry, in float
  assert [l.path for l in exact.layers] == layers and not exact.float_ops
  np.testing.assert_allclose(exact.apply(x), fp, rtol=1e-5, atol=1e-5)
  qm = ptq_jax.quantize(model, variables, x, w_bits=4, a_bits=8, first_last_bits=None,
                        method='adaquant', adaquant=ptq_jax.AdaQuantConfig(iterations=20),
                        progress=False)
  rows = {r['path']: r for r in qm.report}
  assert all(rows[p]['w_bits'] == 4 and rows[p]['weight_rel_mse'] > 0 for p in layers)
  assert rows['heads']['kernel_shape'] == '4x6'   # output features (2, 3) as one axis
  reports = {r['path']: r for r in qm.layer_reports}
  assert all(reports[p]['rel_error_after'] <= reports[p]['rel_error_before'] for p in layers)
  assert np.abs(qm.apply(x) - fp).mean() < 0.1 * np.abs(fp).mean()
  from ptq_jax.quant.capture import InputCapture
  from ptq_jax.quant.export import integer_layer_output
  from ptq_jax.quant.interceptor import quantized_layer_output
  records = load_integer(export_integer(qm, str(tmp_path / 'i.msgpack'))
                                 and str(tmp_path / 'i.msgpack'))
  inputs = InputCapture(model, variables, qm.folded_bns)(qm.qstate, x, layers)
  modules = {'up': nn.ConvTranspose(6, (3, 3), strides=(2, 2)),
             'proj': nn.Einsum((2, 3, 3), 'bthk,hko->bto')}
  for path, module in modules.items():   # the integer kernels compute what fake-quant does
    np.testing.assert_allclose(integer_layer_output(records[path], inputs[path]),
                               quantized_layer_output(module, qm.qstate[path], inputs[path]),
                               rtol=1e-4, atol=1e-4)


class TorchStyleCNN(nn.Module):
  """conv -> flatten -> dense, written for NHWC data."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(3, (3, 3), padding='VALID', name='conv')(x))
    return nn.Dense(5, name='fc')(x.reshape(x.shape[0], -1))


def torch_forward(weights, x_nchw):
  """The same network computed the PyTorch way: NCHW, (O, I, kh, kw), flatten(1)."""
  w, b = weights['conv.weight'], weights['conv.bias']
  n, _, h, wd = x_nchw.shape
  kh, kw = w.shape[2:]
  out = np.zeros((n, w.shape[0], h - kh + 1, wd - kw + 1), np.float32)
  for i in range(out.shape[2]):
    for j in range(out.shape[3]):
      patch = x_nchw[:, :, i:i + kh, j:j + kw]
      out[:, :, i, j] = np.einsum('ncij,ocij->no', patch, w) + b
  flat = np.maximum(out, 0).reshape(n, -1)          # channel-first flatten
  return flat @ weights['fc.weight'].T + weights['fc.bias']


def test_from_nchw_rule_ports_a_dense_after_a_channel_first_flatten():
  rng = np.random.default_rng(0)
  weights = {'conv.weight': rng.normal(size=(3, 2, 3, 3)).astype(np.float32),
             'conv.bias': rng.normal(size=3).astype(np.float32),
             'fc.weight': rng.normal(size=(5, 3 * 4 * 4)).astype(np.float32),
             'fc.bias': rng.normal(size=5).astype(np.float32)}
  model = TorchStyleCNN()
  x_nchw = rng.normal(size=(4, 2, 6, 6)).astype(np.float32)
  x = np.transpose(x_nchw, (0, 2, 3, 1))
  template = jax.eval_shape(model.init, jax.random.key(0), x)
  mapping = {('params', 'conv', 'kernel'): ('conv.weight', LayoutRule.CONV),
             ('params', 'conv', 'bias'): ('conv.bias', LayoutRule.COPY),
             ('params', 'fc', 'kernel'): ('fc.weight', from_nchw(3, 4, 4)),
             ('params', 'fc', 'bias'): ('fc.bias', LayoutRule.COPY)}
  variables = to_flax_tree(weights, mapping, template)
  np.testing.assert_allclose(model.apply(variables, x), torch_forward(weights, x_nchw),
                             rtol=1e-4, atol=1e-4)
  # Forgetting the rule: the shapes still match, the outputs do not.
  plain = dict(mapping)
  plain[('params', 'fc', 'kernel')] = ('fc.weight', LayoutRule.DENSE)
  wrong = to_flax_tree(weights, plain, template)
  assert np.abs(model.apply(wrong, x) - torch_forward(weights, x_nchw)).max() > 0.1
  back = from_flax_tree(variables, mapping)
  for name, array in weights.items():
    np.testing.assert_array_equal(back[name], array)
  with pytest.raises(MappingError, match=r'must be \(out, 12\), got \(5, 48\)'):
    to_flax_tree(weights, {**mapping, ('params', 'fc', 'kernel'): ('fc.weight',
                                                                   from_nchw(3, 2, 2))},
                 template)
  with pytest.raises(ValueError, match='channels'):
    from_nchw(0, 4, 4)


def test_a_subclass_calling_super_traces_like_its_base():
  from ptq_jax.trace import trace_model
  from tests.test_quant import ToyNet, random_variables

  class Tanh(ToyNet):
    def __call__(self, x, train: bool = False):
      return super().__call__(jnp.tanh(x), train)

  x = data((4, 12, 12, 3))
  variables = random_variables(ToyNet(), jnp.asarray(x))
  base, sub = (trace_model(m, variables, x) for m in (ToyNet(), Tanh()))
  assert not sub.float_ops
  assert [(l.path, l.bn_path, l.activation) for l in sub.layers] == [
      (l.path, l.bn_path, l.activation) for l in base.layers]
  assert any(l.activation != 'none' for l in base.layers)
  assert any(l.bn_path for l in base.layers)


def test_pipelines_and_mixed_precision_take_a_range_config():
  """ranges=RangeConfig(smooth_alpha=...) reaches every option state and the
  options the models record."""
  model, x = AttentionBlock(), data((16, 6, 8))
  variables = model.init(jax.random.key(0), x)
  config = ptq_jax.RangeConfig(smooth_alpha=0.5)
  result = ptq_jax.run_pipeline(model, variables, x, 'light', size_pct=40,
                                options=('W8A8', 'W4A8'), ranges=config, progress=False)
  assert result.model.settings['smooth_alpha'] == 0.5
  assert all(lq.smooth is not None for lq in result.model.qstate.values())
  with pytest.raises(TypeError, match='RangeConfig'):
    ptq_jax.run_pipeline(model, variables, x, 'light', ranges=3, progress=False)


