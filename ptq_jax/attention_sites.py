"""Where attention's activation matmuls live in a Flax model: the attention sites.

An attention site is a ``nn.MultiHeadDotProductAttention`` (Linen) whose attention
function is Flax's default dot-product attention, or an ``nnx.MultiHeadAttention``
whose default function the NNX bridge calls through :class:`AttentionCore`, a
parameter-free Linen module named by the NNX path. The tracer, the NNX bridge and the
interceptor all recognise sites through this module, which imports nothing of the
library (so none of them reaches up into ``ptq_jax.quant`` for it).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable

import flax.linen as nn
from flax import nnx


DEFAULT_FUNCTIONS = (nn.dot_product_attention, nnx.dot_product_attention)


def is_linen_site(module: nn.Module) -> bool:
  """A Linen attention module whose matmuls this library can quantize."""
  return (isinstance(module, nn.MultiHeadDotProductAttention)
          and module.attention_fn in DEFAULT_FUNCTIONS
          and getattr(module, 'qk_attn_weights_einsum_cls', None) is None
          and getattr(module, 'attn_weights_value_einsum_cls', None) is None)


@contextlib.contextmanager
def attention_fn_swapped(module: nn.Module, make: Callable[[Callable], Callable]):
  """Within the block, the Linen attention ``module`` calls ``make(original)`` as its
  attention function (with the original's signature: Linen passes only the keyword
  arguments the function declares)."""
  original = module.attention_fn
  replacement = functools.wraps(original)(make(original))
  object.__setattr__(module, 'attention_fn', replacement)
  try:
    yield
  finally:
    object.__setattr__(module, 'attention_fn', original)


class AttentionCore(nn.Module):
  """An NNX module's default attention function, called as a parameter-free Linen
  module (named by the NNX path) so that the library's interceptor sees it."""

  function: Callable = nnx.dot_product_attention

  def __call__(self, query, key, value, *args, **kwargs):
    return self.function(query, key, value, *args, **kwargs)
