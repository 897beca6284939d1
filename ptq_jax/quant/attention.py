"""The activation-by-activation matmuls inside attention, quantized on request.

An attention site is a ``nn.MultiHeadDotProductAttention`` (Linen) or an
``nnx.MultiHeadAttention`` (NNX, through :mod:`ptq_jax.nnx_bridge`) whose attention
function is Flax's default dot-product attention. With ``quantize_matmuls=True`` its two
matmuls take fake-quantized operands, each with one per-tensor asymmetric quantizer:
``softmax(Q(q) Q(k)^T / sqrt(d)) -> Q(p)``, then ``Q(p) Q(v)``. Softmax, masks and
biases stay in float. A site not in the quantization state runs Flax's own function
untouched, so the float model is exact.

How the site is reached without editing the model: :mod:`ptq_jax.attention_sites`.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
from flax import struct

from ptq_jax.quant.quantizer import QuantizerState, fake_quant

OPERANDS = ('q', 'k', 'probs', 'v')   # Q·Kᵀ takes q and k, attention·V takes probs and v
OperandHook = Callable[[str, jnp.ndarray], None]


@struct.dataclass
class AttentionQuant:
  """The four per-tensor operand quantizers of one attention site (a pytree)."""

  q: QuantizerState
  k: QuantizerState
  probs: QuantizerState
  v: QuantizerState

  @property
  def bits(self) -> int:
    return self.q.bits


def quantized_attention(query, key, value, bias=None, mask=None, *,
                        quant: Optional[AttentionQuant] = None,
                        on_operand: Optional[OperandHook] = None, dtype=None, precision=None,
                        is_causal: bool = False, quantizer=fake_quant,
                        **unused) -> jnp.ndarray:
  """Dot-product attention (inference: no dropout) computed explicitly, each matmul
  operand fake-quantized by ``quant`` (None: float) after ``on_operand(name, x)`` sees
  it; ``quantizer(x, state)`` is how (the ONNX writer marks it). Shapes as Flax's:
  ``[batch..., length, heads, depth]``."""
  del unused   # dropout settings (inference), module (sowing), einsum overrides
  check_heads(query, key)

  def operand(name, x):
    if on_operand is not None:
      on_operand(name, x)
    return x if quant is None else quantizer(x, getattr(quant, name))

  query, key = operand('q', query), operand('k', key)
  dtype = dtype or jnp.result_type(query.dtype, key.dtype)
  query = query / jnp.sqrt(query.shape[-1]).astype(dtype)
  weights = jnp.einsum(SCORES, query, key, precision=precision)
  weights = attention_probs(weights, bias, mask, is_causal, dtype)
  weights, value = operand('probs', weights), operand('v', value)
  return jnp.einsum(MIX, weights, value, precision=precision)


SCORES = '...qhd,...khd->...hqk'   # Q·Kᵀ
MIX = '...hqk,...khd->...qhd'      # attention·V


def check_heads(query: jnp.ndarray, key: jnp.ndarray) -> None:
  if query.shape[-2] != key.shape[-2]:
    raise ValueError(f'quantize_matmuls does not support grouped-query attention ({query.shape[-2]}'
                     f' query heads, {key.shape[-2]} key heads).')


def attention_probs(weights: jnp.ndarray, bias, mask, is_causal: bool, dtype) -> jnp.ndarray:
  """Softmax of the scores after the bias and the mask (Flax's semantics: False masks
  out), in float."""
  if bias is not None:
    weights = weights + bias
  if is_causal:
    causal = jnp.tril(jnp.ones(weights.shape[-2:], bool))
    mask = causal if mask is None else jnp.logical_and(mask, causal)
  if mask is not None:
    weights = jnp.where(mask, weights, jnp.finfo(dtype).min)
  return jax.nn.softmax(weights).astype(dtype)
