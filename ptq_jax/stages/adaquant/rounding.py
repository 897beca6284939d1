"""Learned rounding (AdaRound's idea) as AdaQuant's alternative to free weight updates.

Each weight is rounded down or up to its quantization grid; a variable ``V`` per
weight chooses which. During training the choice is soft,

    h(V) = clip(sigmoid(V) * (ZETA - GAMMA) + GAMMA, 0, 1)   (a stretched sigmoid)
    W~   = s * (clip(floor(W / s) + h(V) + zp, 0, 2^b - 1) - zp)

and the loss (the mean squared reconstruction error) adds
``reg * mean(1 - |2 h(V) - 1|^beta)``, which pushes every ``h`` to 0 or 1 as ``beta`` anneals from BETA_START to BETA_END (after a warm-up without it). The
result is hard: ``h >= 0.5`` rounds up. Returned as an ordinary layer state whose kernel
lies on the grid, so quantizing it again gives exactly the chosen codes; the weight
quantizer's range and the bias stay as calibrated, the input quantizer is trained with
``lr_a_quant``. Zero-point and step come from the weight quantizer's state.
"""

from __future__ import annotations

from typing import Any, Dict

import jax
import jax.numpy as jnp
import optax

from ptq_jax.linear import LayerGeometry, apply_linear
from ptq_jax.quant.interceptor import LayerQuant, quantized_input, smoothed_kernel
from ptq_jax.quant.quantizer import reshape_for, scale_and_zero_point
from ptq_jax.stages.adaquant.steps import run_loop
from ptq_jax.trace import activation_fn
from ptq_jax.xla_options import PerLayerJit

ZETA, GAMMA = 1.1, -0.1
BETA_START, BETA_END, WARMUP = 20.0, 2.0, 0.2


def _grid(lq: LayerQuant):
  """Step ``s``, zero point ``zp`` (per output channel, broadcast to the kernel) and
  the largest code."""
  q = reshape_for(lq.w_quant, lq.kernel.ndim)
  s, zp = scale_and_zero_point(q)
  zp = jax.lax.stop_gradient(zp)
  if q.symmetric:
    qmax = 2**(q.bits - 1) - 1
    return s, zp - qmax, qmax, -qmax   # codes in [-qmax, qmax]: offset so lo = -qmax
  return s, zp, q.levels, 0


def soft_choice(v: jnp.ndarray) -> jnp.ndarray:
  """h(V): the rectified, stretched sigmoid (0 = round down, 1 = round up)."""
  return jnp.clip(jax.nn.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def initial_v(lq: LayerQuant) -> jnp.ndarray:
  """V with h(V) equal to each weight's fractional position in its grid cell (so the
  soft kernel starts at the float kernel, up to clipping)."""
  s, _, _, _ = _grid(lq)
  kernel = smoothed_kernel(lq)
  rest = kernel / s - jnp.floor(kernel / s)
  rest = jnp.clip(rest, 0.01, 0.99)
  return -jnp.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0)


def rounded_kernel(lq: LayerQuant, v: jnp.ndarray, hard: bool) -> jnp.ndarray:
  """The kernel rounded by V: soft (training) or hard (``h >= 0.5`` rounds up)."""
  s, zp, top, bottom = _grid(lq)
  kernel = smoothed_kernel(lq)   # (the weights the quantizer sees)
  h = (soft_choice(v) >= 0.5).astype(jnp.float32) if hard else soft_choice(v)
  if bottom < 0:   # symmetric: codes -qmax..qmax, no zero point
    return s * jnp.clip(jnp.floor(kernel / s) + h, bottom, top)
  return s * (jnp.clip(jnp.floor(kernel / s) + h + zp, 0, top) - zp)


def regulariser(v: jnp.ndarray, beta: jnp.ndarray) -> jnp.ndarray:
  """sum(1 - |2 h(V) - 1|^beta): 0 only when every choice is hard."""
  return jnp.sum(1.0 - jnp.abs(2.0 * soft_choice(v) - 1.0)**beta)


def beta_at(step: jnp.ndarray, total: jnp.ndarray) -> jnp.ndarray:
  """The annealed exponent, and whether the regulariser is on (after the warm-up)."""
  progress = jnp.clip((step / jnp.maximum(total, 1.0) - WARMUP) / (1.0 - WARMUP), 0.0, 1.0)
  return BETA_END + (BETA_START - BETA_END) * (1.0 - progress), step >= WARMUP * total


def start(lq: LayerQuant) -> Dict[str, Any]:
  """What the optimiser trains: ``{'v': V, 'a_quant': the input quantizer or None}``."""
  return {'v': initial_v(lq), 'a_quant': lq.a_quant}


def finish(lq: LayerQuant, params: Dict[str, Any]) -> LayerQuant:
  """The layer state with the hard-rounded kernel (on the grid) and trained input
  quantizer."""
  kernel = rounded_kernel(lq, params['v'], hard=True)
  if lq.smooth is not None:   # stored unsmoothed, as every layer state
    kernel = kernel / lq.smooth[:, None]
  return lq.replace(kernel=kernel, a_quant=params['a_quant'])


def _optimizer(rates: jnp.ndarray, lr_rounding: jnp.ndarray, params) -> optax.GradientTransformation:
  labels = {'v': 'v', 'a_quant': None if params['a_quant'] is None else
            params['a_quant'].replace(range='a_quant', low='a_quant')}
  return optax.multi_transform({'v': optax.adam(lr_rounding), 'a_quant': optax.adam(rates[3])},
                               labels)


@jax.jit
def init_optimizer(rates, lr_rounding, params):
  return _optimizer(rates, lr_rounding, params).init(params)


def _steps(geom: LayerGeometry, activation: str, steps: int, batch: int, lq: LayerQuant,
              params, opt_state, xs, ys, key, step0, rates, lr_rounding, reg,
              micro_batch: int = 0, drop_prob: float = 0.0):
  """``steps`` Adam steps of learned rounding on one layer (minibatches drawn as in
  AdaQuant's steps, from ``key`` and the step number; ``micro_batch``: see
  :func:`~.steps.value_and_grad`; the regulariser is the same in every micro-batch,
  so their mean holds it once). ``drop_prob``: QDrop's masks, drawn as in AdaQuant's
  steps."""
  tx = _optimizer(rates, lr_rounding, params)

  def loss_fn(params, x, y, step, part):
    w = rounded_kernel(lq, params['v'], hard=False)
    used = lq.replace(a_quant=params['a_quant'])
    x_used = quantized_input(used, x)
    if drop_prob > 0.0:
      x_used = jnp.where(drop_mask(key, step, part, drop_prob, x.shape),
                         x if lq.smooth is None else x / lq.smooth, x_used)
    out = activation_fn(activation)(apply_linear(geom, x_used, w) + lq.bias)
    beta, on = beta_at(step.astype(jnp.float32), rates[4])
    return jnp.mean((out - y)**2) + jnp.where(on, reg * regulariser(params['v'], beta) /
                                             params['v'].size, 0.0)

  return run_loop(loss_fn, tx, params, opt_state, xs, ys, key, step0, steps, batch,
                  micro_batch)


# (Per layer, the default or the memory-optimised schedule: ptq_jax.xla_options.)
run_steps = PerLayerJit(_steps, static_argnums=(0, 1, 2, 3),
                        static_argnames=('micro_batch', 'drop_prob'))


def drop_key(key: jax.Array, step, part) -> jax.Array:
  """The key of QDrop's masks for a step, and for a micro-batch (``part``, None
  without)."""
  step_key = jax.random.fold_in(jax.random.fold_in(key, step), 1)
  return step_key if part is None else jax.random.fold_in(step_key, part)


def drop_mask(key: jax.Array, step, part, drop_prob: float, shape) -> jnp.ndarray:
  """QDrop's mask (True: the element skips input quantization) for a step and
  micro-batch."""
  return jax.random.bernoulli(drop_key(key, step, part), drop_prob, shape)


def hard_fraction(lq: LayerQuant, params: Dict[str, Any]) -> float:
  """The share of rounding variables already at 0 or 1 (soft h outside (0, 1))."""
  h = soft_choice(params['v'])
  return float(jnp.mean((h == 0.0) | (h == 1.0)))

