"""Kernels that are views of another parameter: a tied head.

Public language-model code applies its output layer with another module's parameter,
``self.decoder.apply({'params': {'kernel': self.embed.embedding.T}}, h)``. The layer's
kernel is then not one of the model's leaves but a transpose (or reshape) of one. A
:class:`ParamView` records which parameter and which element-preserving steps make the
kernel, so the kernel can be computed from the variables and a quantized kernel written
back into the parameter it came from (the embedding lookup then reads the same quantized
table: one kernel, one weight quantizer). :func:`find_views` reads the views from the
traced program; a kernel computed any other way (scaled, summed, sliced) is not a view.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Mapping, Tuple, Union

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np

# Primitives that only move or relabel elements (same count, same values).
_RESHAPES = ('reshape', 'squeeze', 'expand_dims', 'broadcast_in_dim')
_NO_OPS = ('copy', 'copy_p')


@dataclasses.dataclass(frozen=True)
class ParamView:
  """``kernel = ops(params[param])``. Each op is ``(kind, before, after)``: ``kind``
  'transpose', 'reshape' or 'astype', ``after`` its argument going to the view (a
  permutation, shape or dtype) and ``before`` the one coming back."""

  param: Tuple[str, ...]          # the parameter's path in variables['params']
  shape: Tuple[int, ...]          # the view's (the passed kernel's) shape
  ops: Tuple[Tuple[Any, ...], ...] = ()

  @property
  def name(self) -> str:
    return '/'.join(self.param)

  def of(self, params: Mapping[str, Any]) -> jnp.ndarray:
    """The view computed from the ``params`` collection."""
    value = jnp.asarray(_get(params, self.param))
    for kind, _, after in self.ops:
      value = _step(value, kind, after)
    return value

  def back(self, value: jnp.ndarray) -> jnp.ndarray:
    """The parameter whose view is ``value`` (the ops undone in reverse)."""
    for kind, before, _ in reversed(self.ops):
      value = _step(value, kind, before)
    return value

  def write(self, params: Mapping[str, Any], value: jnp.ndarray) -> Dict[str, Any]:
    """A copy of ``params`` whose viewed parameter is replaced by ``back(value)``
    (``value``: the view's elements, in any shape of that size)."""
    return _set(params, self.param, self.back(jnp.reshape(value, self.shape)))


def _step(value: jnp.ndarray, kind: str, arg: Any) -> jnp.ndarray:
  if kind == 'transpose':
    return jnp.transpose(value, arg)
  return jnp.reshape(value, arg) if kind == 'reshape' else value.astype(arg)


def _get(tree: Mapping[str, Any], path: Tuple[str, ...]) -> Any:
  for part in path:
    tree = tree[part]
  return tree


def _set(tree: Mapping[str, Any], path: Tuple[str, ...], value: Any) -> Dict[str, Any]:
  out = dict(tree)
  out[path[0]] = value if len(path) == 1 else _set(tree[path[0]], path[1:], value)
  return out


def find_views(fn: Callable[[Any], Dict[str, Any]], variables: Mapping[str, Any]
               ) -> Dict[str, Union[ParamView, str]]:
  """For each array ``fn(variables)`` returns (a flat dict), the :class:`ParamView` that
  makes it from one parameter, or why it is not one (a phrase: 'is ...')."""
  closed, shapes = jax.make_jaxpr(fn, return_shape=True)(variables)
  leaves = jax.tree_util.tree_flatten_with_path(variables)[0]
  sources = {v: tuple(str(getattr(k, 'key', k)) for k in path)
             for v, (path, _) in zip(closed.jaxpr.invars, leaves)}
  producer = {v: eqn for eqn in closed.jaxpr.eqns for v in eqn.outvars}
  names = sorted(shapes)   # (a flat dict flattens in key order)
  return {name: _view(var, sources, producer, tuple(var.aval.shape))
          for name, var in zip(names, closed.jaxpr.outvars)}


def _view(var: Any, sources: Dict[Any, Tuple[str, ...]], producer: Dict[Any, Any],
          shape: Tuple[int, ...]) -> Union[ParamView, str]:
  ops = []
  while not isinstance(var, jex.Literal) and var not in sources:
    eqn = producer.get(var)
    if eqn is None:
      return 'is a constant, not one of the model\'s parameters'
    name = eqn.primitive.name
    inputs = [v for v in eqn.invars if not isinstance(v, jex.Literal)]
    src, dst = eqn.invars[0].aval, eqn.outvars[0].aval
    if len(inputs) != 1:
      return f'is computed from several arrays ({name})'
    if name == 'transpose':
      perm = tuple(eqn.params['permutation'])
      ops.append(('transpose', tuple(int(i) for i in np.argsort(perm)), perm))
    elif name in _RESHAPES and int(np.prod(src.shape)) == int(np.prod(dst.shape)):
      ops.append(('reshape', tuple(src.shape), tuple(dst.shape)))
    elif name == 'convert_element_type' and jnp.issubdtype(dst.dtype, jnp.floating):
      ops.append(('astype', np.dtype(src.dtype).name, np.dtype(dst.dtype).name))
    elif name not in _NO_OPS:
      return f'is computed from a parameter by {name}, not only transposed or reshaped'
    var = eqn.invars[0]
  if isinstance(var, jex.Literal):
    return 'is a constant, not one of the model\'s parameters'
  path = sources[var]
  if path[0] != 'params':
    return f'is the {path[0]!r} collection\'s {"/".join(path[1:])}, not a parameter'
  return ParamView(path[1:], shape, tuple(reversed(ops)))
