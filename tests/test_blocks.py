"""Block-wise reconstruction: blocks from the traced graph, exact block programs, and
joint reconstruction that beats layer-wise where the block is what matters."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ptq_jax
from ptq_jax.quant.blocks import BlockProgram
from ptq_jax.quant.interceptor import LayerQuant, apply_quantized, layer_states, quantized_weight
from ptq_jax.stages.adaquant.block import _BlockFns, optimize_block


class Residual(nn.Module):
  """A stem, one residual block of two convs, a conv and a head. The names say nothing
  of the structure: blocks must come from the graph."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.Conv(8, (3, 3), name='a')(x))
    y = nn.Conv(8, (3, 3), name="b")(x)   # (no activation: a linear bottleneck)
    y = nn.Conv(8, (3, 3), name='c')(y)
    x = nn.relu(x + y)
    x = nn.relu(nn.Conv(8, (3, 3), name='d')(x))
    return nn.Dense(4, name='e')(x.mean((1, 2)))


class SharedChain(nn.Module):
  """A Dense called twice with another layer between its calls."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    shared = nn.Dense(16, name='shared')
    x = nn.relu(nn.Dense(16, name='first')(x))
    x = nn.relu(shared(x))
    x = nn.relu(nn.Dense(16, name='middle')(x))
    x = nn.relu(shared(x))
    return nn.Dense(3, name='head')(x)


class Masked(nn.Module):
  """Channel 1 of the input is a mask every block reads (as attention masks are): a
  value recomputed from the model input, which must not keep blocks from forming."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    mask = (x[:, 1] > 0).astype(jnp.float32)
    h = nn.relu(nn.Dense(8, name='first')(x[:, 0])) * mask
    h = h + nn.Dense(8, name='branch')(nn.relu(nn.Dense(8, name='expand')(h))) * mask
    return nn.Dense(3, name='head')(h * mask)


@pytest.fixture(scope='module')
def residual():
  model = Residual()
  x = np.asarray(jax.random.normal(jax.random.key(0), (96, 8, 8, 3)))
  variables = model.init(jax.random.key(1), x[:1])
  base = ptq_jax.quantize(model, variables, x, w_bits=2, a_bits=8, first_last_bits=None,
                          progress=False)
  return model, variables, x, base


def _program(qm, x):
  return BlockProgram(qm.model, qm.variables, qm.qstate, qm.folded_bns, x[:4])


def test_blocks_come_from_the_graph_and_chain_to_the_model_output(residual):
  """The residual block (fork to add) is one block, every other layer its own; running
  the blocks one after another is the quantized model, at any batch size. Catches a
  wrong cut (a block boundary inside the residual) or an interpreter that drops or
  misreads an operation."""
  model, variables, x, base = residual
  program = _program(base, x)
  assert [b.paths for b in program.blocks] == [('a',), ('b', 'c'), ('d',), ('e',)]
  value = jnp.asarray(x[:7])   # (traced at 4 examples: 7 is a second trace)
  for block in program.blocks:
    value = program.run(block, value, base.qstate)
  expected = apply_quantized(model, variables, base.qstate, base.folded_bns, x[:7])
  np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-5)


def test_blocks_recompute_values_of_the_model_input_they_read():
  model = Masked()
  x = np.asarray(jax.random.normal(jax.random.key(4), (16, 2, 8)))
  variables = model.init(jax.random.key(5), x[:1])
  qm = ptq_jax.quantize(model, variables, x, w_bits=4, a_bits=8, progress=False)
  program = _program(qm, x)
  assert [b.paths for b in program.blocks] == [('first',), ('expand', 'branch'), ('head',)]
  assert [b.needs_input for b in program.blocks] == [False, True, False]
  value = jnp.asarray(x)
  for block in program.blocks:
    value = program.run(block, value, qm.qstate, model_input=jnp.asarray(x))
  np.testing.assert_allclose(value, qm.apply(jnp.asarray(x)), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='model input'):
    program.run(program.blocks[1], value, qm.qstate)


def test_a_shared_layer_joins_the_blocks_between_its_calls():
  model = SharedChain()
  x = np.asarray(jax.random.normal(jax.random.key(2), (32, 6)))
  variables = model.init(jax.random.key(3), x[:1])
  qm = ptq_jax.quantize(model, variables, x, w_bits=4, a_bits=8, progress=False)
  program = _program(qm, x)
  assert [b.paths for b in program.blocks] == [('first',), ('shared', 'middle'), ('head',)]


def test_an_unknown_unit_is_refused():
  with pytest.raises(ValueError, match="unit must be one of \\('layer', 'block'\\)"):
    ptq_jax.AdaQuantConfig(unit='blocks')


def _block_error(qm, base, x, index):
  """The relative error of block ``index``'s output on its float inputs."""
  program = _program(base, x)
  float_state = {p: LayerQuant(lq.kernel, lq.bias) for p, lq in base.qstate.items()}
  value = jnp.asarray(x)
  for block in program.blocks[:index]:
    value = program.run(block, value, float_state)
  block = program.blocks[index]
  fns = _BlockFns(program, block, 32)
  return fns.error(qm.qstate, value, fns.outputs(float_state, value))[1]


def test_block_reconstruction_beats_layer_wise_on_the_block_output(residual):
  """W2 on a residual block: fitting the two convs jointly to the block's output leaves
  a smaller error there than fitting each to its own output, from the same start, with
  the same steps. Catches a block loss that is not the block's output (or gradients
  that do not reach one of its layers)."""
  model, variables, x, base = residual
  # (A weight rate high enough for the kernels, not only the ranges, to move in 100 steps.)
  config = ptq_jax.AdaQuantConfig(iterations=100, batch_size=32, lr_kernel=1e-3)
  fits = {}
  for unit in ('layer', 'block'):
    fits[unit] = ptq_jax.quantize(model, variables, x, w_bits=2, a_bits=8, first_last_bits=None,
                                  method='adaquant', progress=False,
                                  adaquant=dataclasses.replace(config, unit=unit))
  start, layer, block = (_block_error(q, base, x, 1) for q in (base, fits['layer'],
                                                                fits['block']))
  assert block < layer < start
  assert block < 0.8 * layer
  reports = fits['block'].layer_reports
  assert [r['paths'] for r in reports] == [['a'], ['b', 'c'], ['d'], ['e']]
  assert all(r['rel_error_after'] <= r['rel_error_before'] for r in reports)
  np.testing.assert_allclose(reports[1]['rel_error_after'], block, rtol=1e-3)


def test_sequential_blocks_train_on_the_quantized_prefix(residual):
  """Sequential mode: a block's inputs are the already-reconstructed blocks' outputs,
  its targets the float model's. Catches float inputs in sequential mode."""
  model, variables, x, base = residual
  qm = ptq_jax.quantize(model, variables, x, w_bits=2, a_bits=8, first_last_bits=None,
                        method='adaquant', mode='sequential', progress=False,
                        adaquant=ptq_jax.AdaQuantConfig(iterations=15, batch_size=32,
                                                        unit='block'))
  reports = qm.layer_reports
  assert all(r['rel_error_after'] <= r['rel_error_before'] and r['mode'] == 'sequential'
             for r in reports)
  program = _program(base, x)
  float_state = {p: LayerQuant(lq.kernel, lq.bias) for p, lq in base.qstate.items()}
  first, second = program.blocks[:2]
  x_q = program.run(first, jnp.asarray(x), qm.qstate)     # the reconstructed prefix
  ys = program.run(second, program.run(first, jnp.asarray(x), float_state), float_state)
  fns = _BlockFns(program, second, 32)
  np.testing.assert_allclose(fns.error(base.qstate, x_q, ys)[1],
                             reports[1]['rel_error_before'], rtol=1e-4)
  np.testing.assert_allclose(fns.error(qm.qstate, x_q, ys)[1],
                             reports[1]['rel_error_after'], rtol=1e-4)


@pytest.fixture(scope='module')
def residual_block(residual):
  """The program, its residual block, that block's float inputs and outputs, and its
  compiled passes (shared by the tests, so compiled once)."""
  _, _, x, base = residual
  program = _program(base, x)
  float_state = {p: LayerQuant(lq.kernel, lq.bias) for p, lq in base.qstate.items()}
  block = program.blocks[1]
  xs = program.run(program.blocks[0], jnp.asarray(x), float_state)
  return program, block, xs, program.run(block, xs, float_state), _BlockFns(program, block, 100)


def test_the_guard_keeps_a_block_no_worse_than_it_started(residual, residual_block):
  """An absurd weight rate wrecks the block by the last step: the guard keeps its best
  checked state; without it the wrecked last state is returned."""
  base = residual[3]
  program, block, xs, ys, fns = residual_block
  absurd = ptq_jax.AdaQuantConfig(iterations=12, batch_size=16, lr_kernel=10.0,
                                  lr_w_quant=10.0, lr_schedule='constant', unit='block')
  key = jax.random.key(0)
  _, report = optimize_block(program, block, base.qstate, ['b', 'c'], xs, ys, absurd, key, fns)
  assert report['rel_error_last_step'] > 2 * report['rel_error_before']   # it did drift
  assert report['guard_acted'] and report['rel_error_after'] <= report['rel_error_before']
  _, paper = optimize_block(program, block, base.qstate, ['b', 'c'], xs, ys,
                            dataclasses.replace(absurd, guard=False), key, fns)
  assert not paper['guard_acted'] and paper['rel_error_after'] > 2 * paper['rel_error_before']


def test_learned_rounding_and_qdrop_in_blocks(residual, residual_block):
  """Learned rounding ends with every kernel of the block on its grid (quantizing it
  again changes nothing) and a lower block error; QDrop changes the fit and also lowers
  it, with free updates or learned rounding. Catches a soft kernel quantized twice
  during training, a state left soft, or QDrop ignored under learned rounding."""
  base = residual[3]
  program, block, xs, ys, fns = residual_block
  config = ptq_jax.AdaQuantConfig(iterations=100, batch_size=32, unit='block')
  key = jax.random.key(0)
  learned, report = optimize_block(program, block, base.qstate, ['b', 'c'], xs, ys,
                                   dataclasses.replace(config, rounding='learned'), key, fns)
  for path in ('b', 'c'):
    np.testing.assert_allclose(quantized_weight(learned[path]), learned[path].kernel,
                               atol=1e-6)
  assert report['rel_error_after'] < report['rel_error_before']
  free, _ = optimize_block(program, block, base.qstate, ['b', 'c'], xs, ys, config, key, fns)
  dropped, dropped_report = optimize_block(program, block, base.qstate, ['b', 'c'], xs, ys,
                                           dataclasses.replace(config, drop_prob=0.5), key, fns)
  assert not np.array_equal(free['b'].kernel, dropped['b'].kernel)
  assert dropped_report['rel_error_after'] < dropped_report['rel_error_before']
  # QDrop with learned rounding (QDrop's own setting): a different fit (the input
  # quantizers train on the masked inputs; at A8 the rounding choices barely move),
  # kernels still on the grid.
  both, _ = optimize_block(program, block, base.qstate, ['b', 'c'], xs, ys,
                           dataclasses.replace(config, rounding='learned', drop_prob=0.5),
                           key, fns)
  assert any(not np.array_equal(both[p].a_quant.range, learned[p].a_quant.range)
             for p in ('b', 'c'))
  np.testing.assert_allclose(quantized_weight(both['b']), both['b'].kernel, atol=1e-6)


def test_float_targets_leave_quantized_attention_matmuls_out():
  """With attention matmuls quantized before reconstruction, the blocks' float targets
  and parallel inputs come from the float program: the last block's starting error is
  its quantized layer on the float model's features against the float model's logits.
  Catches targets computed with the quantized matmuls."""
  from test_attention import Block as AttentionBlock, data
  from ptq_jax.stages.adaquant.block import run_blocks
  model, x = AttentionBlock(), data()
  variables = model.init(jax.random.key(0), x[:1])
  on = ptq_jax.quantize(model, variables, x, w_bits=8, a_bits=4, first_last_bits=None,
                        quantize_matmuls=True, progress=False)
  config = ptq_jax.AdaQuantConfig(iterations=3, batch_size=16, unit='block')
  prepared = ptq_jax.stages.prepare(model, variables, x, quantize_matmuls=True, progress=False)
  _, reports = run_blocks(prepared, on.qstate, 'parallel', config, jax.random.key(0))
  float_state = {p: LayerQuant(lq.kernel, lq.bias) for p, lq in layer_states(on.qstate).items()}
  program = BlockProgram(model, variables, float_state, on.folded_bns, x[:4])
  value = jnp.asarray(x)
  for block in program.blocks[:-1]:
    value = program.run(block, value, float_state)
  logits = model.apply(variables, x)
  np.testing.assert_allclose(program.run(program.blocks[-1], value, float_state), logits,
                             rtol=1e-5, atol=1e-5)
  fns = _BlockFns(program, program.blocks[-1], 32)
  np.testing.assert_allclose(reports[-1]['rel_error_before'],
                             fns.error(on.qstate, value, logits)[1], rtol=1e-4)
  assert all(r['rel_error_after'] <= r['rel_error_before'] for r in reports)
