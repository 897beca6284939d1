"""A small Vision Transformer in Flax NNX for 28x28 images (Fashion-MNIST).

4x4 patches (a strided ``nnx.Conv``: 49 tokens) plus a class token and learned position
embeddings, ``depth`` pre-norm blocks of ``nnx.MultiHeadAttention`` and a GELU MLP, and a
linear head on the class token. The registry's ``vit_fmnist`` is its Linen view
(``ptq_jax.nnx_bridge``), so training, checkpoints and quantization treat it like the
Linen models; ``ptq_jax.nnx_bridge.to_nnx`` gives the NNX module back.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from ptq_jax.nnx_bridge import NNXModel, from_nnx


class Block(nnx.Module):
  """Pre-norm self-attention and MLP, each with a residual."""

  def __init__(self, dim: int, heads: int, mlp_dim: int, rngs: nnx.Rngs):
    self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(heads, dim, decode=False, rngs=rngs)
    self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
    self.mlp_in = nnx.Linear(dim, mlp_dim, rngs=rngs)
    self.mlp_out = nnx.Linear(mlp_dim, dim, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp_out(nnx.gelu(self.mlp_in(self.norm2(x))))


class ViT(nnx.Module):
  """ViT for (N, 28, 28, 1) inputs."""

  def __init__(self, num_classes: int = 10, dim: int = 96, depth: int = 4, heads: int = 4,
               mlp_dim: int = 192, patch: int = 4, rngs: nnx.Rngs = None):
    rngs = rngs or nnx.Rngs(0)
    tokens = (28 // patch)**2
    self.patches = nnx.Conv(1, dim, (patch, patch), strides=(patch, patch), padding='VALID',
                            rngs=rngs)
    self.cls = nnx.Param(jnp.zeros((1, 1, dim)))
    self.pos = nnx.Param(0.02 * nnx.initializers.normal()(rngs.params(), (1, tokens + 1, dim)))
    self.blocks = nnx.List([Block(dim, heads, mlp_dim, rngs) for _ in range(depth)])
    self.norm = nnx.LayerNorm(dim, rngs=rngs)
    self.head = nnx.Linear(dim, num_classes, rngs=rngs)

  def __call__(self, x):
    x = self.patches(x)
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    cls = jnp.broadcast_to(self.cls[...], (x.shape[0], 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1) + self.pos[...]
    for block in self.blocks:
      x = block(x)
    return self.head(self.norm(x)[:, 0])


def vit_fmnist(num_classes: int = 10, seed: int = 0, **kwargs) -> NNXModel:
  """The registry's ViT: the Linen view of a freshly initialised :class:`ViT`."""
  return from_nnx(ViT(num_classes, rngs=nnx.Rngs(seed), **kwargs))[0]


def init_vit_fmnist(key, num_classes: int = 10, **kwargs):
  """The variables of a freshly initialised ViT (seeded by ``key``) in its Linen view."""
  return from_nnx(ViT(num_classes, rngs=nnx.Rngs(params=key), **kwargs))[1]
