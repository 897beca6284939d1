"""Training-time augmentation of raw images: random crop after zero padding, h-flip."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def augment(images: jnp.ndarray, key: jax.Array, pad: int, flip: bool) -> jnp.ndarray:
  """Random crop after ``pad`` pixels of zero padding (in raw-pixel space) and h-flip."""
  n, h, w, _ = images.shape
  key_crop, key_flip = jax.random.split(key)
  if pad:
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offsets = jax.random.randint(key_crop, (n, 2), 0, 2 * pad + 1)
    images = jax.vmap(lambda im, o: jax.lax.dynamic_slice(
        im, (o[0], o[1], 0), (h, w, im.shape[-1])))(padded, offsets)
  if flip:
    do_flip = jax.random.bernoulli(key_flip, 0.5, (n, 1, 1, 1))
    images = jnp.where(do_flip, images[:, :, ::-1, :], images)
  return images
