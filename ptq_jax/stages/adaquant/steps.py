"""The optimiser loop shared by AdaQuant's programs (free weights and learned rounding):
each step's minibatch, drawn from the key and the step number, then one update."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax


def minibatch_indices(key: jax.Array, step0, steps: int, n: int, batch: int) -> jnp.ndarray:
  """(steps, batch) indices, row ``i`` from ``fold_in(key, step0 + i)``: every step's
  minibatch drawn up front in one batched op (the same indices as drawing them step by
  step), so the loop body holds no small sort kernels."""
  def minibatch(i):
    return jax.random.choice(jax.random.fold_in(key, step0 + i), n, (batch,), replace=False)
  return minibatch(0)[None] if steps == 1 else jax.vmap(minibatch)(jnp.arange(steps))


def run_loop(loss_fn: Callable[..., jnp.ndarray], tx: optax.GradientTransformation, params: Any,
             opt_state: Any, xs, ys, key: jax.Array, step0, steps: int, batch: int):
  """``steps`` updates of ``params`` with ``loss_fn(params, x, y, step)`` on each step's
  minibatch; returns (params, opt_state, the last step's loss). ``xs`` may be a tuple of
  arrays (examples on the leading axis of each)."""
  indices = minibatch_indices(key, step0, steps, jax.tree.leaves(xs)[0].shape[0], batch)

  def body(i, carry):
    params, opt_state, _ = carry
    idx = indices[i]
    x = jax.tree.map(lambda a: a[idx], xs)
    loss, grads = jax.value_and_grad(loss_fn)(params, x, ys[idx], step0 + i)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  carry = (params, opt_state, jnp.zeros((), jnp.float32))
  return body(0, carry) if steps == 1 else jax.lax.fori_loop(0, steps, body, carry)
