"""quantize_matmuls: the activation x activation matmuls of attention (Q·Kᵀ, attention·V)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ptq_jax
from ptq_jax.quant.export import export_integer
from ptq_jax.float_ops import UnsupportedLayerError
from ptq_jax.quant.attention import AttentionQuant, quantized_attention
from ptq_jax.quant.quantizer import init_minmax


class Block(nn.Module):
  attention_fn: object = nn.dot_product_attention

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(16, name='embed')(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=2, attention_fn=self.attention_fn,
                                            name='attn')(x)
    return nn.Dense(4, name='head')(x.mean(axis=1))


class NNXBlock(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Linear(8, 16, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(2, 16, decode=False, rngs=rngs)
    self.head = nnx.Linear(16, 4, rngs=rngs)

  def __call__(self, x):
    x = self.embed(x)
    return self.head((x + self.attn(x)).mean(axis=1))


def data(seed=0):
  return np.random.default_rng(seed).normal(size=(32, 6, 8)).astype(np.float32)


def test_the_explicit_attention_is_flax_attention_and_quantizes_its_operands():
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(3, 5, 2, 4)), jnp.float32) for _ in range(3))
  mask = jnp.asarray(rng.uniform(size=(3, 2, 5, 5)) > 0.3)
  for kwargs in ({}, {'mask': mask}):
    np.testing.assert_allclose(quantized_attention(q, k, v, **kwargs),
                               nnx.dot_product_attention(q, k, v, **kwargs), atol=1e-5)
  quant = AttentionQuant(*(init_minmax(t, 3) for t in (q, k, jnp.ones(()), v)))
  coarse = quantized_attention(q, k, v, quant=quant)
  assert 0.01 < float(jnp.abs(coarse - quantized_attention(q, k, v)).mean()) < 1.0


def test_attention_matmuls_are_quantized_only_when_asked(tmp_path):
  model, x = Block(), data()
  variables = model.init(jax.random.key(0), x)
  fp = np.asarray(model.apply(variables, x))
  kw = dict(w_bits=8, a_bits=4, first_last_bits=None, progress=False)
  off = ptq_jax.quantize(model, variables, x, **kw)
  on = ptq_jax.quantize(model, variables, x, quantize_matmuls=True, **kw)
  assert off.matmul_bits() == {} and on.matmul_bits() == {'attn': 4}
  assert np.abs(on.apply(x) - fp).mean() > np.abs(off.apply(x) - fp).mean()
  assert np.abs(on.apply(x) - off.apply(x)).mean() > 0.01   # the matmuls changed
  assert {r['path']: r['kind'] for r in on.report}['attn'] == 'attention matmuls'
  on.save(str(tmp_path / 'q.msgpack'))
  again = ptq_jax.QuantizedModel.load(str(tmp_path / 'q.msgpack'), model)
  assert again.matmul_bits() == {'attn': 4}
  np.testing.assert_array_equal(again.apply(x), on.apply(x))
  with pytest.raises(ValueError, match='quantize_matmuls'):
    export_integer(on, str(tmp_path / 'int.msgpack'))
  result = ptq_jax.run_pipeline(model, variables, x, 'sequential', w_bits=8, a_bits=4,
                                first_last_bits=None, quantize_matmuls=True, bias_steps=2,
                                adaquant=ptq_jax.AdaQuantConfig(iterations=40, batch_size=16),
                                stage_guard=True, progress=False)
  assert [s.name for s in result.stages] == ['ranges', 'matmul_ranges', 'adaquant',
                                             'matmul_adaquant', 'bn_tuning', 'bias_tuning']
  # The stage guard never wraps a stage that quantizes the matmuls: dropping one could
  # leave them float.
  assert [s.guard is not None for s in result.stages] == [False, False, True, False, True,
                                                          True]
  assert [s.model.matmul_bits() for s in result.stages] == [{}] + [{'attn': 4}] * 5
  (site,) = result.stages[3].report   # the operand quantizers fitted, never made worse
  assert site['optimised'] and site['rel_error_after'] < site['rel_error_before']
  spec = ptq_jax.QuantSpec(adaquant=ptq_jax.AdaQuantConfig(), quantize_matmuls=True)
  names = lambda name, **kw: [s.name for s in ptq_jax.recipes.pipeline(name, spec, **kw)]
  assert names('advanced') == ['ranges', 'matmul_ranges', 'adaquant', 'matmul_adaquant',
                               'bn_tuning', 'bias_tuning']
  assert names('light', size_pct=13) == ['mixed_precision', 'matmul_ranges', 'bn_tuning']
  assert names('advanced', size_pct=13) == ['mixed_precision', 'matmul_adaquant', 'bn_tuning',
                                            'bias_tuning']


def test_nnx_attention_matmuls_and_what_cannot_be_quantized():
  module, x = NNXBlock(nnx.Rngs(0)), data(1)
  on = ptq_jax.quantize(module, calib=x, w_bits=8, a_bits=8, quantize_matmuls=True,
                        progress=False)
  assert on.matmul_bits() == {'attn': 8}
  assert np.abs(on.apply(x) - module(jnp.asarray(x))).max() < 0.05
  with pytest.raises(ValueError, match='no activation x activation matmul'):
    ptq_jax.quantize(nn.Dense(3), nn.Dense(3).init(jax.random.key(0), x), x,
                     quantize_matmuls=True)
  with pytest.raises(ValueError, match='a_bits=None'):
    ptq_jax.quantize(module, calib=x, a_bits=None, quantize_matmuls=True)
  # A custom attention function is not a recognised site: its two matmuls are matmul
  # sites of the module, quantized all the same.
  custom = Block(attention_fn=lambda q, k, v, **kw: nn.dot_product_attention(q, k, v))
  variables = custom.init(jax.random.key(0), x)
  quantized = ptq_jax.quantize(custom, variables, x, quantize_matmuls=True, progress=False)
  assert quantized.matmul_bits() == {'attn:matmul0': 4, 'attn:matmul1': 4}
