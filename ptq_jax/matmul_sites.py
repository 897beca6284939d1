"""Activation x activation matmuls anywhere in a model: the matmul sites.

Public transformer code computes attention with ``jnp.einsum`` or
``nn.dot_product_attention_weights`` inside its own modules, where no module interceptor
reaches the two matmuls. A matmul site is a ``dot_general`` of the traced program whose
two operands both depend on the model's input, outside the layers and the recognised
attention modules (:mod:`ptq_jax.attention_sites`). It is named by the module path where
it runs and its index among that module's sites, ``'encoder/attn:matmul0'``. Sites are
found here, from the program alone (this module imports nothing of the library but the
NNX bridge and the program walkers of ``float_ops``); :mod:`ptq_jax.quant.matmuls`
quantizes them.

A site inside a loop or a branch (``scan``, ``while``, ``cond``) cannot be reached by
evaluating the program equation by equation and is listed apart (:func:`loop_sites`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import jax
import jax.extend.core as jex
import numpy as np

from ptq_jax.float_ops import inside as _inside, relative_stack, sub_jaxprs
from ptq_jax.nnx_bridge import NNXModel

# Programs called inside the model that are evaluated inline when they hold a site.
INLINE = ('jit', 'pjit', 'closed_call', 'core_call', 'remat2', 'checkpoint', 'custom_jvp_call',
          'custom_vjp_call', 'custom_vjp_call_jaxpr')


@dataclasses.dataclass(frozen=True)
class MatmulSite:
  """One activation x activation ``dot_general`` of the traced model."""

  name: str                       # 'path:matmulK'
  path: str                       # module path ('' at the top level)
  lhs_shape: Tuple[int, ...]      # as traced (with the batch)
  rhs_shape: Tuple[int, ...]
  macs: int                       # per example
  inside: str = ''                # the loop/branch primitive holding it ('' : reachable)
  dimension_numbers: Any = None   # the dot_general's ((contract), (batch)) axes


def site_name(path: str, index: int) -> str:
  return f'{path}:matmul{index}'


def model_root(model: Any) -> str:
  """The name scope a model's traced program opens first."""
  return model.name or type(model).__name__


def scoped_modules(model: Any) -> Dict[str, str]:
  """Path -> class of the NNX modules that run in name scopes (not Linen calls)."""
  if isinstance(model, NNXModel):
    return {name: cls for _, name, cls in model.scoped}
  return {}


def _module_of(stack: str, modules: Mapping[str, str]) -> str:
  """The deepest known module path prefixing ``stack``; else (a module the tracer did not
  see, such as one inside ``nn.scan``) its leading scopes that are Python names (an
  einsum's scope, ``'bqd,bkd->bqk'``, is not)."""
  parts = stack.split('/') if stack else []
  for k in range(len(parts), 0, -1):
    if '/'.join(parts[:k]) in modules:
      return '/'.join(parts[:k])
  names = []
  for part in parts:
    if not part.isidentifier():
      break
    names.append(part)
  return '/'.join(names)


def inline_call(eqn) -> Optional[Tuple[Any, Sequence[Any]]]:
  """(jaxpr, consts) of an inline-able call whose inputs and outputs map one to one."""
  if eqn.primitive.name not in INLINE:
    return None
  for key in ('jaxpr', 'call_jaxpr', 'fun_jaxpr'):
    value = eqn.params.get(key)
    if isinstance(value, jex.ClosedJaxpr):
      inner = (value.jaxpr, value.consts)
    elif isinstance(value, jex.Jaxpr):
      inner = (value, ())
    else:
      continue
    if len(inner[0].invars) == len(eqn.invars) and len(inner[0].outvars) == len(eqn.outvars):
      return inner
  return None


@dataclasses.dataclass
class ProgramSites:
  """The sites of one traced program, and where its evaluation meets them."""
  sites: List[MatmulSite]
  by_eqn: Dict[int, str]        # id(eqn) -> site name, for reachable sites
  inline: set                   # id(eqn) of calls holding a reachable site


def program_sites(closed: Any, data_mask: Sequence[bool], root: str, covered: Iterable[str],
          modules: Mapping[str, str]) -> ProgramSites:
  """Every activation x activation ``dot_general`` of ``closed`` outside ``covered``, in
  program order, named per module path."""
  covered = list(covered)
  found = ProgramSites([], {}, set())
  counts: Dict[str, int] = {}

  def walk(jaxpr, data: Sequence[bool], prefix: str, inside: str) -> Tuple[bool, List[bool]]:
    """(whether it holds a reachable site, which of its outputs depend on the input)."""
    flags = {v: d for v, d in zip(jaxpr.invars, data)}
    flag = lambda v: False if isinstance(v, jex.Literal) else flags.get(v, False)
    holds = False
    for eqn in jaxpr.eqns:
      ins = [flag(v) for v in eqn.invars]
      stack = relative_stack(prefix + str(eqn.source_info.name_stack), root)
      if eqn.primitive.name == 'dot_general' and ins[0] and ins[1]:
        path = _module_of(stack, modules)
        if not _inside(path, covered):
          index = counts.get(path, 0)
          counts[path] = index + 1
          lhs, rhs = (tuple(v.aval.shape) for v in eqn.invars[:2])
          name = site_name(path, index)
          dims = eqn.params['dimension_numbers']
          found.sites.append(MatmulSite(name, path, lhs, rhs, _macs(lhs, rhs, dims), inside,
                                        jax.tree.map(int, dims)))
          if not inside:
            found.by_eqn[id(eqn)] = name
            holds = True
      outs = [any(ins)] * len(eqn.outvars)
      sub = inline_call(eqn)
      if sub is not None:
        inner_holds, outs = walk(sub[0], ins, stack + '/', inside)
        if inner_holds:
          found.inline.add(id(eqn))
          holds = True
      else:
        for inner in sub_jaxprs(eqn):
          same = len(inner.invars) == len(ins)
          walk(inner, ins if same else [any(ins)] * len(inner.invars), stack + '/',
               inside or eqn.primitive.name)
      for v, d in zip(eqn.outvars, outs):
        flags[v] = d
    return holds, [flag(v) for v in jaxpr.outvars]

  walk(closed.jaxpr, list(data_mask), '', '')
  return found


def _macs(lhs: Tuple[int, ...], rhs: Tuple[int, ...], dims) -> int:
  """Multiply-adds of one ``dot_general`` per example (the lhs's leading axis); 0 for a
  symbolic shape (a program exported for any batch size)."""
  if not all(isinstance(d, (int, np.integer)) for d in lhs + rhs):
    return 0
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dims
  size = lambda shape, axes: int(np.prod([shape[i] for i in axes], dtype=np.int64))
  free = lambda shape, used: size(shape, [i for i in range(len(shape)) if i not in used])
  total = (size(lhs, lhs_batch) * free(lhs, tuple(lhs_contract) + tuple(lhs_batch))
           * free(rhs, tuple(rhs_contract) + tuple(rhs_batch)) * size(lhs, lhs_contract))
  return total // max(lhs[0], 1) if lhs else total


def find_sites(closed: Any, data_mask: Sequence[bool], root: str, covered: Iterable[str],
               modules: Mapping[str, str]) -> List[MatmulSite]:
  """The matmul sites of the traced program ``closed`` (``data_mask`` flags its inputs
  that are the model's input), outside the module paths in ``covered`` (layers and
  recognised attention modules), in program order."""
  return program_sites(closed, data_mask, root, covered, modules).sites


def loop_sites(sites: Sequence[MatmulSite]) -> List[MatmulSite]:
  """The sites inside a loop or branch, which :func:`apply_with_sites` cannot reach."""
  return [s for s in sites if s.inside]


