"""quantize_matmuls on transformer code as people write it: activation x activation
matmuls anywhere (ptq_jax.matmul_sites, ptq_jax.quant.matmuls)."""

import flax.linen as nn
import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
import pytest

import ptq_jax
from ptq_jax.deploy import export, load_exported
from ptq_jax.float_ops import UnsupportedLayerError
from ptq_jax.quant.interceptor import apply_quantized, layer_states
from ptq_jax.stages.attention import calibrate_attention, optimize_attention
from ptq_jax.stages.prepare import prepare
from ptq_jax.stages.ranges import BitsRule, calibrate_ranges


class EinsumAttention(nn.Module):
  """Own attention: nn.dot_product_attention_weights with a causal mask (under jax.jit),
  then an einsum with V (under jax.checkpoint)."""

  @nn.compact
  def __call__(self, x):
    b, length, _ = x.shape
    heads = lambda name: nn.Dense(16, name=name)(x).reshape(b, length, 2, 8)
    mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
    weights = jax.jit(lambda q, k, m: nn.dot_product_attention_weights(q, k, mask=m))
    mix = jax.checkpoint(lambda w, v: jnp.einsum('bhqk,bkhd->bqhd', w, v))
    o = mix(weights(heads('q'), heads('k'), mask), heads('v')).reshape(b, length, 16)
    return nn.Dense(16, name='out')(o)


class PreNormBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = x + EinsumAttention(name='attn')(nn.LayerNorm(name='ln1')(x))
    return x + nn.Dense(16, name='mlp')(nn.gelu(nn.LayerNorm(name='ln2')(x)))


class Encoder(nn.Module):
  """Two pre-LayerNorm blocks, as public code stacks them."""

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(16, name='embed')(x)
    x = PreNormBlock(name='block_0')(x)
    x = PreNormBlock(name='block_1')(x)
    return nn.Dense(4, name='head')(x.mean(1))


class ScanStep(nn.Module):
  @nn.compact
  def __call__(self, carry, _):
    return PreNormBlock(name='block')(carry), None


class ScannedEncoder(nn.Module):
  """Blocks under nn.scan (stacked parameters): layers and matmuls in the loop's body."""

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(16, name='embed')(x)
    x, _ = nn.scan(ScanStep, variable_axes={'params': 0}, split_rngs={'params': True},
                   length=2)(name='blocks')(x, None)
    return nn.Dense(4, name='head')(x.mean(1))


class RematEncoder(nn.Module):
  """The second block under nn.remat (a rematerialised function)."""

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(16, name='embed')(x)
    x = PreNormBlock(name='block_0')(x)
    x = nn.remat(PreNormBlock)(name='block_1')(x)
    return nn.Dense(4, name='head')(x.mean(1))


def data(n=32, seed=0):
  return np.random.default_rng(seed).normal(size=(n, 6, 8)).astype(np.float32)


def activation_matmuls(model, variables, x) -> int:
  """The model's dot_generals whose two operands both depend on the input, counted from
  its jaxpr here (independently of the library), loop bodies included."""
  closed = jax.make_jaxpr(lambda v, x: model.apply(v, x))(variables, x)

  def count(jaxpr, data):
    flags, total = dict(zip(jaxpr.invars, data)), 0
    for eqn in jaxpr.eqns:
      ins = [False if isinstance(v, jex.Literal) else flags.get(v, False) for v in eqn.invars]
      total += eqn.primitive.name == 'dot_general' and ins[0] and ins[1]
      for sub in jex.jaxprs_in_params(eqn.params):
        total += count(sub, ins if len(sub.invars) == len(ins) else [any(ins)] * len(sub.invars))
      for v in eqn.outvars:
        flags[v] = any(ins)
    return total
  leaves = len(jax.tree.leaves(variables))
  return count(closed.jaxpr, [False] * leaves + [True])


def test_einsum_attention_matmuls_are_quantized_reported_and_reloaded(tmp_path):
  """Catches: matmuls outside recognised attention modules left float (or refused), a
  site missing from the report or the size, a site inside jax.jit / jax.checkpoint not
  reached, sites lost on save/load, an exported program that computes them otherwise."""
  x = data()
  model = Encoder()
  variables = model.init(jax.random.key(0), x[:1])
  fp = model.apply(variables, x)
  on = ptq_jax.quantize(model, variables, x, w_bits=8, a_bits=8, quantize_matmuls=True,
                        progress=False)
  sites = {f'block_{i}/attn:matmul{k}': 8 for i in range(2) for k in range(2)}
  assert on.matmul_bits() == sites
  assert len(sites) == activation_matmuls(model, variables, x[:1]) == 4
  rows = {r['path']: r for r in on.report}
  assert all(rows[s]['kind'] == 'matmul' and rows[s]['a_bits'] == 8 for s in sites)
  assert on.size_bits() == 8 * sum(l.params for l in on.layers)   # operands: no weights
  layers_only = apply_quantized(model, variables, layer_states(on.qstate), on.folded_bns,
                                jnp.asarray(x))
  assert np.abs(on.apply(x) - layers_only).max() > 1e-4   # the matmuls changed
  assert np.abs(on.apply(x) - fp).mean() < 0.03 * np.abs(fp).mean()   # close at 8 bits
  on.save(str(tmp_path / 'q.msgpack'))
  again = ptq_jax.QuantizedModel.load(str(tmp_path / 'q.msgpack'), model)
  assert again.matmul_bits() == sites
  np.testing.assert_array_equal(again.apply(x), on.apply(x))
  for name, fmt in (('q.jaxexport', 'jax'), ('q.onnx', 'onnx')):   # integers / QDQ
    export(on, str(tmp_path / name), format=fmt)
    np.testing.assert_allclose(load_exported(str(tmp_path / name))(x), on.apply(x),
                               rtol=1e-4, atol=1e-4)


def test_float_sites_are_exact_and_hooks_see_their_operands():
  """Evaluating the traced program with no site quantized is the model itself, and
  ``on_operand`` sees each site's two operands: catches an interpreter that drops or
  reorders an equation, or names sites other than the trace does."""
  x = data(4)
  model = Encoder()
  variables = model.init(jax.random.key(0), x[:1])
  seen = {}
  out = apply_quantized(model, variables, {}, frozenset(), jnp.asarray(x),
                        on_operand=lambda site, name, v: seen.setdefault((site, name), v.shape))
  np.testing.assert_array_equal(out, model.apply(variables, x))
  assert sorted(seen) == sorted((f'block_{i}/attn:matmul{k}', n) for i in range(2)
                                for k in range(2) for n in ('lhs', 'rhs'))


@pytest.mark.parametrize('wrapper', ['scan', 'remat'])
def test_layers_and_matmuls_under_scan_or_remat_are_named_or_kept_float(wrapper):
  """Catches: a loop body's layers or matmuls silently left float, a tracer leaking out
  of nn.remat's function, or an error naming '<top level>' instead of the paths."""
  x = data(16)
  model = ScannedEncoder() if wrapper == 'scan' else RematEncoder()
  variables = model.init(jax.random.key(0), x[:1])
  assert activation_matmuls(model, variables, x[:1]) == 4 if wrapper == 'remat' else 2
  inner = 'blocks/block' if wrapper == 'scan' else 'block_1'
  message = rf'{inner}/attn/q \(module call.*inside a {wrapper}2? program'
  if wrapper == 'scan':
    message += rf'.*{inner}/attn:matmul0 .*inside a scan body'
  with pytest.raises(UnsupportedLayerError, match=message):
    ptq_jax.quantize(model, variables, x, quantize_matmuls=True, progress=False)
  with pytest.warns(UserWarning, match='Kept in float32'):
    qm = ptq_jax.quantize(model, variables, x, w_bits=8, a_bits=8, quantize_matmuls=True,
                          unsupported='keep_float', progress=False)
  assert not any(l.path.startswith(inner) for l in qm.layers)
  # A site inside nn.remat's function is reached (evaluated inline); one in a loop is not.
  assert sorted(qm.matmul_bits()) == ([] if wrapper == 'scan' else sorted(
      f'block_{i}/attn:matmul{k}' for i in range(2) for k in range(2)))
  np.testing.assert_allclose(qm.apply(x), model.apply(variables, x), atol=0.1)


def test_matmul_sites_are_optimised_and_never_made_worse():
  """The matmul stage fits a site's operand quantizers like an attention site's: catches
  a site skipped by the optimiser or a fit kept though it made the output worse."""
  x = data(48)
  model = Encoder()
  variables = model.init(jax.random.key(0), x[:1])
  prepared = prepare(model, variables, x, quantize_matmuls=True, progress=False)
  state = calibrate_ranges(prepared, BitsRule(8, 4, None).assign(prepared.layers))
  state = calibrate_attention(prepared, state, 4)
  config = ptq_jax.AdaQuantConfig(iterations=30, batch_size=16)
  fitted, rows = optimize_attention(prepared, state, config, jax.random.key(0))
  assert [r["path"] for r in rows] == sorted(site.name for site in prepared.matmul_sites)
  assert all(r['kind'] == 'matmul' and r['optimised'] for r in rows)
  assert all(r['rel_error_after'] <= r['rel_error_before'] for r in rows)
  assert any(r['rel_error_after'] < r['rel_error_before'] for r in rows)
  changed = [r['path'] for r in rows if r['rel_error_after'] < r['rel_error_before']]
  assert all(float(fitted[p].lhs.range) != float(state[p].lhs.range)
             or float(fitted[p].rhs.range) != float(state[p].rhs.range) for p in changed)

