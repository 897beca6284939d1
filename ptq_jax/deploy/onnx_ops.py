"""The ONNX nodes of each JAX primitive (:data:`RULES`, used by :mod:`.onnx_graph`).

Each rule takes the graph, the equation and its input values (constants, lazily
dequantized weights or tensor names) and returns the output value. Shape-only
primitives on weight codes (transpose, reshape, a no-op cast) move the codes and keep
them integer; the rest write nodes.
"""

from __future__ import annotations

import string
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from ptq_jax.deploy.onnx_graph import (Dequantized, Graph, NotExportable, Rule, known,
                                       onnx_dtype, tensor)
from ptq_jax.quant.bias_grid import INT32_MAX


def _shape(eqn: Any, i: int = 0) -> tuple:
  return tuple(eqn.invars[i].aval.shape)


def _out_shape(eqn: Any) -> tuple:
  return tuple(eqn.outvars[0].aval.shape)


def _unary(op: str) -> Rule:
  return lambda g, eqn, x: g.node(op, [tensor(g, x)])


def _binary(op: str) -> Rule:
  return lambda g, eqn, a, b: g.node(op, [tensor(g, a), tensor(g, b)])


def _logical(op: str, bitwise: str) -> Rule:
  def rule(g, eqn, *xs):
    is_bool = eqn.invars[0].aval.dtype == np.bool_
    return g.node(op if is_bool else bitwise, [tensor(g, x) for x in xs])
  return rule


def _max(g: Graph, eqn: Any, a: Any, b: Any) -> str:
  """``max(x, 0)`` is a Relu (which ONNX Runtime folds into a following quantizer)."""
  for x, other in ((a, b), (b, a)):
    if known(other) and np.ndim(other) == 0 and float(other) == 0.0:
      return g.node('Relu', [tensor(g, x)])
  return g.node('Max', [tensor(g, a), tensor(g, b)])


def _min(g: Graph, eqn: Any, a: Any, b: Any) -> str:
  """``min(x, c)`` is a Clip (ReLU6's upper bound, which ONNX Runtime drops before a
  quantizer whose range it contains)."""
  for x, other in ((a, b), (b, a)):
    if known(other) and np.ndim(other) == 0 and np.issubdtype(np.asarray(other).dtype,
                                                               np.floating):
      return g.node('Clip', [tensor(g, x), '', g.const(np.asarray(other))])
  return g.node('Min', [tensor(g, a), tensor(g, b)])


def _add(g: Graph, eqn: Any, a: Any, b: Any) -> str:
  """An addition, or a per-channel constant taken into the Conv/Gemm before it as its
  bias (the form ONNX Runtime's integer kernels take)."""
  for y, other, var in ((a, b, eqn.invars[0]), (b, a, eqn.invars[1])):
    if isinstance(y, str) and y in g.linear and known(other) and g.uses.get(var) == 1:
      node, axis = g.linear[y]
      rank = len(_out_shape(eqn))
      full = np.reshape(other, (1,) * (rank - np.ndim(other)) + np.shape(other))
      if all(d == 1 for i, d in enumerate(full.shape) if i != axis) and len(node.input) == 2:
        channels = _out_shape(eqn)[axis]
        bias = _bias(g, node, np.broadcast_to(full.reshape(-1), (channels,)))
        if bias is not None:
          node.input.append(bias)
          del g.linear[y]
          return y
  return g.node('Add', [tensor(g, a), tensor(g, b)])


def _bias(g: Graph, node: Any, bias: np.ndarray) -> Optional[str]:
  """The bias input: int32 codes at scale ``s_x * s_w`` behind a DequantizeLinear where
  both operands are dequantized codes (ONNX Runtime's QDQ form: the float bias rounded
  to that step, exact for a model with ``with_integer_biases()``; the largest change, in
  steps, is kept in ``g.bias_rounding``), else the float bias; None where the codes
  would not fit int32 (the bias is then added in float after the layer)."""
  x, w = g.source(node.input[0]), g.source(node.input[1])
  if not all(n is not None and n.op_type == 'DequantizeLinear' for n in (x, w)):
    return g.const(np.asarray(bias, np.float32), 'bias')
  scale = (g.values[x.input[1]] * g.values[w.input[1]]).astype(np.float32)
  scale = np.broadcast_to(scale, bias.shape).copy()
  with np.errstate(divide='ignore', invalid='ignore'):
    exact = np.round(bias / scale)
  if not np.all(np.isfinite(exact) & (np.abs(exact) <= INT32_MAX)):
    return None
  codes = exact.astype(np.int32)
  ratio = bias.astype(np.float64) / scale   # (beyond float32's own rounding of the bias)
  off = np.abs(codes - ratio) - np.abs(ratio) * 2.0**-23
  g.bias_rounding = max(g.bias_rounding, float(np.maximum(off, 0).max(initial=0)))
  return g.node('DequantizeLinear', [g.const(codes, 'bias'), g.const(scale, 'bias_scale'),
                                     g.const(np.zeros_like(codes), 'bias_zp')], axis=0)


def _erfc(g: Graph, eqn: Any, x: Any) -> str:
  one = g.const(np.asarray(1, eqn.invars[0].aval.dtype))
  return g.node('Sub', [one, g.node('Erf', [tensor(g, x)])])


def _not_equal(g: Graph, eqn: Any, a: Any, b: Any) -> str:
  return g.node('Not', [g.node('Equal', [tensor(g, a), tensor(g, b)])])


def _rsqrt(g: Graph, eqn: Any, x: Any) -> str:
  return g.node('Reciprocal', [g.node('Sqrt', [tensor(g, x)])])


def _square(g: Graph, eqn: Any, x: Any) -> str:
  x = tensor(g, x)
  return g.node('Mul', [x, x])


def _integer_pow(g: Graph, eqn: Any, x: Any) -> str:
  y = eqn.params['y']
  dtype = eqn.invars[0].aval.dtype
  return g.node('Pow', [tensor(g, x), g.const(np.asarray(y, dtype))])


def _round(g: Graph, eqn: Any, x: Any) -> str:
  x = tensor(g, x)
  if int(eqn.params.get('rounding_method', 0)) == 1:   # to nearest even, as ONNX's Round
    return g.node('Round', [x])
  half = g.const(np.asarray(0.5, eqn.invars[0].aval.dtype))   # half away from zero
  magnitude = g.node('Floor', [g.node('Add', [g.node('Abs', [x]), half])])
  return g.node('Mul', [g.node('Sign', [x]), magnitude])


def _identity(g: Graph, eqn: Any, *xs: Any) -> Any:
  return list(xs) if eqn.primitive.multiple_results else xs[0]


def _convert(g: Graph, eqn: Any, x: Any) -> Any:
  new = np.dtype(eqn.params['new_dtype'])
  if new == np.dtype(eqn.invars[0].aval.dtype):
    return x
  return g.node('Cast', [tensor(g, x)], to=onnx_dtype(new))


def _select_n(g: Graph, eqn: Any, pred: Any, *cases: Any) -> str:
  if len(cases) != 2:
    raise NotExportable('select_n with more than two cases has no ONNX form in ptq_jax')
  p = tensor(g, pred)
  if eqn.invars[0].aval.dtype != np.bool_:
    p = g.node('Cast', [p], to=onnx_dtype(np.bool_))
  return g.node('Where', [p, tensor(g, cases[1]), tensor(g, cases[0])])


def _clamp(g: Graph, eqn: Any, lo: Any, x: Any, hi: Any) -> str:
  return g.node('Min', [g.node('Max', [tensor(g, x), tensor(g, lo)]), tensor(g, hi)])


def _reduce(op: str) -> Rule:
  def rule(g, eqn, x):
    axes = g.const(np.asarray(eqn.params['axes'], np.int64))
    return g.node(op, [tensor(g, x), axes], keepdims=0, noop_with_empty_axes=1)
  return rule


def _arg(op: str) -> Rule:
  def rule(g, eqn, x):
    axis, = eqn.params['axes']
    out = g.node(op, [tensor(g, x)], axis=int(axis), keepdims=0)
    return g.node('Cast', [out], to=onnx_dtype(eqn.params['index_dtype']))
  return rule


def _reshape(g: Graph, eqn: Any, x: Any) -> Any:
  if eqn.params.get('dimensions') is not None:
    raise NotExportable('reshape with dimensions= has no ONNX form in ptq_jax')
  shape = _out_shape(eqn)
  if isinstance(x, Dequantized):
    return x.map(lambda a: a.reshape(shape))
  if known(x) and all(isinstance(d, (int, np.integer)) for d in shape):
    return np.reshape(x, shape)
  return g.node('Reshape', [tensor(g, x), g.dims(shape)])


def transpose(g: Graph, x: Any, perm: Sequence[int]) -> Any:
  perm = [int(p) for p in perm]
  if perm == sorted(perm):
    return x
  if isinstance(x, Dequantized):
    return x.map(lambda a: np.transpose(a, perm))
  if known(x):
    return np.transpose(x, perm)
  return g.node('Transpose', [tensor(g, x)], perm=perm)


def _transpose(g: Graph, eqn: Any, x: Any) -> Any:
  return transpose(g, x, eqn.params['permutation'])


def _broadcast_in_dim(g: Graph, eqn: Any, x: Any, *dyn: Any) -> str:
  if dyn:
    raise NotExportable('broadcast_in_dim with dynamic shapes has no ONNX form in ptq_jax')
  shape, dims = _out_shape(eqn), eqn.params['broadcast_dimensions']
  src = _shape(eqn)
  x = tensor(g, x)
  if len(src) != len(shape):
    expanded = [1] * len(shape)
    for j, d in enumerate(dims):
      expanded[d] = src[j]
    x = g.node('Reshape', [x, g.dims(expanded)])
    src = tuple(expanded)
  if src == shape:
    return x
  return g.node('Expand', [x, g.dims(shape)])


def _squeeze(g: Graph, eqn: Any, x: Any) -> str:
  axes = g.const(np.asarray(eqn.params['dimensions'], np.int64))
  return g.node('Squeeze', [tensor(g, x), axes])


def _expand_dims(g: Graph, eqn: Any, x: Any) -> str:
  axes = g.const(np.asarray(eqn.params['dimensions'], np.int64))
  return g.node('Unsqueeze', [tensor(g, x), axes])


def _concatenate(g: Graph, eqn: Any, *xs: Any) -> str:
  return g.node('Concat', [tensor(g, x) for x in xs], axis=int(eqn.params['dimension']))


def _slice(g: Graph, eqn: Any, x: Any) -> str:
  shape = _shape(eqn)
  starts, limits = eqn.params['start_indices'], eqn.params['limit_indices']
  strides = eqn.params['strides'] or (1,) * len(shape)
  axes = [i for i in range(len(shape))   # (the axes the slice does not keep whole)
          if not (starts[i] == 0 and limits[i] == shape[i] and strides[i] == 1)]
  if any(not isinstance(limits[i], (int, np.integer)) for i in axes):
    raise NotExportable('a slice that ends inside the batch dimension has no ONNX form')
  c = lambda v: g.const(np.asarray(v, np.int64))
  return g.node('Slice', [tensor(g, x), c([starts[i] for i in axes]), c([limits[i] for i in axes]),
                          c(axes), c([strides[i] for i in axes])])


def _pad(g: Graph, eqn: Any, x: Any, value: Any) -> str:
  config = eqn.params['padding_config']
  if any(i != 0 or lo < 0 or hi < 0 for lo, hi, i in config):
    raise NotExportable('interior or negative padding has no ONNX form in ptq_jax')
  pads = np.asarray([lo for lo, _, _ in config] + [hi for _, hi, _ in config], np.int64)
  return g.node('Pad', [tensor(g, x), g.const(pads), tensor(g, value)], mode='constant')


def _dot_general(g: Graph, eqn: Any, a: Any, b: Any) -> str:
  (lc, rc), (lb, rb) = eqn.params['dimension_numbers']
  la, ra = _shape(eqn, 0), _shape(eqn, 1)
  if not lb and tuple(lc) == (len(la) - 1,) and len(ra) == 2:   # x @ W: a MatMul
    if tuple(rc) == (1,):
      b = transpose(g, b, (1, 0))
    if len(la) == 2:   # (a Gemm, which takes the bias)
      y = g.node('Gemm', [tensor(g, a), tensor(g, b)])
      g.linear[y] = (g.producer[y], 1)
      return y
    return g.node('MatMul', [tensor(g, a), tensor(g, b)])
  lf = [i for i in range(len(la)) if i not in lc and i not in lb]
  rf = [j for j in range(len(ra)) if j not in rc and j not in rb]
  if len(lc) == 1 and len(lf) == 1 and len(rf) == 1:   # batched: Transposes and a MatMul
    a = transpose(g, a, list(lb) + lf + list(lc))
    b = transpose(g, b, list(rb) + list(rc) + rf)
    return g.node('MatMul', [tensor(g, a), tensor(g, b)])
  letters = iter(string.ascii_letters)
  lhs = [next(letters) for _ in la]
  rhs = [None] * len(ra)
  for i, j in list(zip(lc, rc)) + list(zip(lb, rb)):
    rhs[j] = lhs[i]
  rhs = [r or next(letters) for r in rhs]
  out = ([lhs[i] for i in lb] + [lhs[i] for i in range(len(la)) if i not in lc and i not in lb]
         + [rhs[j] for j in range(len(ra)) if j not in rc and j not in rb])
  equation = f'{"".join(lhs)},{"".join(rhs)}->{"".join(out)}'
  return g.node('Einsum', [tensor(g, a), tensor(g, b)], equation=equation)


def _inverse(perm: Sequence[int]) -> List[int]:
  inv = [0] * len(perm)
  for i, p in enumerate(perm):
    inv[p] = i
  return inv


def _conv(g: Graph, eqn: Any, x: Any, w: Any) -> str:
  p = eqn.params
  if p['batch_group_count'] != 1:
    raise NotExportable('batch-grouped convolutions have no ONNX form in ptq_jax')
  lhs_spec, rhs_spec, out_spec = p['dimension_numbers']
  x, w = transpose(g, x, lhs_spec), transpose(g, w, rhs_spec)   # NC..., OI...
  attrs = dict(dilations=[int(d) for d in p['rhs_dilation']],
               group=int(p['feature_group_count']))
  if any(d != 1 for d in p['lhs_dilation']):
    y = _conv_transpose(g, eqn, x, w, attrs)
  else:
    pads = [int(lo) for lo, _ in p['padding']] + [int(hi) for _, hi in p['padding']]
    y = g.node('Conv', [tensor(g, x), tensor(g, w)], pads=pads,
               strides=[int(s) for s in p['window_strides']], **attrs)
  node = g.producer[y]
  y = transpose(g, y, _inverse(out_spec))
  if node.op_type == 'Conv':
    g.linear[y] = (node, out_spec[1])
  return y


def _conv_transpose(g: Graph, eqn: Any, x: Any, w: Any, attrs: Dict[str, Any]) -> str:
  """A convolution of the input dilated by ``s`` (``nn.ConvTranspose``) is ONNX's
  ConvTranspose with stride ``s``, the kernel flipped and its two channel axes swapped,
  and the padding ``k_eff - 1 - pad`` on each side."""
  p = eqn.params
  if attrs['group'] != 1 or any(s != 1 for s in p['window_strides']):
    raise NotExportable('a grouped or strided input-dilated convolution has no ONNX form')
  if not known(w) and not isinstance(w, Dequantized):
    raise NotExportable('a transposed convolution with run-time weights has no ONNX form')
  spatial = w.codes.shape[2:] if isinstance(w, Dequantized) else np.shape(w)[2:]
  flip = lambda a: np.ascontiguousarray(np.flip(a, axis=tuple(range(2, a.ndim))).swapaxes(0, 1))
  w = w.map(flip) if isinstance(w, Dequantized) else flip(np.asarray(w))
  reach = [d * (k - 1) for d, k in zip(attrs['dilations'], spatial)]
  pads = ([r - int(lo) for r, (lo, _) in zip(reach, p['padding'])]
          + [r - int(hi) for r, (_, hi) in zip(reach, p['padding'])])
  if min(pads) < 0:
    raise NotExportable('a transposed convolution padded past its kernel has no ONNX form')
  return g.node('ConvTranspose', [tensor(g, x), tensor(g, w)], pads=pads,
                strides=[int(s) for s in p['lhs_dilation']], **attrs)


def _pool(op: str) -> Rule:
  def rule(g, eqn, x):
    p = eqn.params
    window, strides, padding = p['window_dimensions'], p['window_strides'], p['padding']
    if any(d != 1 for d in tuple(p['base_dilation']) + tuple(p['window_dilation'])):
      raise NotExportable('dilated pooling has no ONNX form in ptq_jax')
    n = len(window)
    spatial = [i for i in range(1, n) if window[i] > 1 or strides[i] > 1 or padding[i] != (0, 0)]
    rest = [i for i in range(1, n) if i not in spatial]
    if len(rest) != 1:
      raise NotExportable(f'pooling over axes {spatial} of a rank-{n} array has no ONNX form')
    perm = [0] + rest + spatial
    pads = [int(padding[i][0]) for i in spatial] + [int(padding[i][1]) for i in spatial]
    attrs = dict(kernel_shape=[int(window[i]) for i in spatial],
                 strides=[int(strides[i]) for i in spatial], pads=pads)
    if op == 'AveragePool':
      attrs['count_include_pad'] = 1
    y = g.node(op, [tensor(g, transpose(g, x, perm))], **attrs)
    if op == 'AveragePool':   # reduce_window_sum: the mean times the window's size
      y = g.node('Mul', [y, g.const(np.asarray(np.prod(window), eqn.invars[0].aval.dtype))])
    return transpose(g, y, _inverse(perm))
  return rule


def _gather(g: Graph, eqn: Any, operand: Any, indices: Any) -> str:
  """Gathers that take whole slices at whole-number positions: an embedding lookup,
  ``x[:, 0]``, and the strided slices JAX writes as gathers under a symbolic batch
  (one GatherND on the operand with the indexed axes moved first)."""
  dn, sizes, shape = eqn.params['dimension_numbers'], eqn.params['slice_sizes'], _shape(eqn)
  axes = tuple(dn.start_index_map)
  if (known(indices) and np.ndim(indices) == 1 and not dn.collapsed_slice_dims
      and tuple(dn.offset_dims) == tuple(range(len(shape)))):   # a slice at fixed offsets
    c = lambda v: g.const(np.asarray(v, np.int64))
    starts = np.asarray(indices, np.int64)
    return g.node('Slice', [tensor(g, operand), c(starts), c(starts + [sizes[a] for a in axes]),
                            c(axes)])
  if (set(dn.collapsed_slice_dims) != set(axes) or getattr(dn, 'operand_batching_dims', ())
      or any(sizes[i] != 1 for i in axes)
      or any(sizes[i] != shape[i] for i in range(len(shape)) if i not in axes)):
    raise NotExportable('a gather of partial slices has no ONNX form in ptq_jax')
  rest = [i for i in range(len(shape)) if i not in axes]
  data = transpose(g, operand, list(axes) + rest)
  if known(indices):
    idx = g.const(np.asarray(indices, np.int64))
  else:   # (bounded as JAX's default mode keeps them in range)
    idx = g.node('Cast', [tensor(g, indices)], to=onnx_dtype(np.int64))
    top = g.const(np.asarray([shape[a] - 1 for a in axes], np.int64))
    idx = g.node('Max', [g.node('Min', [idx, top]), g.const(np.asarray(0, np.int64))])
  y = g.node('GatherND', [tensor(g, data), idx])
  n_idx = len(_shape(eqn, 1)) - 1
  onnx_order = [('idx', k) for k in range(n_idx)] + [('op', i) for i in rest]
  ops, idxs, jax_order = iter(rest), iter(range(n_idx)), []
  for pos in range(len(onnx_order)):
    jax_order.append(('op', next(ops)) if pos in dn.offset_dims else ('idx', next(idxs)))
  return transpose(g, y, [onnx_order.index(d) for d in jax_order])


def _split(g: Graph, eqn: Any, x: Any) -> List[str]:
  sizes = g.const(np.asarray(eqn.params['sizes'], np.int64))
  return g.node('Split', [tensor(g, x), sizes], outputs=len(eqn.params['sizes']),
                axis=int(eqn.params['axis']))


def _cumsum(g: Graph, eqn: Any, x: Any) -> str:
  axis = g.const(np.asarray(eqn.params['axis'], np.int64))
  return g.node('CumSum', [tensor(g, x), axis], reverse=int(eqn.params['reverse']))


def _loop(g: Graph, eqn: Any, *xs: Any) -> Any:
  raise NotExportable(f'a {eqn.primitive.name} (nn.scan, lax.scan or a while loop) cannot be '
                      'written to ONNX yet; export format="jax" keeps it')


RULES: Dict[str, Rule] = {
    'add': _add, 'max': _max, 'min': _min,
    **{p: _binary(op) for p, op in [('sub', 'Sub'), ('mul', 'Mul'), ('div', 'Div'),
                                    ('pow', 'Pow'), ('eq', 'Equal'), ('lt', 'Less'),
                                    ('gt', 'Greater'), ('le', 'LessOrEqual'),
                                    ('ge', 'GreaterOrEqual')]},
    **{p: _unary(op) for p, op in [('neg', 'Neg'), ('exp', 'Exp'), ('log', 'Log'),
                                   ('tanh', 'Tanh'), ('logistic', 'Sigmoid'), ('sqrt', 'Sqrt'),
                                   ('abs', 'Abs'), ('sign', 'Sign'), ('floor', 'Floor'),
                                   ('ceil', 'Ceil'), ('erf', 'Erf'), ('sin', 'Sin'),
                                   ('cos', 'Cos')]},
    'and': _logical('And', 'BitwiseAnd'), 'or': _logical('Or', 'BitwiseOr'),
    'not': _logical('Not', 'BitwiseNot'), 'xor': _logical('Xor', 'BitwiseXor'),
    'ne': _not_equal, 'erfc': _erfc, 'rsqrt': _rsqrt, 'square': _square,
    'integer_pow': _integer_pow,
    'round': _round, 'convert_element_type': _convert, 'select_n': _select_n,
    'clamp': _clamp, 'stop_gradient': _identity, 'copy': _identity, 'copy_p': _identity,
    'optimization_barrier': _identity,
    'reduce_sum': _reduce('ReduceSum'), 'reduce_max': _reduce('ReduceMax'),
    'reduce_min': _reduce('ReduceMin'), 'reduce_prod': _reduce('ReduceProd'),
    'argmax': _arg('ArgMax'), 'argmin': _arg('ArgMin'),
    'reshape': _reshape, 'transpose': _transpose, 'broadcast_in_dim': _broadcast_in_dim,
    'squeeze': _squeeze, 'expand_dims': _expand_dims, 'concatenate': _concatenate,
    'slice': _slice, 'pad': _pad, 'dot_general': _dot_general, 'conv_general_dilated': _conv,
    'reduce_window_sum': _pool('AveragePool'), 'reduce_window_max': _pool('MaxPool'),
    'gather': _gather, 'split': _split, 'cumsum': _cumsum,
    'scan': _loop, 'while': _loop,
}

__all__ = ['RULES', 'transpose']
