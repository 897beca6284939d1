"""What every AdaQuant unit (a layer, a shared layer, a block) optimises: the layer's
quantized output and its float target, the error sums, and the optimiser (Adam per
parameter group, with the weight quantizer's updates optionally relative to its range).
Shared by :mod:`.layer`, :mod:`.shared` and :mod:`.block`.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import optax

from ptq_jax.linear import LayerGeometry, apply_linear
from ptq_jax.quant.interceptor import LayerQuant, quantized_input, quantized_weight
from ptq_jax.stages.adaquant.config import AdaQuantConfig
from ptq_jax.trace import activation_fn

ERROR_BATCH = 250   # rows per error-sum program


def param_labels(lq: LayerQuant) -> LayerQuant:
  """The optimizer group of every leaf of ``lq`` (for ``optax.multi_transform``)."""
  def group(q, name):
    return None if q is None else q.replace(range=name, low=name)
  return LayerQuant('kernel', 'bias', group(lq.w_quant, 'w_quant'), group(lq.a_quant, 'a_quant'),
                    None if lq.smooth is None else 'frozen',
                    tuple(group(q, 'a_quant') for q in lq.site_a_quants), lq.view)


def make_optimizer(rates: jnp.ndarray, labels: LayerQuant, schedule: str
               ) -> optax.GradientTransformation:
  """Adam per parameter group; ``rates`` is :meth:`AdaQuantConfig.rates`."""
  def rate(i):
    if schedule == 'constant':
      return rates[i]
    return lambda count: rates[i] * 0.5 * (1 + jnp.cos(jnp.pi * jnp.minimum(count / rates[4], 1)))
  return optax.multi_transform(
      {'kernel': optax.adam(rate(0)), 'bias': optax.adam(rate(1)),
       'w_quant': optax.adam(rate(2)), 'a_quant': optax.adam(rate(3)),
       'frozen': optax.set_to_zero()}, labels)


def layer_output(geom: LayerGeometry, activation: str, lq: LayerQuant,
                 x: jnp.ndarray) -> jnp.ndarray:
  """``f(Q(W) Q(x) + b)`` for one layer."""
  y = apply_linear(geom, quantized_input(lq, x), quantized_weight(lq)) + lq.bias
  return activation_fn(activation)(y)


def float_target(geom: LayerGeometry, activation: str, lq: LayerQuant,
                 x: jnp.ndarray) -> jnp.ndarray:
  """``f(W x + b)`` with the float folded weights (the reconstruction target)."""
  return activation_fn(activation)(apply_linear(geom, x, lq.kernel) + lq.bias)


def scaled_ranges(lq: LayerQuant, w_scale: Optional[jnp.ndarray], power: int) -> LayerQuant:
  """``lq`` with its weight quantizer's range and low end divided (``power=-1``) or
  multiplied (``power=1``) by ``w_scale``; unchanged if ``w_scale`` is None."""
  if w_scale is None or lq.w_quant is None:
    return lq
  factor = w_scale if power > 0 else 1.0 / w_scale
  return lq.replace(w_quant=lq.w_quant.replace(range=lq.w_quant.range * factor,
                                               low=lq.w_quant.low * factor))


def weight_range_scale(config: AdaQuantConfig, lq: LayerQuant) -> Optional[jnp.ndarray]:
  """The per-channel unit of the weight quantizer's updates: None (absolute, the
  paper's) or its starting range (``weight_range_updates='relative'``)."""
  if config.weight_range_updates != 'relative' or lq.w_quant is None:
    return None
  return jnp.maximum(lq.w_quant.range, 1e-8)


@functools.partial(jax.jit, static_argnums=(0, 1))
def error_sums(geom: LayerGeometry, activation: str, lq: LayerQuant, x, y):
  err = layer_output(geom, activation, lq, x) - y
  return jnp.sum(err**2), jnp.sum(y**2)
