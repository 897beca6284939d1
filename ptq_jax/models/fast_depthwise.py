"""Depthwise convolutions as sums of shifted products, for fast CPU training.

XLA's CPU backend lowers grouped convolutions to a slow generic loop; nine shifted
multiply-adds are far faster (results/adaquant_speed.md, the `dwconv` rows). The
model code stays a standard ``nn.Conv(feature_group_count=C)``; this module swaps
its computation through ``nn.intercept_methods`` only where it is enabled, and
the result equals the convolution up to float rounding.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import flax.linen as nn
import jax.numpy as jnp

from ptq_jax.linear import depthwise_conv2d, geometry_of, is_plain_depthwise


def _interceptor(next_fun, args, kwargs, context):
  module = context.module
  if not (isinstance(module, nn.Conv) and context.method_name == '__call__'
          and module.has_variable('params', 'kernel') and len(args) == 1 and not kwargs):
    return next_fun(*args, **kwargs)
  (x,) = args
  kernel = module.get_variable('params', 'kernel')
  geom = geometry_of(module, x.shape, kernel.shape)
  if geom is None or not is_plain_depthwise(geom, x.shape, kernel.shape):
    return next_fun(*args, **kwargs)
  dtype = module.dtype or x.dtype
  y = depthwise_conv2d(jnp.asarray(x, dtype), jnp.asarray(kernel, dtype), geom.strides,
                       geom.padding)
  if module.use_bias:
    y = y + module.get_variable('params', 'bias')
  return y


@contextlib.contextmanager
def fast_depthwise() -> Iterator[None]:
  """Within this context every depthwise ``nn.Conv`` runs as shifted products."""
  with nn.intercept_methods(_interceptor):
    yield
