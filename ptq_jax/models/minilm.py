"""A BERT sentence encoder (MiniLM-L6: 6 layers, hidden 384, 12 heads) in Flax linen.

Token, position and segment embeddings with LayerNorm; post-LN transformer
layers (self-attention, erf-GELU feed-forward); mean pooling over the real
tokens, then L2 normalisation — the sentence-transformers ``all-MiniLM-L6-v2``
recipe. Every projection is an ``nn.Dense`` (query, key, value, attention
output, intermediate, output), so the quantization machinery sees them as it
sees a CNN's layers.

The model takes *one* array, so that calibration, capture and evaluation treat
it like an image model: ``tokens`` of shape (N, 2, T) holding the token ids
(row 0) and the attention mask (row 1), as floats or ints (ids are exact in
float32). :func:`ptq_jax.importers.minilm.tokenize` builds it. The output, a
unit vector per sentence, is what the KL-based stages compare: for such small
logits KL(softmax(a) || softmax(b)) is about Var(a - b) / 2, i.e. a scaled
mean squared error of the embedding.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class BertConfig:
  vocab_size: int = 30522
  hidden: int = 384
  layers: int = 6
  heads: int = 12
  intermediate: int = 1536
  max_positions: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12


class BertLayer(nn.Module):
  """Post-LN transformer layer: x + attention -> LN -> x + FFN -> LN."""

  config: BertConfig

  @nn.compact
  def __call__(self, x, mask):
    c = self.config
    head_dim = c.hidden // c.heads
    def split(y):
      return y.reshape(y.shape[:-1] + (c.heads, head_dim))
    q = split(nn.Dense(c.hidden, name='query')(x))
    k = split(nn.Dense(c.hidden, name='key')(x))
    v = split(nn.Dense(c.hidden, name='value')(x))
    scores = jnp.einsum('bqhd,bkhd->bhqk', q, k) / jnp.sqrt(jnp.float32(head_dim))
    scores = jnp.where(mask[:, None, None, :] > 0, scores, jnp.finfo(jnp.float32).min)
    attention = jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(scores, axis=-1), v)
    attention = attention.reshape(x.shape[:-1] + (c.hidden,))
    x = nn.LayerNorm(c.layer_norm_eps, name='attention_norm')(
        x + nn.Dense(c.hidden, name='attention_output')(attention))
    h = jax.nn.gelu(nn.Dense(c.intermediate, name='intermediate')(x), approximate=False)
    return nn.LayerNorm(c.layer_norm_eps, name='output_norm')(
        x + nn.Dense(c.hidden, name='output')(h))


class SentenceEncoder(nn.Module):
  """BERT encoder + masked mean pooling + L2 normalisation, on packed (N, 2, T) tokens."""

  config: BertConfig = BertConfig()

  @nn.compact
  def __call__(self, tokens, train: bool = False):
    c = self.config
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 3 or tokens.shape[1] != 2:
      raise ValueError(f'Expected packed tokens (N, 2, T) [ids; mask], got {tokens.shape}.')
    ids = jnp.round(tokens[:, 0]).astype(jnp.int32)
    mask = (tokens[:, 1] > 0.5).astype(jnp.float32)
    positions = jnp.arange(ids.shape[1])[None]
    x = (nn.Embed(c.vocab_size, c.hidden, name='word_embeddings')(ids)
         + nn.Embed(c.max_positions, c.hidden, name='position_embeddings')(positions)
         + nn.Embed(c.type_vocab_size, c.hidden, name='token_type_embeddings')(
             jnp.zeros_like(ids)))
    x = nn.LayerNorm(c.layer_norm_eps, name='embeddings_norm')(x)
    for i in range(c.layers):
      x = BertLayer(c, name=f'layer_{i}')(x, mask)
    pooled = jnp.sum(x * mask[..., None], axis=1) / jnp.maximum(
        jnp.sum(mask, axis=1, keepdims=True), 1e-9)
    return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


def minilm_l6() -> SentenceEncoder:
  """all-MiniLM-L6-v2's architecture (22.7 M parameters, 11 M of them embeddings)."""
  return SentenceEncoder(BertConfig())
