"""Block-wise reconstruction: AdaQuant with a block of layers as its unit.

For each block of the traced program (:mod:`ptq_jax.quant.blocks`: a residual or
inverted-residual block, a transformer half-layer, or a lone layer with its
activation), minimise

    mean || B(X_fp; float layers) - B(X; quantized layers) ||^2

jointly over the states of every quantized layer in the block, where ``B`` is the
block's own program (skip path, add and activations included), ``X_fp`` its input in
the float model and ``X`` its input in the float model (parallel mode) or in the
already-reconstructed quantized prefix (sequential mode). Each layer's state moves
as in layer-wise AdaQuant: free weight updates (Adam per parameter group, the same
rates and schedule) or learned rounding, with QDrop and the guard (the best of the
checked states by the block's error over all calibration inputs) as configured.
Unlike layer-wise reconstruction a layer can trade its own error for a smaller error
at the block's output, e.g. against the error of the layer after it.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from ptq_jax.quant.attention import AttentionQuant
from ptq_jax.quant.matmuls import MatmulQuant
from ptq_jax.quant.blocks import Block, BlockProgram
from ptq_jax.quant.interceptor import (LayerQuant, layer_forward, layer_states, quantized_input,
                                      quantized_weight)
from ptq_jax.stages.adaquant import rounding
from ptq_jax.stages.adaquant.config import AdaQuantConfig, AdaQuantRuntime
from ptq_jax.stages.adaquant.objective import (make_optimizer, param_labels, scaled_ranges,
                                              weight_range_scale)
from ptq_jax.stages.adaquant.progress import Progress
from ptq_jax.stages.adaquant.report import UnitReport, guard_outcome
from ptq_jax.stages.adaquant.steps import run_loop, split_examples
from ptq_jax.stages.prepare import Prepared
from ptq_jax.xla_options import block_options

log = logging.getLogger(__name__)


def run_blocks(prepared: Prepared, qstate: Mapping[str, Any], mode: str,
               config: AdaQuantConfig, key: jax.Array,
               runtime: AdaQuantRuntime = AdaQuantRuntime()
               ) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
  """Block-wise reconstruction of every block holding a quantized layer; returns the new
  state and one report per optimised block. Runs on the default device (every process
  of a multi-host run does the same work)."""
  layers, images = prepared.layers, prepared.images
  float_state = {p: LayerQuant(lq.kernel, lq.bias, site_a_quants=tuple(
      None for _ in lq.site_a_quants)) for p, lq in layer_states(qstate).items()}
  batch = runtime.capture_batch_size   # (the first trace at the passes' batch size)
  program, float_program = _programs(prepared, qstate, float_state, batch)
  quantized = {l.path for l in layers
               if qstate[l.path].w_quant is not None or qstate[l.path].a_quant is not None}
  by_path = {l.path: l for l in layers}
  new_state = dict(qstate)
  reports = []
  holdout = config.holdout_split(len(images), key)
  n_train = len(images) if holdout is None else len(holdout[0])
  inputs = jnp.asarray(images, jnp.float32)   # (blocks that read the model input)
  x_fp = x_q = inputs
  todo = [b for b in program.blocks if quantized & set(b.paths)]
  progress = Progress.open(runtime.resume_dir, prepared, qstate, mode, config, key)
  bar = tqdm(total=len(todo), desc=f'Block reconstruction ({mode})',
             disable=not prepared.progress, leave=False)
  try:
    for block in program.blocks:
      last = block.index == len(program.blocks) - 1
      model_input = inputs if block.needs_input else None
      y_fp = _BlockFns(float_program, block, batch).outputs(float_state, (x_fp, model_input))
      fns = _BlockFns(program, block, batch)
      trained = [p for p in block.paths if p in quantized]
      if trained:
        x = (x_fp if mode == 'parallel' else x_q, model_input)
        micro = runtime.micro_batch_for(min(config.batch_size, n_train),
                                        [by_path[p] for p in block.paths])
        states, report = _resumed(progress, f'block {block.index}', mode, lambda: optimize_block(
            program, block, new_state, trained, x, y_fp, config,
            jax.random.fold_in(key, block.index), fns, runtime, micro, holdout))
        new_state.update(states)
        reports.append(report)
        bar.set_postfix_str(f'{block.label[:40]}: rel err {report.rel_error_before:.3g} '
                            f'-> {report.rel_error_after:.3g}')
        bar.update()
      if not last:
        if mode == 'sequential':
          x_q = fns.outputs(new_state, (x_q, model_input))
        x_fp = y_fp
  finally:
    bar.close()
  guarded = [r.path for r in reports if r.guard_acted]
  if guarded:
    log.info('Block reconstruction guard: %d block(s) kept an earlier state, their error having '
             'risen by the last step.', len(guarded))
  return new_state, reports


def _resumed(progress: Optional[Progress], unit: str, mode: str, fit
             ) -> Tuple[Dict[str, Any], UnitReport]:
  """``unit``'s states and report from an earlier, killed run, else ``fit()``'s (saved)."""
  if progress is not None and unit in progress:
    return progress.restored(unit)
  states, report = fit()
  report.mode = mode
  if progress is not None:
    progress.record(unit, states, report)
  return states, report


def _programs(prepared: Prepared, qstate: Mapping[str, Any], float_state: Mapping[str, Any],
              batch: int) -> Tuple[BlockProgram, BlockProgram]:
  """The quantized program cut into blocks, and the float one the targets come from
  (the same unless attention matmuls are quantized: they are part of the program it
  was traced with, so the float targets come from a program traced without them)."""
  model, variables, folded_bns = prepared.model, prepared.variables, prepared.folded_bns
  example = np.asarray(prepared.images[:batch], np.float32)
  program = BlockProgram(model, variables, qstate, folded_bns, example)
  if not any(isinstance(v, (AttentionQuant, MatmulQuant)) for v in qstate.values()):
    return program, program
  float_program = BlockProgram(model, variables, float_state, folded_bns, example)
  if ([(b.paths, b.needs_input) for b in float_program.blocks] !=
      [(b.paths, b.needs_input) for b in program.blocks]):
    raise ValueError('The float and quantized programs cut into different blocks; use '
                     'layer-wise reconstruction (AdaQuantConfig(unit="layer")).')
  return program, float_program


class _BlockFns:
  """A block's compiled passes over a whole set: its output, and its error sums against
  targets (batches of ``batch`` rows, the last padded to the same shape). Inputs are
  pairs ``(x, model_input)``, as :meth:`BlockProgram.run` takes them (``model_input``
  None unless the block reads it)."""

  def __init__(self, program: BlockProgram, block: Block, batch: int):
    self.paths, self.batch = block.paths, batch
    self._out = jax.jit(lambda states, xs: program.run(block, xs[0], states, model_input=xs[1]))

    def sums(states, xs, y, n):
      keep = (jnp.arange(y.shape[0]) < n).reshape((-1,) + (1,) * (y.ndim - 1))
      err = program.run(block, xs[0], states, model_input=xs[1]) - y
      return jnp.sum(jnp.where(keep, err**2, 0.0)), jnp.sum(jnp.where(keep, y**2, 0.0))
    self._sums = jax.jit(sums)

  def outputs(self, states: Mapping[str, LayerQuant], xs) -> jnp.ndarray:
    states = {p: states[p] for p in self.paths}
    return jnp.concatenate([self._out(states, part)[:n]
                            for part, n in _padded(_pair(xs), self.batch)])

  def error(self, states: Mapping[str, LayerQuant], xs, ys: jnp.ndarray) -> Tuple[float, float]:
    """(MSE, MSE / mean(target^2)) of the block's output over the whole set."""
    states = {p: states[p] for p in self.paths}
    err = ref = 0.0
    for (x, n), (y, _) in zip(_padded(_pair(xs), self.batch), _padded(ys, self.batch)):
      e, r = self._sums(states, x, y, n)
      err, ref = err + float(e), ref + float(r)
    mse = err / ys.size
    return mse, mse / max(ref / ys.size, 1e-30)


def _pair(xs):
  """``(x, model_input)`` from a pair or a lone array."""
  return xs if isinstance(xs, tuple) else (xs, None)


def _padded(xs, batch: int):
  """``(part, n)`` over ``xs`` (an array or a tuple of arrays with the examples first)
  in pieces of ``batch`` rows, the last padded by repeating its first row (one compiled
  shape)."""
  total = jax.tree.leaves(xs)[0].shape[0]
  batch = min(batch, total)
  for start in range(0, total, batch):
    part = jax.tree.map(lambda a: a[start:start + batch], xs)
    n = min(batch, total - start)
    if n < batch:
      part = jax.tree.map(
          lambda a: jnp.concatenate([a, jnp.repeat(a[:1], batch - n, axis=0)]), part)
    yield part, n


def optimize_block(program: BlockProgram, block: Block, state: Mapping[str, Any],
                   trained: Sequence[str], xs: jnp.ndarray, ys: jnp.ndarray,
                   config: AdaQuantConfig, key: jax.Array, fns: Optional[_BlockFns] = None,
                   runtime: AdaQuantRuntime = AdaQuantRuntime(), micro_batch: int = 0,
                   holdout: Optional[Tuple[np.ndarray, np.ndarray]] = None
                   ) -> Tuple[Dict[str, LayerQuant], UnitReport]:
  """Reconstruction of one block on its inputs ``xs`` and float outputs ``ys``, jointly
  over the states of the ``trained`` layers (the block's other layers stay fixed).
  ``fns``: the block's compiled passes, if already built; ``micro_batch``: see
  :func:`~.steps.value_and_grad`; ``holdout``: (train, check) example indices
  (:meth:`AdaQuantConfig.holdout_split`), the guard measuring on the check ones."""
  fns = fns or _BlockFns(program, block, runtime.capture_batch_size)
  (xs, ys), (check_xs, check_ys) = split_examples((_pair(xs), ys), holdout)
  start_time = time.time()
  start = {p: state[p] for p in block.paths}
  objective = _BlockObjective(program, block, start, trained, config, key)
  params, tx = objective.initial_params(), objective.optimizer()
  opt_state = tx.init(params)
  batch = min(config.batch_size, xs[0].shape[0])

  @functools.partial(jax.jit, static_argnames='steps', compiler_options=block_options(
      [program.calls[i].module for i in block.calls]))
  def run_steps(params, opt_state, xs, ys, step0, steps):
    return run_loop(objective.loss, tx, params, opt_state, xs, ys, key, step0, steps, batch,
                    micro_batch)

  before, rel_before = fns.error(start, check_xs, check_ys)
  best, (after, rel_after), kept_at = start, (before, rel_before), -1
  last, rel_last, done = before, rel_before, 0
  for k, calls in enumerate(runtime.call_plan(config)):
    for steps in calls:
      params, opt_state, _ = run_steps(params, opt_state, xs, ys, np.int32(done), steps)
      done += steps
    candidate = objective.states_of(params, hard=True)
    last, rel_last = fns.error(candidate, check_xs, check_ys)
    if last <= after or not config.guard:   # the best state so far (ties: the later)
      best, (after, rel_after), kept_at = candidate, (last, rel_last), k
  bits = [start[p].w_quant.bits for p in trained if start[p].w_quant is not None]
  a_bits = [start[p].a_quant.bits for p in trained if start[p].a_quant is not None]
  report = UnitReport(block.label, None, min(bits) if bits else None,
                      min(a_bits) if a_bits else None, before, after, rel_before, rel_after,
                      rel_last, **guard_outcome(config.check_steps(), kept_at),
                      iterations=config.iterations, guard_examples=int(check_ys.shape[0]),
                      seconds=time.time() - start_time, unit='block',
                      rounding='learned' if objective.learned else 'free', block=block.index,
                      paths=list(block.paths), layers=len(trained))
  return {p: best[p] for p in trained}, report


class _BlockObjective:
  """What a block's reconstruction trains and minimises: the trained layers' states
  (free updates, their weight ranges optionally in units of their start) or their
  rounding variables (learned rounding), and the block output's squared error to the
  float target, plus the rounding regulariser; with QDrop, each layer call's input
  is left in float with probability ``drop_prob``, a new mask every step."""

  def __init__(self, program: BlockProgram, block: Block, start: Mapping[str, LayerQuant],
               trained: Sequence[str], config: AdaQuantConfig, key: jax.Array):
    self.program, self.block, self.start, self.trained = program, block, start, trained
    self.config, self.key = config, key
    self.learned = config.rounding == 'learned'
    self.fixed = {p: lq for p, lq in start.items() if p not in trained}
    self.w_scale = {p: weight_range_scale(config, start[p]) for p in trained}
    self.rates = config.rates()
    self.lr, self.reg = jnp.float32(config.lr_rounding), jnp.float32(config.rounding_reg)

  def initial_params(self) -> Dict[str, Any]:
    if self.learned:
      return {p: _rounding_params(self.start[p]) for p in self.trained}
    return {p: scaled_ranges(self.start[p], self.w_scale[p], -1) for p in self.trained}

  def optimizer(self) -> optax.GradientTransformation:
    return _block_optimizer(self.config, self.rates, self.lr, self.initial_params(),
                            self.learned)

  def states_of(self, params, hard: bool) -> Dict[str, LayerQuant]:
    if self.learned:
      return {**self.fixed, **{p: _rounded_state(self.start[p], params[p], hard)
                               for p in self.trained}}
    return {**self.fixed, **{p: scaled_ranges(params[p], self.w_scale[p], 1)
                             for p in self.trained}}

  def layer_calls(self, params, step, part):
    """The layer calls of a training step: soft-rounded kernels (learned rounding, used
    as they are, not quantized again) or the trained states; with QDrop, each call's
    input with its own mask, drawn anew every step (and micro-batch)."""
    learned, start, fixed, drop_prob = self.learned, self.start, self.fixed, self.config.drop_prob
    states = {} if learned else self.states_of(params, hard=False)
    step_key = rounding.drop_key(self.key, step, part)
    count = [0]

    def layer_fn(path, site, module, x):
      if learned and path in params:
        base, a = start[path], params[path]['a']
        lq = base.replace(a_quant=a[0], site_a_quants=tuple(a[1:])).for_site(site)
        kernel = (rounding.rounded_kernel(base, params[path]['v'], hard=False)
                  if base.w_quant is not None else quantized_weight(lq))
      else:
        lq = (fixed if learned else states)[path].for_site(site)
        kernel = quantized_weight(lq)
      x_used = quantized_input(lq, x)
      if drop_prob > 0:
        count[0] += 1
        drop = jax.random.bernoulli(jax.random.fold_in(step_key, count[0]), drop_prob, x.shape)
        x_used = jnp.where(drop, x if lq.smooth is None else x / lq.smooth, x_used)
      return layer_forward(module, x_used, kernel, lq.bias)
    return layer_fn

  def loss(self, params, x, y, step, part):
    if self.learned or self.config.drop_prob > 0:
      states, layer_fn = {}, self.layer_calls(params, step, part)
    else:
      states, layer_fn = self.states_of(params, hard=False), None
    out = self.program.run(self.block, x[0], states, layer_fn, model_input=x[1])
    loss = jnp.mean((out - y)**2)
    if self.learned:
      beta, on = rounding.beta_at(step.astype(jnp.float32), self.rates[4])
      penalty = sum(rounding.regulariser(params[p]['v'], beta) / params[p]['v'].size
                    for p in self.trained)
      loss = loss + jnp.where(on, self.reg * penalty, 0.0)
    return loss


def _rounding_params(lq: LayerQuant) -> Dict[str, Any]:
  """What learned rounding trains for one layer: its rounding variables (none if its
  weights are float) and its input quantizers (one per call site)."""
  return {'v': rounding.initial_v(lq) if lq.w_quant is not None else jnp.zeros((0,)),
          'a': (lq.a_quant,) + tuple(lq.site_a_quants)}


def _rounded_state(lq: LayerQuant, params: Dict[str, Any], hard: bool) -> LayerQuant:
  """The layer state with its kernel rounded by the rounding variables (soft, or hard:
  on the grid, so quantizing it again gives the chosen codes)."""
  a = params['a']
  lq = lq.replace(a_quant=a[0], site_a_quants=tuple(a[1:]))
  if lq.w_quant is None:
    return lq
  kernel = rounding.rounded_kernel(lq, params['v'], hard=hard)
  if lq.smooth is not None:   # stored unsmoothed, as every layer state
    kernel = kernel / lq.smooth[:, None]
  return lq.replace(kernel=kernel)


def _block_optimizer(config: AdaQuantConfig, rates, lr_rounding, params,
                     learned: bool) -> optax.GradientTransformation:
  if not learned:
    return make_optimizer(rates, {p: param_labels(lq) for p, lq in params.items()}, config.lr_schedule)
  labels = {p: {'v': 'v', 'a': tuple(None if q is None else q.replace(range='a', low='a')
                                     for q in pr['a'])} for p, pr in params.items()}
  return optax.multi_transform({'v': optax.adam(lr_rounding), 'a': optax.adam(rates[3])},
                               labels)
