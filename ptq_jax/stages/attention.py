"""The attention-matmul stage (``quantize_matmuls=True``): per-tensor quantizers for the
operands of Q·Kᵀ and attention·V at every attention site
(:mod:`ptq_jax.quant.attention`), calibrated and then optimised like a layer input.

It runs after the layers are quantized (ranges, AdaQuant or mixed precision), so the
operands it sees are those the quantized network produces. Calibration: the range
method of the :class:`~ptq_jax.stages.ranges.RangeConfig`, per tensor and asymmetric,
averaged over calibration batches. Optimisation (with an :class:`AdaQuantConfig`): the
four ranges and low ends of a site are fitted by Adam (``lr_a_quant``, its schedule,
iterations and minibatch) to the site's float attention output on the same operands,
with the guard keeping the best state measured on all calibration images.
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ptq_jax.quant.attention import OPERANDS, AttentionQuant, quantized_attention
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
    apply_quantized(model, variables, state, folded, x, on_operand=on_operand)
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
  for site in prepared.attention:
    out[site.path] = AttentionQuant(*(ranges[(site.path, name)] for name in OPERANDS))
  return out


def _capture(prepared: Prepared, qstate: QState, batch_size: int
             ) -> Dict[Tuple[str, str], np.ndarray]:
  """Every site's q, k, v operands over all calibration images (host memory)."""
  run = _operand_pass(prepared, qstate, lambda v: v)
  parts: Dict[Tuple[str, str], List[np.ndarray]] = {}
  for start in range(0, len(prepared.images), batch_size):
    found = run(jnp.asarray(prepared.images[start:start + batch_size]))
    for key, value in found.items():
      if key[1] != 'probs':
        parts.setdefault(key, []).append(np.asarray(value, np.float32))
  return {k: np.concatenate(v) for k, v in parts.items()}


def _error_sum(quant, q, k, v, batch: int) -> Tuple[float, float]:
  """Sum of squared output errors and of squared float outputs, in batches."""
  err, ref = 0.0, 0.0
  for s in range(0, len(q), batch):
    e, r = _batch_error(quant, q[s:s + batch], k[s:s + batch], v[s:s + batch])
    err, ref = err + float(e), ref + float(r)
  return err, ref


@jax.jit
def _batch_error(quant, q, k, v):
  target = quantized_attention(q, k, v)
  out = quantized_attention(q, k, v, quant=quant)
  return jnp.sum((out - target)**2), jnp.sum(target**2)


def _fit(quant: AttentionQuant, q, k, v, config: AdaQuantConfig, key: jax.Array
         ) -> Tuple[AttentionQuant, Dict[str, Any]]:
  """Adam on the four quantizers' ranges and low ends; the best checked state kept."""
  steps, batch, n = config.iterations, min(config.batch_size, len(q)), len(q)
  rate = config.lr_a_quant
  schedule = (optax.cosine_decay_schedule(rate, max(steps, 1))
              if config.lr_schedule == 'cosine' else rate)
  tx = optax.adam(schedule)

  @jax.jit
  def step(state, opt_state, i):
    idx = jax.random.choice(jax.random.fold_in(key, i), n, (batch,), replace=False)
    qb, kb, vb = q[idx], k[idx], v[idx]
    target = quantized_attention(qb, kb, vb)

    def loss(s):
      return jnp.mean((quantized_attention(qb, kb, vb, quant=s) - target)**2)
    value, grads = jax.value_and_grad(loss)(state)
    updates, opt_state = tx.update(grads, opt_state, state)
    state = optax.apply_updates(state, updates)
    # Ranges stay positive and low ends in [-range, 0] (what the quantizer uses).
    state = jax.tree.map(lambda s: s.replace(range=jnp.maximum(s.range, 1e-8),
                                             low=jnp.clip(s.low, -s.range, 0.0)), state,
                         is_leaf=lambda s: isinstance(s, QuantizerState))
    return state, opt_state, value

  q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
  eval_batch = max(batch, 256)
  err, ref = _error_sum(quant, q, k, v, eval_batch)
  start_error = err / max(ref, 1e-30)
  best, best_error, best_iter = quant, start_error, 0
  checks = config.check_steps()
  state, opt_state, done = quant, tx.init(quant), 0
  for check in checks:
    for i in range(done, check):
      state, opt_state, _ = step(state, opt_state, i)
    done = check
    err, _ = _error_sum(state, q, k, v, eval_batch)
    error = err / max(ref, 1e-30)
    if not config.guard or error < best_error:
      best, best_error, best_iter = state, error, check
  return best, {'rel_error_before': start_error, 'rel_error_after': best_error,
                'kept_iteration': best_iter, 'guard_acted': config.guard and best_iter != steps}


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
  operands = _capture(prepared, qstate, capture_batch)
  out, reports = dict(qstate), []
  for index, site in enumerate(sites):
    start = time.time()
    row = {'path': site.path, 'kind': 'attention matmuls', 'a_bits': qstate[site.path].bits}
    if site.masked:
      reports.append(dict(row, optimised=False))
      continue
    q, k, v = (operands[(site.path, name)] for name in ('q', 'k', 'v'))
    out[site.path], fit = _fit(qstate[site.path], q, k, v, config,
                               jax.random.fold_in(key, 100_000 + index))
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
