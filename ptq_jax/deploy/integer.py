"""Each quantized layer as integers, and its output computed from them.

:func:`integer_layer` turns one layer's quantization state into what a deployed model
stores: unsigned weight codes (two per byte at 4 bits or fewer), per-output-channel
scales and zero points, the float bias, and per call site the input's scale and zero
point. :func:`integer_output` computes the layer from those alone, inside a traced
program: the input's codes minus its zero point and the weights' codes minus theirs,
one integer convolution or matmul accumulating in int32 (``preferred_element_type``),
then one rescale by ``s_x * s_w`` and the bias. It is the simulation's
``f(Q(W) Q(x) + b)`` with the sum taken exactly in integers instead of in float32.

Operand width: codes minus zero points lie in ``[-(2^b - 1), 2^b - 1]``, so operands
of 7 bits or fewer are int8; an 8-bit operand (asymmetric) is int16, and int16 x int16
still accumulates exactly in int32. A layer whose weights or inputs the user kept
float computes in float32 from its dequantized codes.

Per backend (``jax.lax.platform_dependent``, one program for both): XLA's CPU backend
runs integer convolutions several times slower than float ones, so on CPU
(``cpu='float'``, the default) a layer computes the simulation's own float formula,
``conv(s_x c_x, s_w c_w) + b``, from the same stored codes; everywhere else, and on CPU
with ``cpu='integer'``, in integers as above.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ptq_jax.linear import LayerGeometry, apply_linear
from ptq_jax.quant.attention import (MIX, OPERANDS, SCORES, AttentionQuant,
                                    attention_probs, check_heads, quantized_attention)
from ptq_jax.quant.interceptor import (LayerQuant, layer_forward, layer_geometry,
                                       smoothed_kernel)
from ptq_jax.quant.export import pack_codes, unsigned_codes
from ptq_jax.quant.matmuls import MatmulQuant
from ptq_jax.quant.quantizer import QuantizerState, reshape_for, scale_and_zero_point


@dataclasses.dataclass(frozen=True)
class InputCodes:
  """How one call site quantizes its input: ``clip(round(x / scale) + zero_point, 0,
  code_max)``."""

  scale: np.float32
  zero_point: int
  code_max: int
  bits: int


@dataclasses.dataclass(frozen=True)
class IntegerLayer:
  """What a deployed model keeps of one layer (numpy, host side)."""

  path: str
  kernel_shape: Tuple[int, ...]
  w_bits: Optional[int]                 # None: the weights stay float (``float_kernel``)
  packed_codes: Optional[np.ndarray]    # uint8: one code per byte, or two at <= 4 bits
  w_scale: Optional[np.ndarray]         # float32 (C,)
  w_zero_point: Optional[np.ndarray]    # int32 (C,)
  float_kernel: Optional[np.ndarray]    # float32, only where weights are not quantized
  bias: np.ndarray                      # float32 (C,)
  smooth: Optional[np.ndarray]          # inputs divided by it before quantizing
  inputs: Tuple[Optional[InputCodes], ...]   # per call site; None: float input


def input_codes(q: QuantizerState) -> InputCodes:
  """:class:`InputCodes` of a per-tensor quantizer (symmetric codes -qmax..qmax held as
  0..2 qmax around the zero point qmax); array-valued, so it also works inside a
  traced program."""
  s, zp = scale_and_zero_point(q)
  if q.symmetric:
    qmax = 2**(q.bits - 1) - 1
    return InputCodes(s, qmax, 2 * qmax, q.bits)
  return InputCodes(s, jnp.round(zp), q.levels, q.bits)


def host_input_codes(q: Optional[QuantizerState], path: str) -> Optional[InputCodes]:
  """A call site's input codes as host constants (None: a float input)."""
  if q is None:
    return None
  if np.ndim(q.range):
    raise ValueError(f'Layer {path} has per-channel input quantizers, whose scales an integer '
                     'kernel cannot apply after accumulating: quantize with '
                     'RangeConfig(per_channel_inputs=False) to export it.')
  codes = input_codes(q)
  return dataclasses.replace(codes, scale=np.float32(codes.scale),
                             zero_point=int(codes.zero_point))


def integer_layer(path: str, lq: LayerQuant) -> IntegerLayer:
  """The integer record of one layer's state (every call site's input quantizer too)."""
  kernel = smoothed_kernel(lq)
  sites = (lq.a_quant,) + tuple(lq.site_a_quants)
  inputs = tuple(host_input_codes(q, path) for q in sites)
  bias = np.asarray(lq.bias, np.float32)
  smooth = None if lq.smooth is None else np.asarray(lq.smooth, np.float32)
  if lq.w_quant is None:
    return IntegerLayer(path, tuple(kernel.shape), None, None, None, None,
                        np.asarray(kernel, np.float32), bias, smooth, inputs)
  q = reshape_for(lq.w_quant, kernel.ndim)
  codes, s, zp = unsigned_codes(kernel, q)
  per_channel = lambda a, dtype: np.broadcast_to(np.asarray(a, dtype).reshape(-1),
                                                 (kernel.shape[-1],)).copy()
  return IntegerLayer(path, tuple(kernel.shape), q.bits, pack_codes(codes, q.bits),
                      per_channel(s, np.float32), per_channel(zp, np.int32), None, bias, smooth,
                      inputs)


def _operand_dtype(bits: int):
  return jnp.int8 if bits <= 7 else jnp.int16


def centered_weights(layer: IntegerLayer) -> jnp.ndarray:
  """The weight codes minus their zero points (int16), unpacked inside the program."""
  packed = jnp.asarray(layer.packed_codes)
  count = int(np.prod(layer.kernel_shape))
  if layer.w_bits <= 4:
    packed = jnp.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(-1)[:count]
  codes = packed.reshape(layer.kernel_shape).astype(jnp.int16)
  return codes - jnp.asarray(layer.w_zero_point, jnp.int16)


def _kernel(layer: IntegerLayer) -> jnp.ndarray:
  """The float kernel the layer computes with: its codes times their scales, or its
  float kernel where the weights are not quantized."""
  if layer.w_bits is None:
    return jnp.asarray(layer.float_kernel)
  return centered_weights(layer).astype(jnp.float32) * jnp.asarray(layer.w_scale)


def dequantized_weights(layer: IntegerLayer) -> jnp.ndarray:
  """The float kernel the layer's codes stand for, divided back by any smoothing: what
  a tied layer writes into the parameter it shares."""
  kernel = _kernel(layer)
  return kernel if layer.smooth is None else kernel / jnp.asarray(layer.smooth)[:, None]


def centered_input(codes: InputCodes, x: jnp.ndarray) -> jnp.ndarray:
  """The input's codes minus its zero point (int32), exactly as the simulation rounds:
  ``clip(round(x / s) + zp, 0, code_max) - zp``."""
  q = jnp.clip(jnp.round(x / codes.scale) + codes.zero_point, 0, codes.code_max)
  return (q - codes.zero_point).astype(jnp.int32)


CPU_ARITHMETIC = ('float', 'integer')


def contract(linear, cx: jnp.ndarray, cw: jnp.ndarray, sx, sw, bits: int,
             cpu: str = 'float') -> jnp.ndarray:
  """``linear`` (``(a, b, preferred_element_type) -> out``) of two quantized operands
  given as centered codes ``cx``, ``cw`` and steps ``sx``, ``sw`` (``sw`` along the
  last axis), as float32. Integers: int8 (int16 above 7 bits) operands accumulated in
  int32, then ``acc * (sx * sw)``. On CPU with ``cpu='float'``: the simulation's own
  float formula on the same codes, ``linear(sx * cx, sw * cw)``."""
  dtype = _operand_dtype(bits)

  def integer(cx, cw):
    acc = linear(cx.astype(dtype), cw.astype(dtype), jnp.int32).astype(jnp.float32)
    return acc * (sx * sw)

  def floating(cx, cw):
    return linear(sx * cx.astype(jnp.float32), sw * cw.astype(jnp.float32), None)
  if cpu == 'integer':
    return integer(cx, cw)
  return jax.lax.platform_dependent(cx, cw, cpu=floating, default=integer)


def integer_output(layer: IntegerLayer, module: nn.Module, x: jnp.ndarray,
                   site: int, cpu: str = 'float') -> jnp.ndarray:
  """The layer's output at call ``site`` (before any activation) from its integers
  (``cpu``: how CPU computes, :func:`contract`)."""
  x = jnp.asarray(x, jnp.float32)
  if layer.smooth is not None:
    x = x / jnp.asarray(layer.smooth)
  codes = layer.inputs[site]
  geom = layer_geometry(module, x.shape, layer.kernel_shape)
  if layer.w_bits is None or codes is None or geom is None:
    return _float_output(layer, module, x, codes)
  linear = lambda a, b, acc_type: apply_linear(geom, a, b, preferred_element_type=acc_type)
  return contract(linear, centered_input(codes, x), centered_weights(layer), codes.scale,
                  jnp.asarray(layer.w_scale), max(layer.w_bits, codes.bits),
                  cpu) + jnp.asarray(layer.bias)


def _float_output(layer: IntegerLayer, module: nn.Module, x: jnp.ndarray,
                  codes: Optional[InputCodes]) -> jnp.ndarray:
  """Float arithmetic on dequantized operands: a layer with float weights or inputs, or
  without a plain lax form (masked, CIRCULAR padding)."""
  if codes is not None:
    x = centered_input(codes, x).astype(jnp.float32) * codes.scale
  return layer_forward(module, x, _kernel(layer), jnp.asarray(layer.bias))


def integer_attention(query, key, value, bias=None, mask=None, *,
                      quant: Optional[AttentionQuant] = None, on_operand=None, dtype=None,
                      precision=None, is_causal: bool = False, cpu: str = 'float',
                      **unused) -> jnp.ndarray:
  """A quantized attention site from its operands' codes: ``Q·Kᵀ`` and ``attention·V``
  each one integer matmul of centered codes and one rescale; the scaling by
  ``1/sqrt(d)``, bias, mask and softmax in float, as the simulation
  (:func:`~ptq_jax.quant.attention.quantized_attention`) computes them."""
  del unused, precision
  if quant is None or on_operand is not None:
    return quantized_attention(query, key, value, bias, mask, quant=quant,
                               on_operand=on_operand, dtype=dtype, is_causal=is_causal)
  check_heads(query, key)
  codes = {name: input_codes(getattr(quant, name)) for name in OPERANDS}
  dtype = dtype or jnp.result_type(query.dtype, key.dtype)

  def matmul(equation, a, b, qa, qb):
    linear = lambda x, y, acc_type: jnp.einsum(equation, x, y, preferred_element_type=acc_type)
    return contract(linear, centered_input(codes[qa], a), centered_input(codes[qb], b),
                    codes[qa].scale, codes[qb].scale, max(codes[qa].bits, codes[qb].bits), cpu)

  # (The simulation scales the dequantized query by 1/sqrt(d) before Q·Kᵀ; here the
  # product is scaled after, which differs by float32 rounding only.)
  scores = matmul(SCORES, query, key, 'q', 'k') / jnp.sqrt(query.shape[-1]).astype(dtype)
  probs = attention_probs(scores.astype(dtype), bias, mask, is_causal, dtype)
  return matmul(MIX, probs, value, 'probs', 'v').astype(dtype)


def integer_matmul(quant: MatmulQuant, lhs: jnp.ndarray, rhs: jnp.ndarray, dot,
                   cpu: str = 'float') -> jnp.ndarray:
  """A quantized matmul site from its operands' codes: one integer ``dot_general`` of
  centered codes (the site's own, ``dot``) and one rescale, as
  :func:`~ptq_jax.quant.matmuls.quantized_matmul` computes it in float."""
  a, b = input_codes(quant.lhs), input_codes(quant.rhs)
  linear = lambda x, y, acc_type: dot(x, y, preferred_element_type=acc_type)
  return contract(linear, centered_input(a, lhs), centered_input(b, rhs), a.scale, b.scale,
                  max(a.bits, b.bits), cpu)


def uses_integer_arithmetic(layer: IntegerLayer, geometry: Optional[LayerGeometry]) -> bool:
  """Whether every call of the layer computes in integers (else some call is float)."""
  return (layer.w_bits is not None and geometry is not None
          and all(c is not None for c in layer.inputs))
