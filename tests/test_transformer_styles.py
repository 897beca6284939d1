"""Transformer code in the styles people publish, through every entry point: a tied
language-model head applied with explicit parameters (ptq_jax.param_views), own einsum
attention with masks, pre- and post-LayerNorm, a ViT with a class token."""

import flax.linen as nn
import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
import pytest

import ptq_jax
from ptq_jax.deploy import export, load_exported
from ptq_jax.float_ops import UnsupportedLayerError
from ptq_jax.quant.interceptor import quantized_weight
from tests.test_matmul_sites import EinsumAttention, Encoder, activation_matmuls


class TiedLM(nn.Module):
  """A language model whose head is the embedding, applied with explicit parameters (as
  public LM code writes it); ``scale`` makes the head's kernel no plain view of it,
  ``to_body`` ties a second head to the body layer's own kernel."""
  scale: float = 1.0
  to_body: bool = False

  def setup(self):
    self.embed = nn.Embed(50, 16)
    self.body = nn.Dense(16)
    self.decoder = nn.Dense(50, use_bias=False)
    self.mirror = nn.Dense(16, use_bias=False)

  def __call__(self, x):
    h = jnp.tanh(self.body(self.embed(x.astype(jnp.int32))))
    if self.to_body:
      h = self.mirror.apply({'params': {'kernel': self.body.variables['params']['kernel'].T}}, h)
    table = self.embed.embedding if self.scale == 1.0 else self.embed.embedding * self.scale
    return self.decoder.apply({'params': {'kernel': table.T}}, h)


class TiedCausalLM(nn.Module):
  """GPT-style: token embedding, one post-LayerNorm block of own einsum attention under a
  causal mask, the output head tied to the embedding."""

  def setup(self):
    self.embed = nn.Embed(40, 16)
    self.attn = EinsumAttention()
    self.ln = nn.LayerNorm()
    self.decoder = nn.Dense(40, use_bias=False)

  def __call__(self, tokens):
    h = self.embed(tokens.astype(jnp.int32))
    h = self.ln(h + self.attn(h))
    return self.decoder.apply({'params': {'kernel': self.embed.embedding.T}}, h)


class ClassTokenViT(nn.Module):
  """Patches embedded, a learned class token and positions, one post-LayerNorm block of
  own einsum attention (no mask), the head on the class token."""

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(16, name='patch')(x)
    cls = self.param('cls', nn.initializers.normal(1.0), (1, 1, 16))
    h = jnp.concatenate([jnp.broadcast_to(cls, (h.shape[0], 1, 16)), h], axis=1)
    h = h + self.param('pos', nn.initializers.normal(0.1), (1, h.shape[1], 16))
    q, k, v = (nn.Dense(16, name=n)(h) for n in 'qkv')
    w = jax.nn.softmax(jnp.einsum('bqd,bkd->bqk', q, k) / 4.0)
    h = nn.LayerNorm(name='ln1')(h + nn.Dense(16, name='o')(jnp.einsum('bqk,bkd->bqd', w, v)))
    h = nn.LayerNorm(name='ln2')(h + nn.Dense(16, name='mlp')(nn.gelu(h)))
    return nn.Dense(4, name='head')(h[:, 0])


def tokens(n=32, vocab=50, seed=0):
  return np.random.default_rng(seed).integers(0, vocab, size=(n, 8)).astype(np.float32)


def weight_matmuls(model, variables, x) -> int:
  """The model's dot_generals of a parameter (or a view of one) with the input, counted
  from its jaxpr here, independently of the library."""
  closed = jax.make_jaxpr(lambda v, x: model.apply(v, x))(variables, x)
  flags = dict(zip(closed.jaxpr.invars,
                   [(True, False)] * len(jax.tree.leaves(variables)) + [(False, True)]))
  total = 0
  for eqn in closed.jaxpr.eqns:
    ins = [(False, False) if isinstance(v, jex.Literal) else flags.get(v, (False, False))
           for v in eqn.invars]
    if eqn.primitive.name == 'dot_general':
      (p0, d0), (p1, d1) = ins[:2]
      total += (p0 and not d0 and d1) or (p1 and not d1 and d0)
    for v in eqn.outvars:
      flags[v] = (any(p for p, _ in ins), any(d for _, d in ins))
  return total


def test_a_tied_head_is_one_kernel_quantized_once_and_shared_with_the_lookup():
  """Catches: the tied head refused or left float, its kernel counted twice in the size,
  the embedding lookup reading the float table (or a wrongly transposed one) while the
  head reads the quantized one, and a tied model that is not exact in float."""
  x = tokens()
  model = TiedLM()
  variables = model.init(jax.random.key(0), x)
  qm = ptq_jax.quantize(model, variables, x, w_bits=8, a_bits=8, progress=False)
  rows = {r['path']: r for r in qm.report}
  assert sorted(rows) == ['body', 'decoder'] and rows['decoder']['w_bits'] == 8
  assert rows['decoder']['params'] == 50 * 16 and not qm.float_ops
  assert qm.size_bits() == 8 * (16 * 16 + 16 + 50 * 16)   # the shared table once
  # The head's quantized kernel is the table the lookup reads.
  only_head = ptq_jax.quantize(model, variables, x, w_bits=4, a_bits=8, progress=False,
                               overrides={'body': {'w_bits': None, 'a_bits': None},
                                          'decoder': {'a_bits': None}})
  table = quantized_weight(only_head.qstate['decoder']).T
  assert np.abs(table - variables['params']['embed']['embedding']).max() > 1e-3
  params = {**variables['params'], 'embed': {'embedding': table}}
  np.testing.assert_allclose(only_head.apply(x), model.apply({'params': params}, x),
                             rtol=1e-5, atol=1e-5)
  floats = ptq_jax.quantize(model, variables, x, progress=False,
                            overrides={p: {'w_bits': None, 'a_bits': None}
                                       for p in ('body', 'decoder')})
  np.testing.assert_array_equal(floats.apply(x), model.apply(variables, x))


def test_a_kernel_that_is_no_view_of_one_parameter_is_named_or_kept_float():
  """A head whose passed kernel is computed (here scaled) cannot be quantized as one
  kernel: catches an error naming '<top level>', a raw KeyError with keep_float, or the
  head silently quantized from a copy."""
  x = tokens()
  model = TiedLM(scale=0.5)
  variables = model.init(jax.random.key(0), x)
  with pytest.raises(UnsupportedLayerError, match='decoder .*explicitly passed parameters.*'
                     'computed from a parameter by mul'):
    ptq_jax.quantize(model, variables, x, w_bits=8, a_bits=8, progress=False)
  with pytest.warns(UserWarning, match='Kept in float32'):
    qm = ptq_jax.quantize(model, variables, x, w_bits=8, a_bits=8, progress=False,
                          unsupported='keep_float', overrides={'body': {'w_bits': None,
                                                                        'a_bits': None}})
  assert [l.path for l in qm.layers] == ['body'] and qm.float_ops[0].path == 'decoder'
  assert qm.float_ops[0].params == 50 * 16
  np.testing.assert_allclose(qm.apply(x), model.apply(variables, x), rtol=1e-5, atol=1e-5)
  # A kernel viewing another layer's own kernel would be a second quantizer of it.
  model = TiedLM(to_body=True)
  with pytest.raises(UnsupportedLayerError, match='mirror .*its kernel is body/kernel, which '
                     'another layer quantizes'):
    ptq_jax.quantize(model, model.init(jax.random.key(0), x), x, progress=False)


STYLES = {
    'pre-LN einsum encoder': (Encoder, lambda: np.random.default_rng(0).normal(
        size=(32, 6, 8)).astype(np.float32)),
    'post-LN ViT, class token': (ClassTokenViT, lambda: np.random.default_rng(0).normal(
        size=(32, 6, 8)).astype(np.float32)),
    'tied causal LM': (TiedCausalLM, lambda: tokens(vocab=40)),
}


@pytest.mark.parametrize('style', sorted(STYLES))
def test_published_transformer_styles_through_every_entry_point(style, tmp_path):
  """Each style: quantized at W8A8 and W4A8 with and without its matmuls, the report
  against the model's own count of weight and activation matmuls, AdaQuant, mixed
  precision, save/load and export. Catches a style whose layers or sites go missing
  from one entry point (float where the report says quantized)."""
  cls, make = STYLES[style]
  x = make()
  model = cls()
  variables = model.init(jax.random.key(0), x[:1])
  fp = np.asarray(model.apply(variables, x))
  weights, matmuls = weight_matmuls(model, variables, x[:1]), activation_matmuls(
      model, variables, x[:1])
  outputs = {}
  for w_bits in (8, 4):
    for on in (False, True):
      qm = ptq_jax.quantize(model, variables, x, w_bits=w_bits, a_bits=8, first_last_bits=None,
                            quantize_matmuls=on, progress=False)
      kinds = [r['kind'] for r in qm.report]
      assert len(qm.layers) == weights and not qm.float_ops
      assert kinds.count('matmul') == (matmuls if on else 0)
      assert set(qm.bits().values()) == {(w_bits, 8)}
      outputs[w_bits, on] = np.asarray(qm.apply(x))
  err = {k: np.abs(o - fp).mean() / np.abs(fp).mean() for k, o in outputs.items()}
  assert err[8, True] < 0.05 and err[4, False] > err[8, False]
  assert np.abs(outputs[8, True] - outputs[8, False]).max() > 1e-5   # the matmuls count
  config = ptq_jax.AdaQuantConfig(iterations=5, batch_size=16)
  ada = ptq_jax.quantize(model, variables, x, w_bits=4, a_bits=8, first_last_bits=None,
                         method='adaquant', adaquant=config, quantize_matmuls=True,
                         progress=False)
  assert {r['path'] for r in ada.layer_reports} >= {l.path for l in ada.layers}
  mixed = ptq_jax.run_pipeline(model, variables, x, 'light', size_pct=20,
                               options=('W8A8', 'W4A8'), bias_steps=0, first_last_bits=None,
                               quantize_matmuls=True, progress=False).model
  assert set(mixed.bits().values()) <= {(8, 8), (4, 8)} and len(mixed.matmul_bits()) == matmuls
  assert mixed.size_bits() <= 0.2 * mixed.fp32_bits()
  mixed.save(str(tmp_path / 'q.msgpack'))
  again = ptq_jax.QuantizedModel.load(str(tmp_path / 'q.msgpack'), model)
  np.testing.assert_array_equal(again.apply(x), mixed.apply(x))
  for name, fmt in (('q.jaxexport', 'jax'), ('q.onnx', 'onnx')):
    export(mixed, str(tmp_path / name), format=fmt)
    np.testing.assert_allclose(load_exported(str(tmp_path / name))(x), mixed.apply(x),
                               rtol=1e-4, atol=1e-4)
