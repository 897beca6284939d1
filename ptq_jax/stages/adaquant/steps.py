"""The optimiser loop shared by AdaQuant's programs (free weights and learned rounding):
each step's minibatch, drawn from the key and the step number, then one update."""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


def split_examples(tree: Any, holdout: Optional[Tuple[np.ndarray, np.ndarray]]
                   ) -> Tuple[Any, Any]:
  """(train, check) parts of ``tree`` (arrays with the examples first; None leaves
  stay None) by the index pair ``holdout``; without one, the whole tree twice (the
  guard then measures on the examples it trains on)."""
  if holdout is None:
    return tree, tree
  train, check = holdout
  return tuple(jax.tree.map(lambda a: a[index], tree) for index in (train, check))


def minibatch_indices(key: jax.Array, step0, steps: int, n: int, batch: int) -> jnp.ndarray:
  """(steps, batch) indices, row ``i`` from ``fold_in(key, step0 + i)``: every step's
  minibatch drawn up front in one batched op (the same indices as drawing them step by
  step), so the loop body holds no small sort kernels."""
  def minibatch(i):
    return jax.random.choice(jax.random.fold_in(key, step0 + i), n, (batch,), replace=False)
  return minibatch(0)[None] if steps == 1 else jax.vmap(minibatch)(jnp.arange(steps))


def value_and_grad(loss_fn: Callable[..., jnp.ndarray], batch: int, micro_batch: int = 0
                   ) -> Callable[..., Any]:
  """``(params, x, y, step) -> (loss, grads)`` of ``loss_fn(params, x, y, step, part)``.

  With ``micro_batch`` (dividing ``batch``, smaller than it) the minibatch is split
  into micro-batches of that many examples, run one after another in a ``lax.scan``,
  and the loss and gradient are their means: for a loss that is a mean over the
  examples (plus terms that do not depend on them) this is the minibatch's gradient up
  to float rounding, computed on slices small enough to stay in cache. ``part`` is the
  micro-batch's index (None without micro-batches), for random draws of its own.
  """
  plain = jax.value_and_grad(loss_fn)
  if not micro_batch or micro_batch >= batch:
    return lambda params, x, y, step: plain(params, x, y, step, None)
  if batch % micro_batch:
    raise ValueError(f'micro_batch {micro_batch} does not divide the minibatch {batch}.')
  parts = batch // micro_batch

  def split(a):
    return a.reshape((parts, micro_batch) + a.shape[1:])

  def fn(params, x, y, step):
    def body(total, part):
      xi, yi, k = part
      return jax.tree.map(jnp.add, total, plain(params, xi, yi, step, k)), None
    zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    total, _ = jax.lax.scan(body, zero, (jax.tree.map(split, x), split(y),
                                         jnp.arange(parts, dtype=jnp.int32)))
    return jax.tree.map(lambda t: t / parts, total)
  return fn


def run_loop(loss_fn: Callable[..., jnp.ndarray], tx: optax.GradientTransformation, params: Any,
             opt_state: Any, xs, ys, key: jax.Array, step0, steps: int, batch: int,
             micro_batch: int = 0):
  """``steps`` updates of ``params`` with ``loss_fn(params, x, y, step, part)`` on each
  step's minibatch (in micro-batches with ``micro_batch``, :func:`value_and_grad`);
  returns (params, opt_state, the last step's loss). ``xs`` may be a tuple of arrays
  (examples on the leading axis of each)."""
  indices = minibatch_indices(key, step0, steps, jax.tree.leaves(xs)[0].shape[0], batch)
  grad_fn = value_and_grad(loss_fn, batch, micro_batch)

  def body(i, carry):
    params, opt_state, _ = carry
    idx = indices[i]
    x = jax.tree.map(lambda a: a[idx], xs)
    loss, grads = grad_fn(params, x, ys[idx], step0 + i)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  carry = (params, opt_state, jnp.zeros((), jnp.float32))
  return body(0, carry) if steps == 1 else jax.lax.fori_loop(0, steps, body, carry)
