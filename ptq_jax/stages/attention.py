"""The attention-matmul stage (``quantize_matmuls=True``): per-tensor quantizers for the
operands of Q·Kᵀ and attention·V at every attention site
(:mod:`ptq_jax.quant.attention`) and of every other activation x activation matmul (the
matmul sites, :mod:`ptq_jax.matmul_sites`), calibrated and then optimised like a layer
input.

It runs after the layers are quantized (ranges, AdaQuant or mixed precision), so the
operands it sees are those the quantized network produces. Calibration: the range
method of the :class:`~ptq_jax.stages.ranges.RangeConfig`, per tensor and asymmetric,
averaged over calibration batches. Optimisation (with an :class:`AdaQuantConfig`): the
ranges and low ends of a site (four for attention, two for a matmul site) are fitted by
Adam (``lr_a_quant``, its schedule, iterations and minibatch) to the site's float output
on the same operands, with the guard keeping the best state measured on all calibration
images. A matmul site whose operands do not have the examples on their first axis (a
product over the examples) keeps its calibrated ranges.
"""

from __future__ import annotations

import functools
import time
import warnings
from typing import Any, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ptq_jax.matmul_sites import MatmulSite
from ptq_jax.quant.attention import OPERANDS, AttentionQuant, quantized_attention
from ptq_jax.quant.matmuls import MatmulQuant, quantized_matmul
from ptq_jax.quant.interceptor import QState, apply_quantized, layer_states
from ptq_jax.quant.quantizer import QuantizerState, check_bits, init_range
from ptq_jax.stages.adaquant.config import AdaQuantConfig
from ptq_jax.stages.prepare import Prepared, Stage
from ptq_jax.stages.ranges import RangeConfig


def _operand_pass(prepared: Prepared, qstate: QState, fn):
  """A jitted pass over a batch that returns ``fn(path, name, operand)`` for the first
  call of every site's operands, the network computing with ``qstate``."""
  model, variables, folded = prepared.model, prepared.variables, prepared.folded_bns

  @jax.jit
  def run(state, x):
    found: Dict[Tuple[str, str], Any] = {}

    def on_operand(path, name, value):
      found.setdefault((path, name), fn(value))
    apply_quantized(model, variables, state, folded, x, on_operand=on_operand,
                    matmul_operands=bool(prepared.matmul_sites))
    return found
  return lambda x: run(qstate, x)


def calibrate_attention(prepared: Prepared, qstate: QState, bits: int,
                        config: RangeConfig = RangeConfig()) -> QState:
  """``qstate`` plus an :class:`AttentionQuant` at ``bits`` for every attention site,
  from the operands the network computing with ``qstate``'s layers produces."""
  bits = check_bits(bits, 'matmul a_bits')
  state = layer_states(qstate)
  run = _operand_pass(prepared, state, lambda v: init_range(
      v, bits, config.method, None, False, config.percentile))
  totals, count = None, 0
  for start in range(0, len(prepared.images), config.batch_size):
    batch = jnp.asarray(prepared.images[start:start + config.batch_size])
    weighted = jax.tree.map(lambda a: a * len(batch), run(batch))
    totals = weighted if totals is None else jax.tree.map(jnp.add, totals, weighted)
    count += len(batch)
  ranges = jax.tree.map(lambda a: a / count, totals)
  out = dict(qstate)
  missing = [s.name for s in prepared.matmul_sites if (s.name, 'lhs') not in ranges]
  if missing:
    raise ValueError(f'Matmul sites {missing} did not run on the calibration images; was the '
                     'model prepared with another input shape?')
  for site in prepared.attention:
    out[site.path] = AttentionQuant(*(ranges[(site.path, name)] for name in OPERANDS))
  for site in prepared.matmul_sites:
    out[site.name] = MatmulQuant(ranges[(site.name, 'lhs')], ranges[(site.name, 'rhs')])
  return out


def _capture(prepared: Prepared, qstate: QState, batch_size: int
             ) -> Dict[Tuple[str, str], np.ndarray]:
  """Every site's operands but attention's probabilities, over all calibration images
  (host memory)."""
  run = _operand_pass(prepared, qstate, lambda v: v)
  parts: Dict[Tuple[str, str], List[np.ndarray]] = {}
  for start in range(0, len(prepared.images), batch_size):
    found = run(jnp.asarray(prepared.images[start:start + batch_size]))
    for key, value in found.items():
      if key[1] != 'probs':
        parts.setdefault(key, []).append(np.asarray(value, np.float32))
  return {k: np.concatenate(v) for k, v in parts.items()}


def _attention(quant, q, k, v):
  return quantized_attention(q, k, v, quant=quant)


def _dot(dims):
  return lambda a, b: jax.lax.dot_general(a, b, dims)


def _site_matmul(dims):
  """The matmul site's computation on its operands: float with no state, else quantized."""
  dot = _dot(dims)
  return lambda quant, a, b: dot(a, b) if quant is None else quantized_matmul(quant, a, b, dot)


def _error_sum(compute, quant, operands, batch: int) -> Tuple[float, float]:
  """Sum of squared output errors and of squared float outputs, in batches."""
  err, ref = 0.0, 0.0
  for s in range(0, len(operands[0]), batch):
    e, r = _batch_error(compute, quant, tuple(o[s:s + batch] for o in operands))
    err, ref = err + float(e), ref + float(r)
  return err, ref


@functools.partial(jax.jit, static_argnums=0)
def _batch_error(compute, quant, operands):
  target = compute(None, *operands)
  out = compute(quant, *operands)
  return jnp.sum((out - target)**2), jnp.sum(target**2)


def _fit(compute, quant: Any, operands: Tuple[np.ndarray, ...], config: AdaQuantConfig,
         key: jax.Array) -> Tuple[Any, Dict[str, Any]]:
  """Adam on the site's quantizers' ranges and low ends; the best checked state kept.
  ``compute(state or None, *operands)``: the site's output (None: float); examples on
  the operands' first axis."""
  steps, n = config.iterations, len(operands[0])
  batch = min(config.batch_size, n)
  rate = config.lr_a_quant
  schedule = (optax.cosine_decay_schedule(rate, max(steps, 1))
              if config.lr_schedule == 'cosine' else rate)
  tx = optax.adam(schedule)

  @jax.jit
  def step(state, opt_state, i):
    idx = jax.random.choice(jax.random.fold_in(key, i), n, (batch,), replace=False)
    chosen = tuple(o[idx] for o in operands)
    target = compute(None, *chosen)

    def loss(s):
      return jnp.mean((compute(s, *chosen) - target)**2)
    value, grads = jax.value_and_grad(loss)(state)
    updates, opt_state = tx.update(grads, opt_state, state)
    state = optax.apply_updates(state, updates)
    # Ranges stay positive and low ends in [-range, 0] (what the quantizer uses).
    state = jax.tree.map(lambda s: s.replace(range=jnp.maximum(s.range, 1e-8),
                                             low=jnp.clip(s.low, -s.range, 0.0)), state,
                         is_leaf=lambda s: isinstance(s, QuantizerState))
    return state, opt_state, value

  operands = tuple(jnp.asarray(o) for o in operands)
  eval_batch = max(batch, 256)
  err, ref = _error_sum(compute, quant, operands, eval_batch)
  start_error = err / max(ref, 1e-30)
  best, best_error, best_iter = quant, start_error, 0
  checks = config.check_steps()
  state, opt_state, done = quant, tx.init(quant), 0
  for check in checks:
    for i in range(done, check):
      state, opt_state, _ = step(state, opt_state, i)
    done = check
    err, _ = _error_sum(compute, state, operands, eval_batch)
    error = err / max(ref, 1e-30)
    if not config.guard or error < best_error:
      best, best_error, best_iter = state, error, check
  return best, {'rel_error_before': start_error, 'rel_error_after': best_error,
                'kept_iteration': best_iter, 'guard_acted': config.guard and best_iter != steps}


def examples_first(site: MatmulSite) -> bool:
  """Whether both operands of a matmul site hold the examples on their first axis (a
  batch axis of the product), so that they can be captured and sampled by example."""
  (_, _), (lhs_batch, rhs_batch) = site.dimension_numbers
  return bool(lhs_batch) and lhs_batch[0] == 0 and rhs_batch[0] == 0


def optimize_attention(prepared: Prepared, qstate: QState, config: AdaQuantConfig,
                       key: jax.Array, capture_batch: int = 100
                       ) -> Tuple[QState, List[Dict[str, Any]]]:
  """Fits the operand quantizers of every attention site of ``qstate`` (see the module
  docstring); returns the new state and one report row per site."""
  sites = [s for s in prepared.attention if isinstance(qstate.get(s.path), AttentionQuant)]
  masked = [s.path for s in sites if s.masked]
  if masked:
    warnings.warn(f'Attention sites {masked} are called with a mask, bias or is_causal: their '
                  'matmul quantizers keep their calibrated ranges (quantized, not optimised).',
                  UserWarning, stacklevel=2)
  matmuls = [s for s in prepared.matmul_sites if isinstance(qstate.get(s.name), MatmulQuant)]
  operands = _capture(prepared, qstate, capture_batch)
  out, reports = dict(qstate), []
  for index, site in enumerate(sites):
    start = time.time()
    row = {'path': site.path, 'kind': 'attention matmuls', 'a_bits': qstate[site.path].bits}
    if site.masked:
      reports.append(dict(row, optimised=False))
      continue
    qkv = tuple(operands[(site.path, name)] for name in ('q', 'k', 'v'))
    out[site.path], fit = _fit(_attention, qstate[site.path], qkv, config,
                               jax.random.fold_in(key, 100_000 + index))
    reports.append(dict(row, optimised=True, **fit, seconds=time.time() - start))
  for index, site in enumerate(matmuls):
    start = time.time()
    row = {'path': site.name, 'kind': 'matmul', 'a_bits': qstate[site.name].bits}
    if not examples_first(site):
      reports.append(dict(row, optimised=False))
      continue
    pair = (operands[(site.name, 'lhs')], operands[(site.name, 'rhs')])
    out[site.name], fit = _fit(_site_matmul(site.dimension_numbers), qstate[site.name], pair,
                               config, jax.random.fold_in(key, 200_000 + index))
    reports.append(dict(row, optimised=True, **fit, seconds=time.time() - start))
  return out, reports


def attention_stage(a_bits: int, config: RangeConfig = RangeConfig(),
                    adaquant: Optional[AdaQuantConfig] = None,
                    name: str = 'attention_matmuls') -> Stage:
  """The stage: calibrate every attention site's operand quantizers at ``a_bits`` (from
  the layers of the state it is given) and, with ``adaquant``, optimise them."""
  def apply(prepared: Prepared, qstate: QState, key: jax.Array):
    state = calibrate_attention(prepared, qstate, a_bits, config)
    if adaquant is None:
      return state, None
    return optimize_attention(prepared, state, adaquant, key)
  return Stage(name, apply)
