"""Flax NNX modules through every entry point: the NNX twin of the bundled ResNet-20
quantizes exactly like the Linen one, and an NNX model with LinearGeneral, LayerNorm,
Dropout and BatchNorm runs through quantize, the pipelines, mixed precision, save/load
and the integer export; what cannot be quantized is named by its NNX path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ptq_jax
from ptq_jax.quant.export import export_integer
from ptq_jax.float_ops import UnsupportedLayerError
from ptq_jax.models.resnet_nnx import resnet20_nnx


@pytest.fixture(scope='module')
def resnets():
  model, variables, _ = ptq_jax.load_model(ptq_jax.bundled_checkpoints()['resnet20_fashion_mnist'])
  x = np.random.default_rng(0).uniform(-1, 1, (8, 28, 28, 1)).astype(np.float32)
  return model, variables, resnet20_nnx(variables), x


def test_nnx_resnet20_quantizes_exactly_like_the_linen_one(resnets):
  model, variables, twin, x = resnets
  np.testing.assert_allclose(ptq_jax.predict_logits(twin, images=x),
                             ptq_jax.predict_logits(model, variables, x), rtol=1e-5, atol=1e-5)
  config = ptq_jax.AdaQuantConfig(iterations=2, batch_size=8)
  common = dict(w_bits=None, a_bits=None, first_last_bits=None, method='adaquant',
                mode='sequential', adaquant=config, key=jax.random.key(0), progress=False)
  # W4A4 on the first five layers (the rest float: a shorter test, the same mechanism).
  first = lambda layers: {l.path: {'w_bits': 4, 'a_bits': 4} for l in layers[:5]}
  linen = ptq_jax.quantize(model, variables, x, overrides=first(ptq_jax.trace(model, variables, x)),
                           **common)
  nnx_q = ptq_jax.quantize(twin, calib=x, overrides=first(ptq_jax.stages.prepare(twin, calib=x).layers),
                           **common)
  assert len(nnx_q.layer_reports) == len(linen.layer_reports) == 5
  assert [l.path for l in nnx_q.layers][:3] == ['conv_init', 'blocks.0.conv0', 'blocks.0.conv1']
  assert [(l.kernel_shape, l.bn_path is not None, l.activation) for l in nnx_q.layers] == [
      (l.kernel_shape, l.bn_path is not None, l.activation) for l in linen.layers]
  np.testing.assert_allclose(nnx_q.apply(x), linen.apply(x), rtol=1e-5, atol=1e-5)
  for a, b in zip(linen.layer_reports, nnx_q.layer_reports):
    np.testing.assert_allclose(a['mse_after'], b['mse_after'], rtol=1e-5)


class Tagger(nnx.Module):
  """A small NNX network: conv + BatchNorm, LinearGeneral heads, LayerNorm, Dropout."""

  def __init__(self, rngs, einsum: bool = False):
    self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(4, rngs=rngs)
    self.layers = nnx.List([nnx.Linear(4, 8, rngs=rngs), nnx.Linear(8, 6, rngs=rngs)])
    self.heads = nnx.LinearGeneral(6, (2, 3), rngs=rngs)
    self.norm = nnx.LayerNorm(6, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.ein = nnx.Einsum('bi,oi->bo', (6, 6), rngs=rngs) if einsum else None  # contracts its last axis

  def __call__(self, x):
    x = nnx.relu(self.bn(self.conv(x)))
    x = self.drop(x.mean(axis=(1, 2)))
    for layer in self.layers:
      x = nnx.relu(layer(x))
    x = self.norm(self.heads(x).reshape(x.shape[0], -1))
    return self.ein(x) if self.ein is not None else x


@pytest.fixture(scope='module')
def tagger():
  module = Tagger(nnx.Rngs(0))
  module.eval()
  rng = np.random.default_rng(1)
  module.bn.mean[...] = jnp.asarray(rng.normal(size=4), jnp.float32)
  module.bn.var[...] = jnp.asarray(rng.uniform(0.5, 2, 4), jnp.float32)
  return module, rng.normal(size=(32, 6, 6, 1)).astype(np.float32)


def test_every_entry_point_takes_an_nnx_module(tagger, tmp_path):
  module, x = tagger
  expected = np.asarray(module(jnp.asarray(x)))
  np.testing.assert_allclose(ptq_jax.predict_logits(module, images=x), expected, atol=1e-6)
  qm = ptq_jax.quantize(module, calib=x, w_bits=8, a_bits=8, progress=False)
  assert [l.path for l in qm.layers] == ['conv', 'layers.0', 'layers.1', 'heads']
  assert qm.layers[0].bn_path == 'bn'
  assert np.abs(qm.apply(x) - expected).max() < 0.05 * np.abs(expected).max()
  qm.save(str(tmp_path / 'q.msgpack'))
  again = ptq_jax.QuantizedModel.load(str(tmp_path / 'q.msgpack'), module)
  np.testing.assert_array_equal(again.apply(x), qm.apply(x))
  assert len(export_integer(qm, str(tmp_path / 'int.msgpack'))) == 4
  result = ptq_jax.run_pipeline(module, calib=x, pipeline='light', size_pct=20,
                                options=('W8A8', 'W4A8'), bias_steps=2, progress=False)
  assert [s.name for s in result.stages] == ['mixed_precision', 'bn_tuning']
  assert result.model.size_bits() <= 0.2 * result.model.fp32_bits() + 1


def test_nnx_misuse_and_unsupported_modules_are_named(tagger):
  module, x = tagger
  with pytest.raises(TypeError, match='carries its own state'):
    ptq_jax.quantize(module, {'params': {}}, x)
  linen, variables, _ = ptq_jax.load_model(ptq_jax.bundled_checkpoints()['resnet20_fashion_mnist'])
  with pytest.raises(TypeError, match='needs its variables'):
    ptq_jax.quantize(linen, calib=x)
  with pytest.raises(TypeError, match='calib'):
    ptq_jax.quantize(module)
  with pytest.raises(TypeError, match='flax.linen.Module or a flax.nnx.Module'):
    ptq_jax.quantize(lambda x: x, {}, x)
  with_einsum = Tagger(nnx.Rngs(0), einsum=True)
  with_einsum.eval()
  with pytest.raises(UnsupportedLayerError, match=r'ein \(dot_general, 36 parameters\): Einsum'):
    ptq_jax.quantize(with_einsum, calib=x, progress=False)
  with pytest.warns(UserWarning, match='Kept in float32'):
    kept = ptq_jax.quantize(with_einsum, calib=x, unsupported='keep_float', progress=False)
  assert [op.path for op in kept.float_ops] == ['ein']


def test_the_vit_trains_by_the_train_job_and_comes_back_as_nnx(tfds_dir, tmp_path):
  """The registry ViT (NNX) through the train command's job (a few steps), its
  checkpoint through load_model, back to an NNX module whose attention projections are
  quantizable layers."""
  from configs import train_vit
  from ptq_jax.jobs import registry as jobs
  from ptq_jax.nnx_bridge import to_nnx
  from ptq_jax.models.vit_nnx import ViT
  config = train_vit.get_config()
  config.data.data_dir = tfds_dir
  config.num_epochs, config.train_limit, config.eval_limit, config.batch_size = 1, 256, 100, 64
  card = jobs.run(config, str(tmp_path))
  model, variables, meta = ptq_jax.load_model(str(tmp_path / 'vit_fmnist_fashion_mnist.msgpack'))
  assert meta['model'] == 'vit_fmnist' and card['num_params'] > 100_000
  module = to_nnx(model, variables)
  assert isinstance(module, ViT)
  x = np.random.default_rng(0).normal(size=(8, 28, 28, 1)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(module(jnp.asarray(x))),
                             ptq_jax.predict_logits(model, variables, x), rtol=1e-5, atol=1e-5)
  layers = ptq_jax.stages.prepare(module, calib=x[:1]).layers   # attention projections are layers
  assert {'blocks.0.attn.query', 'blocks.0.attn.out'} <= {l.path for l in layers}


class NNXDecoder(nnx.Module):
  def __init__(self, rngs):
    self.up = nnx.ConvTranspose(3, 6, (3, 3), strides=(2, 2), rngs=rngs)
    self.proj = nnx.Einsum('btd,do->bto', (6, 4), (4,), rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.up(x))
    return self.proj(x.reshape(x.shape[0], -1, 6)).mean(axis=1)


def test_nnx_transposed_conv_and_einsum_are_layers():
  module = NNXDecoder(nnx.Rngs(0))
  x = np.random.default_rng(2).normal(size=(8, 4, 4, 3)).astype(np.float32)
  exact = ptq_jax.quantize(module, calib=x, w_bits=None, a_bits=None, first_last_bits=None,
                           progress=False)
  assert [l.path for l in exact.layers] == ['up', 'proj'] and not exact.float_ops
  np.testing.assert_allclose(exact.apply(x), module(jnp.asarray(x)), rtol=1e-5, atol=1e-5)
