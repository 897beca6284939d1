"""The whole quantized network as an ONNX model in QDQ form (``format='onnx'``).

The model is the simulation itself, traced with two named markers around its
quantizers, and written by :mod:`.onnx_graph`: every quantized input becomes
``QuantizeLinear -> DequantizeLinear`` (uint8 codes with the site's zero point; below
8 bits a Clip of the codes between them bounds them to ``[0, 2^b - 1]``), every
quantized kernel an int8 initializer of its centred codes read by ``DequantizeLinear``
with per-channel scales (uint8 with zero points for 8-bit asymmetric weights). Biases,
unfolded BatchNorms, softmax and the layers the user kept float stay float. ONNX
Runtime recognises the pattern ``DQ -> Conv/MatMul -> Q`` and runs it with integer
kernels (QLinearConv, QLinearMatMul, MatMulIntegerToFloat, ...); where no quantizer
follows a layer, the layer runs in float on the dequantized values, as the simulation
computes it. :func:`export_onnx` asks ONNX Runtime which operators its optimizer
produced and records them, so a QDQ model that silently runs in float shows.

Why a writer of our own rather than jax2onnx: the quantizers must become QDQ nodes, not
the float ``round``/``clip`` arithmetic a generic converter writes, and the
program's constants must stay integer codes; a walk over the jaxpr with two marker
rules does both and adds only ``onnx`` and ``onnxruntime`` as dependencies.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import tempfile
from typing import Any, Callable, Dict, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime as ort
from jax import export as jax_export
from onnx import helper

from ptq_jax.calling import inference_kwargs
from ptq_jax.checkpoint import CheckpointError
from ptq_jax.deploy.integer import IntegerLayer, input_codes, integer_layer
from ptq_jax.deploy.jax_artifact import ExportReport, fp32_param_bytes
from ptq_jax.deploy.onnx_graph import OPSET, Dequantized, NotExportable, convert, tensor
from ptq_jax.deploy.onnx_ops import RULES
from ptq_jax.io import atomic_write_bytes, atomic_write_json, check_output_file
from ptq_jax.quant.attention import quantized_attention
from ptq_jax.quant.matmuls import quantized_matmul
from ptq_jax.quant.export import unpack_codes
from ptq_jax.linear import apply_linear
from ptq_jax.quant.interceptor import (apply_quantized, layer_forward, layer_geometry,
                                       layer_states)

FORMAT = 'ptq_jax.onnx/1'   # (ptq_jax.deploy.ONNX_FORMAT)
# Operators that show ONNX Runtime computing in integers after its graph optimisation.
INTEGER_OPS = ('QLinearConv', 'ConvInteger', 'QLinearMatMul', 'MatMulInteger',
               'MatMulIntegerToFloat', 'DynamicQuantizeMatMul', 'QGemm', 'QLinearAdd',
               'QLinearMul', 'QLinearAveragePool', 'QLinearGlobalAveragePool',
               'QLinearConcat', 'QLinearSigmoid', 'QLinearLeakyRelu', 'QLinearSoftmax')
BIAS_ON_GRID = 1e-3   # biases within this fraction of a step count as on the grid
FLOAT_OPS = ('Conv', 'FusedConv', 'MatMul', 'FusedMatMul', 'Gemm', 'Einsum', 'NhwcFusedConv')


@jax.jit
def ptq_quantize_dequantize(x, scale, zero_point, code_max):
  """Marker: an input's codes ``clip(round(x / s) + zp, 0, code_max)``, dequantized."""
  q = jnp.clip(jnp.round(x / scale) + zero_point, 0, code_max)
  return (q - zero_point) * scale


@jax.jit
def ptq_dequantize_weight(codes, scale, zero_point):
  """Marker: a kernel from its stored codes, ``(codes - zp) * scale``."""
  return (codes.astype(jnp.float32) - zero_point) * scale


def _qdq_rule(g, eqn, x, scale, zero_point, code_max) -> str:
  """QuantizeLinear -> DequantizeLinear at uint8; below 8 bits a Clip of the codes to
  ``[0, code_max]`` between them (on the integers, so ONNX Runtime still sees the
  DequantizeLinear it fuses into the next layer's integer kernel)."""
  s, z, top = np.float32(scale), int(zero_point), int(code_max)
  params = [g.const(s, 'x_scale'), g.const(np.uint8(z), 'x_zp')]
  x = tensor(g, x)
  if top < 255:
    x = _without_wider_clip(g, x, (0 - z) * s, (top - z) * s)
  q = g.node('QuantizeLinear', [x] + params)
  if top < 255:
    q = g.node('Clip', [q, g.const(np.uint8(0)), g.const(np.uint8(top))])
  return g.node('DequantizeLinear', [q] + params)


def _without_wider_clip(g, x: str, low: float, high: float) -> str:
  """``x`` before a float Clip (ReLU6's) whose bounds contain ``[low, high]``: the codes'
  clip after quantizing already bounds them, and ONNX Runtime fuses a layer into its
  integer kernel only when no float Clip sits before the quantizer."""
  node = g.producer.get(x)
  if node is None or node.op_type != 'Clip':
    return x
  names = list(node.input[1:]) + [''] * (3 - len(node.input))
  if any(n and n not in g.values for n in names):   # (a bound computed at run time)
    return x
  lo, hi = (g.values[n] if n else None for n in names)
  if (lo is None or float(lo) <= low) and (hi is None or float(hi) >= high):
    return node.input[0]
  return x


def _weight_rule(g, eqn, codes, scale, zero_point) -> Dequantized:
  return Dequantized(np.asarray(codes), np.asarray(scale, np.float32),
                     np.asarray(zero_point).astype(np.asarray(codes).dtype))


MARKERS = {'ptq_quantize_dequantize': _qdq_rule, 'ptq_dequantize_weight': _weight_rule}


def stored_weights(layer: IntegerLayer) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(codes, per-channel scale, zero point) as the ONNX model stores them: centred int8
  codes with zero points 0 where they fit (symmetric weights, or asymmetric ones below
  8 bits), else uint8 codes with their zero points (which ONNX Runtime runs on a much
  slower path: :data:`SLOW_WEIGHTS`)."""
  codes = unpack_codes(layer.packed_codes, layer.w_bits, layer.kernel_shape).astype(np.int32)
  centred = codes - layer.w_zero_point
  shape = (1,) * (codes.ndim - 1) + (-1,)
  scale = layer.w_scale.reshape(shape)
  if centred.min() >= -127 and centred.max() <= 127:
    return centred.astype(np.int8), scale, np.zeros(scale.shape, np.int8)
  return codes.astype(np.uint8), scale, layer.w_zero_point.reshape(shape).astype(np.uint8)


def _quantize_input(x, codes):
  return ptq_quantize_dequantize(x, codes.scale, jnp.asarray(codes.zero_point, jnp.float32),
                                 jnp.asarray(codes.code_max, jnp.float32))


def qdq_program(qmodel: Any) -> Tuple[Callable[[jnp.ndarray], jnp.ndarray], Dict[str, Any]]:
  """``x -> outputs``: the simulation with its quantizers marked for the ONNX writer."""
  layers = {p: integer_layer(p, lq) for p, lq in layer_states(qmodel.qstate).items()}

  def layer_output(path, module, x, site):
    layer = layers[path]
    x = jnp.asarray(x, jnp.float32)
    if layer.smooth is not None:
      x = x / jnp.asarray(layer.smooth)
    if layer.inputs[site] is not None:
      x = _quantize_input(x, layer.inputs[site])
    kernel = (jnp.asarray(layer.float_kernel) if layer.w_bits is None
              else ptq_dequantize_weight(*stored_weights(layer)))
    geom = layer_geometry(module, x.shape, layer.kernel_shape)
    if geom is None:
      return layer_forward(module, x, kernel, jnp.asarray(layer.bias))
    return apply_linear(geom, x, kernel, one_op=True) + jnp.asarray(layer.bias)

  marked = lambda x, q: _quantize_input(x, input_codes(q))

  def attention(*args, **kwargs):
    return quantized_attention(*args, quantizer=marked, **kwargs)

  def matmul(quant, lhs, rhs, dot):
    return quantized_matmul(quant, lhs, rhs, dot, quantizer=marked)

  def forward(x):
    return apply_quantized(qmodel.model, qmodel.variables, qmodel.qstate, qmodel.folded_bns,
                           x, layer_output=layer_output, attention_fn=attention, matmul=matmul)
  return forward, layers


def onnx_model(qmodel: Any) -> Tuple[onnx.ModelProto, float]:
  """The quantized network as a checked ONNX model (input ``input``, batch symbolic),
  and the largest change of a bias rounded to its int32 grid, in steps ``s_x s_w`` (0 up
  to float32 rounding for a model with ``with_integer_biases()``; at most 0.5)."""
  return traced_onnx(qdq_program(qmodel)[0], qmodel.input_shape)


def float_onnx_model(model: Any, variables: Any, input_shape: Sequence[int]) -> onnx.ModelProto:
  """The float model written the same way (the FP32 baseline beside a QDQ model)."""
  kwargs = inference_kwargs(model)
  return traced_onnx(lambda x: model.apply(variables, x, **kwargs), input_shape)[0]


def traced_onnx(forward: Callable[[jnp.ndarray], Any], input_shape: Sequence[int]
                ) -> Tuple[onnx.ModelProto, float]:
  """``forward`` traced with a symbolic batch and written as a checked ONNX model (and
  the largest bias rounding, see :func:`onnx_model`)."""
  batch, = jax_export.symbolic_shape('batch')
  spec = jax.ShapeDtypeStruct((batch,) + tuple(input_shape), jnp.float32)
  try:
    closed = jax.make_jaxpr(forward)(spec)
    graph, bias_rounding = convert(closed, ['input'], MARKERS, RULES, batch)
  except NotExportable as e:
    raise ValueError(f'The quantized model cannot be written as ONNX: {e}.') from e
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', OPSET)],
                            producer_name='ptq_jax')
  model.ir_version = 10
  onnx.checker.check_model(model)
  return model, bias_rounding


def runtime_ops(path: str) -> Dict[str, int]:
  """How many of each operator ONNX Runtime's CPU graph optimisation leaves in the
  model at ``path`` (what actually runs)."""
  with tempfile.TemporaryDirectory() as tmp:
    options = ort.SessionOptions()
    options.log_severity_level = 3   # (not the note that the saved graph is machine-specific)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = os.path.join(tmp, 'optimized.onnx')
    ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
    optimized = onnx.load(options.optimized_model_filepath)
  return dict(sorted(collections.Counter(n.op_type for n in optimized.graph.node).items()))


def export_onnx(qmodel: Any, path: str) -> ExportReport:
  """Writes the quantized network as an ONNX QDQ model to ``path`` (and ``path.json``
  with its SHA-256 and the operators ONNX Runtime runs); see the module docstring."""
  check_output_file(path, 'export path')
  check_output_file(path + '.json', 'export path')
  forward, layers = qdq_program(qmodel)   # (the integer records, built once)
  model, bias_rounding = traced_onnx(forward, qmodel.input_shape)
  blob = model.SerializeToString()
  if bias_rounding > BIAS_ON_GRID:
    logging.getLogger('ptq_jax').info(
        'ONNX: biases rounded to their int32 grid s_x s_w (by up to %.2f of a step), as ONNX '
        'Runtime\'s integer kernels hold them; export qm.with_integer_biases() for a model '
        'whose simulation computes exactly that.', bias_rounding)
  digest = hashlib.sha256(blob).hexdigest()
  atomic_write_bytes(path, blob)
  ops = runtime_ops(path)
  slow = [p for p, l in layers.items()
          if l.w_bits is not None and stored_weights(l)[0].dtype == np.uint8]
  if slow:
    logging.getLogger('ptq_jax').info(SLOW_WEIGHTS, len(slow), ', '.join(slow[:4]))
  integer = {k: v for k, v in ops.items() if k in INTEGER_OPS}
  floats = {k: v for k, v in ops.items() if k in FLOAT_OPS}
  report = ExportReport(path, len(blob), fp32_param_bytes(qmodel), digest,
                        tuple(sorted(integer)), tuple(sorted(floats)),
                        tuple(qmodel.matmul_bits()), ('onnxruntime',), 'onnxruntime',
                        bias_rounding)
  atomic_write_json(path + '.json', {
      'format': FORMAT, 'sha256': digest, 'bytes': len(blob), 'opset': OPSET,
      'input': {'shape': ['batch'] + list(qmodel.input_shape), 'dtype': 'float32'},
      'model': qmodel.settings.get('model'),
      'bits': {p: list(b) for p, b in qmodel.bits().items()},
      'onnxruntime_integer_ops': integer, 'onnxruntime_float_ops': floats,
      'onnxruntime_ops': ops, 'fp32_param_bytes': report.fp32_param_bytes,
      'bias_rounding_max_steps': bias_rounding, 'uint8_weight_layers': slow})
  return report


SLOW_WEIGHTS = ('ONNX: %d layers (%s, ...) keep 8-bit asymmetric weights, stored as uint8 with '
                'zero points, which ONNX Runtime computes many times slower than int8 weights '
                'with zero point 0: quantize with RangeConfig(weight_symmetric=True) to deploy.')


class LoadedOnnx:
  """A verified ONNX model in an ONNX Runtime CPU session; calling it checks the input."""

  def __init__(self, path: str, meta: Dict[str, Any], threads: int = 0):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    self.session = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
    self.meta, self.path = meta, path
    self.input_shape = tuple(meta['input']['shape'][1:])

  def __call__(self, x: Any) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype != np.float32 or x.ndim != len(self.input_shape) + 1 or tuple(
        x.shape[1:]) != self.input_shape:
      raise ValueError(f'{self.path} takes float32 inputs of shape (batch, '
                       f'{", ".join(map(str, self.input_shape))}); got {x.dtype} '
                       f'{tuple(x.shape)}.')
    out = self.session.run(None, {'input': x})
    return out[0] if len(out) == 1 else out


def load_onnx(path: str, meta: Dict[str, Any]) -> LoadedOnnx:
  try:
    return LoadedOnnx(path, meta)
  except Exception as e:   # ONNX Runtime's own parse errors
    raise CheckpointError(f'{path} is not an ONNX model ONNX Runtime can run '
                          f'({type(e).__name__}); export the model again.') from e


__all__ = ['FORMAT', 'INTEGER_OPS', 'LoadedOnnx', 'export_onnx', 'float_onnx_model',
           'load_onnx', 'onnx_model', 'traced_onnx',
           'qdq_program', 'runtime_ops']
