"""A traced JAX program (a jaxpr) written as an ONNX graph, one primitive at a time.

The converter walks the program's equations in order. A value whose inputs are all
known constants is computed here (constant folding), so weight unpacking, iotas and
broadcast scales become initializers; every other equation becomes the ONNX nodes of
its rule in :data:`RULES`. Nested programs (``jit``, ``custom_jvp_call``, ...) are
inlined, except the named markers that :mod:`ptq_jax.deploy.onnx_artifact` places
around quantizers: their rules (``markers``) write QuantizeLinear/DequantizeLinear.

Layouts: JAX convolutions and pools are channels-last, ONNX's are channels-first, so
each is wrapped in two Transposes; ONNX Runtime's transpose optimizer cancels the pairs
between consecutive layers. The batch dimension stays symbolic: a shape that holds it
(``k * batch``) is computed from the input's shape at run time.

A primitive without a rule is a :class:`NotExportable` error naming it.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx
from jax.extend import core as jax_core
from onnx import helper, numpy_helper

OPSET = 21


class NotExportable(ValueError):
  """The program holds something the ONNX writer cannot express."""


@dataclasses.dataclass
class Dequantized:
  """Weight codes not yet written, ``(codes - zero_point) * scale``: a later transpose or
  reshape moves the codes with their scales, so the DequantizeLinear that reads them
  sits right before its consumer (where ONNX Runtime looks for it)."""

  codes: np.ndarray        # int8 or uint8
  scale: np.ndarray        # float32, broadcastable to codes (same rank)
  zero_point: np.ndarray   # codes' dtype, broadcastable to codes (same rank)

  def map(self, fn: Callable[[np.ndarray], np.ndarray]) -> 'Dequantized':
    """The same weights after ``fn``, a shape-only transform (transpose, reshape)."""
    full = lambda a: np.broadcast_to(a, self.codes.shape)
    return Dequantized(fn(self.codes), fn(full(self.scale)), fn(full(self.zero_point)))

  def per_axis(self) -> Optional[tuple]:
    """(axis, scales, zero points) where the scales and zero points vary along at most
    one axis (scalars where they are per-tensor); None otherwise."""
    scale = np.broadcast_to(self.scale, self.codes.shape)
    zp = np.broadcast_to(self.zero_point, self.codes.shape)
    same = lambda a, i: np.array_equal(a, np.broadcast_to(a.take([0], i), a.shape))
    varying = [i for i in range(scale.ndim) if not (same(scale, i) and same(zp, i))]
    if not varying:
      return 0, scale.reshape(-1)[0], zp.reshape(-1)[0]
    if len(varying) > 1:
      return None
    axis = varying[0]
    along = lambda a: np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1)[:, 0]
    return axis, along(scale), along(zp)


class Graph:
  """The ONNX nodes and initializers written so far, and the symbolic batch size."""

  def __init__(self, batch: Any):
    self.nodes: List[onnx.NodeProto] = []
    self.initializers: List[onnx.TensorProto] = []
    self.batch, self._batch_tensor, self._input = batch, None, ''
    self._names = itertools.count()
    self.values: Dict[str, np.ndarray] = {}         # initializer name -> value
    self.producer: Dict[str, onnx.NodeProto] = {}   # tensor name -> the node writing it
    self.linear: Dict[str, tuple] = {}   # a Conv/Gemm output (JAX layout) -> (node, channel axis)
    self.uses: Dict[Any, int] = {}       # jaxpr variable -> how many equations read it
    self.bias_rounding = 0.0   # the largest change of a bias put on its int32 grid, in steps

  def name(self, hint: str = 't') -> str:
    return f'{hint}_{next(self._names)}'

  def const(self, value: Any, hint: str = 'c') -> str:
    name = self.name(hint)
    self.values[name] = np.asarray(value)
    self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
    return name

  def node(self, op: str, inputs: Sequence[str], outputs: int = 1, **attrs) -> Any:
    names = [self.name(op.lower()) for _ in range(outputs)]
    self.nodes.append(helper.make_node(op, list(inputs), names, name=names[0], **attrs))
    self.producer.update((n, self.nodes[-1]) for n in names)
    return names[0] if outputs == 1 else names

  def source(self, name: str) -> Optional[onnx.NodeProto]:
    """The node behind ``name``, looking through Transposes."""
    node = self.producer.get(name)
    while node is not None and node.op_type == 'Transpose':
      node = self.producer.get(node.input[0])
    return node

  def set_input(self, name: str) -> None:
    self._input = name

  def dims(self, shape: Sequence[Any]) -> str:
    """A 1-D int64 tensor of ``shape``; symbolic entries (``k * batch``) are computed
    from the input's shape."""
    if all(isinstance(d, (int, np.integer)) for d in shape):
      return self.const(np.asarray(shape, np.int64), 'shape')
    parts = [self._dim(d) for d in shape]
    return self.node('Concat', parts, axis=0)

  def _dim(self, d: Any) -> str:
    if isinstance(d, (int, np.integer)):
      return self.const(np.asarray([d], np.int64), 'dim')
    try:
      k = d // self.batch
      exact = isinstance(k, (int, np.integer)) and k * self.batch == d
    except Exception:  # pylint: disable=broad-except
      exact = False
    if not exact:
      raise NotExportable(f'the dimension {d} is not a multiple of the batch size')
    if self._batch_tensor is None:
      self._batch_tensor = self.node('Shape', [self._input], start=0, end=1)
    if k == 1:
      return self._batch_tensor
    return self.node('Mul', [self._batch_tensor, self.const(np.asarray([k], np.int64))])


Value = Any   # np.ndarray (a known constant), Dequantized, or str (an ONNX tensor name)
Rule = Callable[..., Any]   # (graph, eqn, *input values) -> value or list of values


def tensor(g: Graph, v: Value) -> str:
  """``v`` as an ONNX tensor name (constants become initializers)."""
  if isinstance(v, str):
    return v
  if isinstance(v, Dequantized):
    found = v.per_axis()
    if found is None:   # (scales along several axes: stored dequantized, in float)
      return g.const(((v.codes.astype(np.float32) - v.zero_point) * v.scale).astype(np.float32))
    axis, scale, zp = found
    inputs = [g.const(v.codes, 'w'), g.const(scale.astype(np.float32), 'w_scale'),
              g.const(zp.astype(v.codes.dtype), 'w_zp')]
    return g.node('DequantizeLinear', inputs, axis=axis)
  return g.const(v)


def known(v: Value) -> bool:
  return not isinstance(v, (str, Dequantized))


def convert(closed: Any, input_names: Sequence[str], markers: Dict[str, Rule],
            rules: Dict[str, Rule], batch: Any) -> Tuple[onnx.GraphProto, float]:
  """``closed`` (a ClosedJaxpr whose inputs are the graph inputs) as an ONNX graph,
  and the largest change of a bias rounded to its int32 grid (in steps ``s_x s_w``)."""
  g = Graph(batch)
  g.set_input(input_names[0])
  outs = run_jaxpr(g, closed.jaxpr, list(closed.consts), list(input_names), markers, rules)
  graph_outputs = []
  for i, (var, v) in enumerate(zip(closed.jaxpr.outvars, outs)):
    name = f'output_{i}' if len(outs) > 1 else 'output'
    g.node('Identity', [tensor(g, v)])
    g.nodes[-1].output[0] = name
    graph_outputs.append(_value_info(name, var.aval, batch))
  graph_inputs = [_value_info(n, v.aval, batch) for n, v in zip(input_names, closed.jaxpr.invars)]
  nodes = _live(g.nodes, [o.name for o in graph_outputs])
  used = {i for n in nodes for i in n.input}
  initializers = [t for t in g.initializers if t.name in used]
  return helper.make_graph(_sorted(nodes), 'ptq_jax', graph_inputs, graph_outputs,
                           initializers), g.bias_rounding


def _live(nodes: List[onnx.NodeProto], outputs: List[str]) -> List[onnx.NodeProto]:
  """The nodes the outputs depend on (a Clip a quantizer made redundant goes: ONNX
  Runtime fuses a Relu into its quantizer only when the quantizer is its one reader)."""
  writer = {o: n for n in nodes for o in n.output}
  needed, stack = set(), list(outputs)
  while stack:
    node = writer.get(stack.pop())
    if node is not None and id(node) not in needed:
      needed.add(id(node))
      stack.extend(node.input)
  return [n for n in nodes if id(n) in needed]


def _sorted(nodes: List[onnx.NodeProto]) -> List[onnx.NodeProto]:
  """The nodes in an order where each comes after what it reads (a bias is written
  after the Conv that takes it); otherwise as written."""
  written = {o: i for i, n in enumerate(nodes) for o in n.output}
  done, order = set(), []

  def visit(i):
    if i in done:
      return
    done.add(i)
    for name in nodes[i].input:
      if name in written:
        visit(written[name])
    order.append(nodes[i])
  for i in range(len(nodes)):
    visit(i)
  return order


def run_jaxpr(g: Graph, jaxpr: Any, consts: List[Any], args: List[Value],
              markers: Dict[str, Rule], rules: Dict[str, Rule]) -> List[Value]:
  env: Dict[Any, Value] = {}
  for var, v in zip(jaxpr.constvars, consts):
    env[var] = np.asarray(v)
  for var, v in zip(jaxpr.invars, args):
    env[var] = v
  for a in [a for e in jaxpr.eqns for a in e.invars] + list(jaxpr.outvars):
    if type(a).__name__ != 'Literal':
      g.uses[a] = g.uses.get(a, 0) + 1
  for eqn in jaxpr.eqns:
    ins = [_read(env, a) for a in eqn.invars]
    try:
      outs = _equation(g, eqn, ins, markers, rules)
    except NotExportable as e:
      where = str(getattr(eqn.source_info, 'name_stack', '') or '')
      if where and 'in layer' not in str(e):
        raise NotExportable(f'{e} (in layer {where})') from e
      raise
    for var, v in zip(eqn.outvars, outs if eqn.primitive.multiple_results else [outs]):
      env[var] = v
  return [_read(env, a) for a in jaxpr.outvars]


def _read(env: Dict[Any, Value], a: Any) -> Value:
  if type(a).__name__ == 'Literal':
    return np.asarray(a.val, a.aval.dtype)
  return env[a]


def _equation(g: Graph, eqn: Any, ins: List[Value], markers: Dict[str, Rule],
              rules: Dict[str, Rule]) -> Any:
  name = eqn.primitive.name
  marker = markers.get(eqn.params.get('name', '')) if name in ('jit', 'pjit') else None
  if marker is not None:
    return [marker(g, eqn, *ins)]
  if all(known(v) for v in ins):
    try:
      out = eqn.primitive.bind(*ins, **eqn.params)
      return [np.asarray(o) for o in out] if eqn.primitive.multiple_results else np.asarray(out)
    except Exception:  # pylint: disable=broad-except  (e.g. a symbolic shape: no constant)
      pass
  sub = _inner(eqn)
  if sub is not None:
    return run_jaxpr(g, sub.jaxpr, list(sub.consts), ins, markers, rules)
  if name not in rules:
    raise NotExportable(f'the operation {name!r} has no ONNX form in ptq_jax')
  return rules[name](g, eqn, *ins)


def _inner(eqn: Any) -> Optional[Any]:
  """The program a call-like equation runs (jit, custom_jvp/vjp, remat), if any."""
  for key in ('jaxpr', 'call_jaxpr', 'fun_jaxpr'):
    sub = eqn.params.get(key)
    if sub is not None and eqn.primitive.name not in ('scan', 'while', 'cond'):
      return sub if hasattr(sub, 'consts') else jax_core.ClosedJaxpr(sub, ())
  return None


def _value_info(name: str, aval: Any, batch: Any) -> onnx.ValueInfoProto:
  dims = ['batch' if not isinstance(d, (int, np.integer)) else int(d) for d in aval.shape]
  return helper.make_tensor_value_info(
      name, helper.np_dtype_to_tensor_dtype(np.dtype(aval.dtype)), dims)


def onnx_dtype(dtype: Any) -> int:
  return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


__all__ = ['Dequantized', 'Graph', 'NotExportable', 'OPSET', 'Rule', 'convert', 'known',
           'onnx_dtype', 'tensor']
