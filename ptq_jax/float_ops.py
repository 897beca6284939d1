"""Linear operations on parameters that the layer table does not cover.

The library quantizes the ``nn.Conv`` / ``nn.Dense`` calls it traces. Any other
contraction of a parameter with the data (``nn.DenseGeneral``, ``nn.Einsum``,
``nn.ConvTranspose``, a custom layer calling ``jnp.dot`` on its own parameter, a module
called more than once) would stay in float32: the library finds each one in the
traced program and refuses it with its module path and the reason, unless the caller
opts in with ``unsupported='keep_float'`` (then it stays float, with a warning, and is
counted at 32 bits in every size figure).

Found from the jaxpr: every ``dot_general`` / ``conv_general_dilated`` one of whose
operands depends on the model's ``params`` but not on its input. Operations inside the
module of a quantized layer are that layer's own.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Dict, Iterable, List, Sequence

import flax.linen as nn
from flax import nnx
import jax.extend.core as jex
import numpy as np

LINEAR_PRIMITIVES = ('dot_general', 'conv_general_dilated')
UNSUPPORTED_POLICIES = ('error', 'keep_float')


class UnsupportedLayerError(ValueError):
  """The model computes with parameters in a way the library cannot quantize."""


@dataclasses.dataclass(frozen=True)
class FloatOp:
  """A parameter-carrying linear operation that is not quantized."""
  path: str          # module path ('' at the top level)
  module: str        # module class name ('' if unknown)
  primitive: str     # 'dot_general' / 'conv_general_dilated', or 'module call'
  params: int        # elements of the parameter operand
  reason: str


def relative_stack(stack: str, root: str) -> str:
  """A jaxpr name stack relative to the model: its leading ``root`` scopes dropped (a
  subclass whose ``__call__`` calls ``super().__call__`` opens the root scope twice)."""
  parts = [p for p in stack.split('/') if p]   # (a nested program's prefix may be '/')
  while parts and parts[0] == root:
    parts = parts[1:]
  return '/'.join(parts)


def _linear_eqns(closed: Any, param_mask: Sequence[bool], data_mask: Sequence[bool],
                 root: str):
  """Yields ``(eqn, stack, (param, data) flags of its operands)`` for every
  ``dot_general`` / ``conv_general_dilated`` of ``closed``, recursing into sub-jaxprs.
  An operand is 'param' if it depends on a flagged parameter, 'data' if on the data."""
  def walk(jaxpr, params: List[bool], data: List[bool], prefix: str):
    flags: Dict[Any, tuple] = {v: (p, d) for v, p, d in zip(jaxpr.invars, params, data)}

    def flag(v):
      return (False, False) if isinstance(v, jex.Literal) else flags.get(v, (False, False))

    for eqn in jaxpr.eqns:
      ins = [flag(v) for v in eqn.invars]
      stack = relative_stack(prefix + str(eqn.source_info.name_stack), root)
      if eqn.primitive.name in LINEAR_PRIMITIVES and len(ins) >= 2:
        yield eqn, stack, ins
      for sub in sub_jaxprs(eqn):
        if len(sub.invars) == len(ins):
          yield from walk(sub, [p for p, _ in ins], [d for _, d in ins], stack + '/')
        else:   # unknown calling convention: assume every input may be anything
          yield from walk(sub, [any(p for p, _ in ins)] * len(sub.invars),
                          [any(d for _, d in ins)] * len(sub.invars), stack + '/')
      out = (any(p for p, _ in ins), any(d for _, d in ins))
      for v in eqn.outvars:
        flags[v] = out

  yield from walk(closed.jaxpr, list(param_mask), list(data_mask), '')


# Nested programs that are plain calls: a layer inside one is traced like any other.
TRANSPARENT = ('jit', 'pjit', 'closed_call', 'core_call', 'custom_jvp_call', 'custom_vjp_call',
               'custom_vjp_call_jaxpr')


def nested_layers(closed: Any, root: str, paths: Iterable[str]) -> Dict[str, str]:
  """The layers (of ``paths``) whose computation runs inside a nested program that is not
  a plain call (a loop body such as ``nn.scan``'s, a rematerialised ``nn.remat``
  function): path -> that program's primitive. Their inputs cannot be captured from
  outside it, so they are not quantized."""
  paths, found = list(paths), {}

  def walk(jaxpr, prefix: str, inside: str):
    for eqn in jaxpr.eqns:
      stack = relative_stack(prefix + str(eqn.source_info.name_stack), root)
      if inside and eqn.primitive.name in LINEAR_PRIMITIVES:
        for path in paths:
          if stack == path or stack.startswith(path + '/'):
            found.setdefault(path, inside)
      name = eqn.primitive.name
      for sub in sub_jaxprs(eqn):
        walk(sub, stack + '/', inside or ('' if name in TRANSPARENT else name))

  walk(closed.jaxpr, '', '')
  return found


def _module_of(stack: str, modules: Dict[str, str]) -> str:
  """The deepest known module whose path prefixes the (relative) name stack."""
  parts = stack.split('/') if stack else []
  for k in range(len(parts), 0, -1):
    if '/'.join(parts[:k]) in modules:
      return '/'.join(parts[:k])
  return ''


def inside(stack: str, covered: Sequence[str]) -> bool:
  """Whether ``stack`` is one of the ``covered`` module paths or below one."""
  return any(stack == c or stack.startswith(c + '/') for c in covered)


def find_float_ops(closed: Any, param_mask: Sequence[bool], data_mask: Sequence[bool],
                   root: str, covered: Iterable[str], modules: Dict[str, str]) -> List[FloatOp]:
  """The parameter x data contractions of ``closed`` outside the ``covered`` module paths.

  ``param_mask`` / ``data_mask`` flag the jaxpr's inputs that are parameters / data.
  """
  covered, found = list(covered), []
  for eqn, stack, ins in _linear_eqns(closed, param_mask, data_mask, root):
    (p0, d0), (p1, d1) = ins[0], ins[1]
    weight = 1 if (p1 and not d1 and d0) else 0 if (p0 and not d0 and d1) else None
    if weight is not None and not inside(stack, covered):
      path = _module_of(stack, modules)
      found.append(FloatOp(path, modules.get(path, ''), eqn.primitive.name,
                           int(np.prod(eqn.invars[weight].aval.shape)),
                           _reason(modules.get(path, ''))))
  return found


def _reason(module: str) -> str:
  if module and module != 'Module' and (hasattr(nn, module) or hasattr(nnx, module)):
    return (f'{module} is not quantized by ptq_jax in this form: Conv, Dense/Linear, '
            'ConvTranspose (no mask, transpose_kernel or CIRCULAR padding), DenseGeneral/'
            'LinearGeneral over trailing axes without batch dims, and Einsum with the batch '
            'axis first and the kernel\'s output axes trailing in kernel and output, are')
  return (f'a parameter contracted in the code of {module or "the model"} itself (e.g. '
          'jnp.dot on self.param), not in an nn.Conv / nn.Dense')


def sub_jaxprs(eqn) -> List[Any]:
  """The jaxprs ``eqn`` calls (its parameters' jaxprs, closed or open)."""
  subs = []
  for value in eqn.params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(item, jex.ClosedJaxpr):
        subs.append(item.jaxpr)
      elif isinstance(item, jex.Jaxpr):
        subs.append(item)
  return subs


def check_unsupported(ops: Sequence[FloatOp], unsupported: str) -> None:
  """Raises :class:`UnsupportedLayerError` listing ``ops`` (or warns, with
  ``unsupported='keep_float'``)."""
  if unsupported not in UNSUPPORTED_POLICIES:
    raise ValueError(f'unsupported must be one of {UNSUPPORTED_POLICIES}, got {unsupported!r}.')
  if not ops:
    return
  listed = '; '.join(f'{op.path or "<top level>"} ({op.primitive}, {op.params} parameters): '
                     f'{op.reason}' for op in ops[:8])
  more = f' and {len(ops) - 8} more' if len(ops) > 8 else ''
  if unsupported == 'error':
    raise UnsupportedLayerError(
        f'{len(ops)} operation(s) of this model would stay in float32: {listed}{more}. '
        "Pass unsupported='keep_float' to keep them in float (counted at 32 bits in the "
        'size), or express them with nn.Conv / nn.Dense.')
  warnings.warn(f'Kept in float32 (unsupported=\'keep_float\'): {listed}{more}.', UserWarning,
                stacklevel=3)
