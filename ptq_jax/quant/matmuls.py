"""The matmul sites' quantized computation: ``Q(a) . Q(b)``, the model unedited.

With ``quantize_matmuls=True`` each matmul site (:mod:`ptq_jax.matmul_sites`) gets a
:class:`MatmulQuant`, one per-tensor asymmetric quantizer per operand. The quantized
forward pass (layers under the interceptor) is traced to a program and evaluated
equation by equation, the sites' operands fake-quantized on the way
(:func:`apply_with_sites`). Programs called inside the model (``jit``, ``remat``,
custom derivatives) are evaluated inline where they hold a site.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import jax
import jax.extend.core as jex
import jax.numpy as jnp
from flax import struct

from ptq_jax.matmul_sites import ProgramSites, inline_call, program_sites
from ptq_jax.quant.quantizer import QuantizerState, fake_quant

OPERANDS = ('lhs', 'rhs')


@struct.dataclass
class MatmulQuant:
  """The per-tensor quantizers of one matmul site's two operands (a pytree)."""

  lhs: QuantizerState
  rhs: QuantizerState

  @property
  def bits(self) -> int:
    return self.lhs.bits


OperandHook = Callable[[str, str, jnp.ndarray], None]
# dot(a, b, preferred_element_type=None): the site's own dot_general on other operands.
Dot = Callable[..., jnp.ndarray]


def quantized_matmul(quant: MatmulQuant, lhs: jnp.ndarray, rhs: jnp.ndarray, dot: Dot,
                     quantizer: Callable[[jnp.ndarray, QuantizerState], jnp.ndarray] = fake_quant
                     ) -> jnp.ndarray:
  """``Q(lhs) . Q(rhs)``: the simulation of a quantized matmul site."""
  return dot(quantizer(lhs, quant.lhs), quantizer(rhs, quant.rhs))


def apply_with_sites(run: Callable[..., Any], x: Any, root: str, modules: Mapping[str, str],
                     covered: Iterable[str], quants: Mapping[str, MatmulQuant],
                     on_layer: Optional[Callable[[str, jnp.ndarray], None]] = None,
                     on_operand: Optional[OperandHook] = None,
                     matmul: Callable[[MatmulQuant, jnp.ndarray, jnp.ndarray, Dot],
                                      jnp.ndarray] = quantized_matmul) -> Any:
  """``run(x, on_layer, on_operand)`` (the forward pass under the layer interceptor) with
  every matmul site in ``quants`` computing from quantized operands.

  The forward pass is traced to a program and evaluated here; hooks see real values:
  ``on_layer`` / ``on_operand`` calls made while tracing are replayed after evaluation,
  and ``on_operand(site, 'lhs' | 'rhs', value)`` also sees every reachable matmul site's
  float operands (before quantization). ``matmul(quant, lhs, rhs, dot)`` computes a
  quantized site (:func:`quantized_matmul`; the deployed programs' own, say).
  """
  layer_keys: List[str] = []
  operand_keys: List[Tuple[str, str]] = []

  def traced(x):
    layers, operands = [], []
    record_layer = None if on_layer is None else (
        lambda key, value: (layer_keys.append(key), layers.append(value)))
    record_operand = None if on_operand is None else (
        lambda path, name, value: (operand_keys.append((path, name)), operands.append(value)))
    return run(x, record_layer, record_operand), layers, operands

  closed, shape = jax.make_jaxpr(traced, return_shape=True)(x)
  leaves = len(jax.tree.leaves(x))
  found = program_sites(closed, [True] * leaves, root, covered, modules)
  missing = sorted(set(quants) - set(found.by_eqn.values()))
  if missing:
    unreachable = {s.name: s.inside for s in found.sites if s.inside}
    detail = '; '.join(f'{m} (inside {unreachable[m]})' if m in unreachable else m
                       for m in missing)
    raise ValueError(f'Matmul sites {detail} of the quantization state are not in this '
                     'forward pass (was the model traced with another input shape or other '
                     'arguments?).')
  seen: List[Tuple[str, str, jnp.ndarray]] = []

  def site(name: str, lhs, rhs, dot: Dot):
    if on_operand is not None:
      seen.extend([(name, 'lhs', lhs), (name, 'rhs', rhs)])
    quant = quants.get(name)
    return dot(lhs, rhs) if quant is None else matmul(quant, lhs, rhs, dot)

  flat = _evaluate(closed.jaxpr, closed.consts, jax.tree.leaves(x), found, site)
  out, layers, recorded = jax.tree.unflatten(jax.tree.structure(shape), flat)
  for key, value in zip(layer_keys, layers):
    on_layer(key, value)
  for (path, name), value in zip(operand_keys, recorded):
    on_operand(path, name, value)
  for site, name, value in seen:
    on_operand(site, name, value)
  return out


def _bind_params(eqn) -> Tuple[Sequence[Any], Dict[str, Any]]:
  """(sub-functions, parameters) to bind ``eqn``'s primitive with (jax 0.4 returns both
  from ``get_bind_params``, later versions the parameters alone)."""
  got = eqn.primitive.get_bind_params(eqn.params)
  if isinstance(got, tuple) and len(got) == 2 and isinstance(got[1], dict):
    return got
  return (), got


def _dot(eqn) -> Dot:
  """The site ``eqn``'s ``dot_general`` (its dimensions and precision) as a function."""
  params = eqn.params

  def dot(a, b, preferred_element_type=None):
    return jax.lax.dot_general(
        a, b, params['dimension_numbers'], precision=params.get('precision'),
        preferred_element_type=preferred_element_type or params.get('preferred_element_type'))
  return dot


def _evaluate(jaxpr, consts, args, found: ProgramSites, site) -> List[Any]:
  """``jaxpr`` evaluated on ``args``, each site computed by ``site(name, lhs, rhs, dot)``."""
  env: Dict[Any, Any] = {}
  read = lambda v: v.val if isinstance(v, jex.Literal) else env[v]
  for v, c in zip(jaxpr.constvars, consts):
    env[v] = c
  for v, a in zip(jaxpr.invars, args):
    env[v] = a
  for eqn in jaxpr.eqns:
    ins = [read(v) for v in eqn.invars]
    name = found.by_eqn.get(id(eqn))
    stack = str(eqn.source_info.name_stack)
    with jax.named_scope(stack) if stack else contextlib.nullcontext():
      if name is not None:
        outs = [site(name, ins[0], ins[1], _dot(eqn))]
      elif id(eqn) in found.inline:
        inner, inner_consts = inline_call(eqn)
        outs = _evaluate(inner, inner_consts, ins, found, site)
      else:
        subfuns, params = _bind_params(eqn)
        with getattr(getattr(eqn, 'ctx', None), 'manager', contextlib.nullcontext()):
          outs = eqn.primitive.bind(*subfuns, *ins, **params)
        outs = outs if eqn.primitive.multiple_results else [outs]
    for v, value in zip(eqn.outvars, outs):
      env[v] = value
  return [read(v) for v in jaxpr.outvars]
