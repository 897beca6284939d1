"""Integer export and an integer-arithmetic reference for one layer.

``export_integer`` writes, per layer, the unsigned weight codes (two 4-bit-or-less
codes per byte), per-channel weight scales and zero points, the input scale and
zero point, the float bias and the conv geometry, atomically. Symmetric
quantizers are stored the same way with the zero point ``2^(b-1) - 1``.

``integer_layer_output`` recomputes a layer from those integers alone: input
codes minus zero point, weight codes minus zero points, an int32-accumulating
``lax.conv_general_dilated`` / ``lax.dot_general``, then one float rescale and the
bias. It equals the fake-quantized layer up to float rounding.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Tuple

import jax.numpy as jnp
import numpy as np

from ptq_jax import checkpoint as ckpt
from ptq_jax.linear import LayerGeometry, apply_linear
from ptq_jax.quant.interceptor import smoothed_kernel
from ptq_jax.quant.quantizer import QuantizerState, check_bits, quantize_to_int, reshape_for, \
    scale_and_zero_point


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
  """Unsigned codes -> uint8 bytes: two per byte (low nibble first) if bits <= 4."""
  codes = np.asarray(codes).astype(np.uint8).ravel()
  if codes.size and codes.max() >= 2**bits:
    raise ValueError(f'A code exceeds {bits} bits.')
  if bits > 4:
    return codes
  if codes.size % 2:
    codes = np.append(codes, np.uint8(0))
  return (codes[0::2] | (codes[1::2] << 4)).astype(np.uint8)


def unpack_codes(packed: np.ndarray, bits: int, shape: Tuple[int, ...]) -> np.ndarray:
  """Inverse of :func:`pack_codes`."""
  packed = np.asarray(packed, np.uint8)
  count = int(np.prod(shape))
  if bits <= 4:
    codes = np.empty(packed.size * 2, np.uint8)
    codes[0::2], codes[1::2] = packed & 0x0F, packed >> 4
    packed = codes
  if packed.size < count:
    raise ckpt.CheckpointError(f'Packed weights hold {packed.size} codes, shape {shape} needs '
                               f'{count}: the export is corrupt.')
  return packed[:count].reshape(shape)


def unsigned_codes(x: jnp.ndarray, q: QuantizerState) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(codes in [0, 2^b - 1], scale, zero point) of ``x`` under ``q``."""
  s, zp = scale_and_zero_point(q)
  codes = quantize_to_int(x, q)
  if q.symmetric:
    zp = jnp.full_like(s, 2**(q.bits - 1) - 1)
    codes = codes + zp.astype(jnp.int32)
  return np.asarray(codes), np.asarray(s, np.float32), np.asarray(jnp.round(zp), np.int32)


def layer_export(layer, lq) -> Dict[str, Any]:
  """The integer record of one layer (see module docstring)."""
  if lq.w_quant is None or lq.a_quant is None:
    raise ValueError(f'Layer {layer.path} keeps float weights or inputs; integer export needs '
                     'every layer quantized (set w_bits and a_bits for it).')
  if lq.a_quant.range.ndim:
    raise ValueError(f'Layer {layer.path} has per-channel input quantizers, which an integer '
                     'kernel cannot rescale after accumulation; quantize with '
                     'per_channel_inputs=False to export.')
  if layer.geometry is None:
    raise ValueError(f'Layer {layer.path} (masked, or CIRCULAR/CAUSAL padding) has no plain '
                     'integer conv equivalent to export.')
  if layer.sites > 1:
    raise ValueError(f'Layer {layer.path} is called at {layer.sites} sites (shared weights), '
                     'each with its own input quantizer, which one export record cannot hold.')
  w_q = reshape_for(lq.w_quant, lq.kernel.ndim)
  w_codes, w_scale, w_zp = unsigned_codes(smoothed_kernel(lq), w_q)
  a_scale, a_zp = (np.asarray(v) for v in scale_and_zero_point(lq.a_quant))
  a_code_max = lq.a_quant.levels
  if lq.a_quant.symmetric:  # codes -qmax..qmax stored as 0..2 qmax
    a_zp = np.asarray(2**(lq.a_quant.bits - 1) - 1)
    a_code_max = 2 * int(a_zp)
  record = {
      'kind': layer.kind, 'kernel_shape': np.asarray(lq.kernel.shape, np.int64),
      'w_bits': lq.w_quant.bits, 'a_bits': lq.a_quant.bits,
      'w_codes': pack_codes(w_codes, lq.w_quant.bits),
      'w_scale': w_scale.reshape(-1), 'w_zero_point': w_zp.reshape(-1),
      'a_scale': np.float32(a_scale), 'a_zero_point': np.int32(np.round(a_zp)),
      'a_code_max': np.int32(a_code_max),
      'bias': np.asarray(lq.bias, np.float32), 'groups': layer.groups,
  }
  if lq.smooth is not None:   # inputs are divided by it before quantizing (SmoothQuant)
    record['input_divisor'] = np.asarray(lq.smooth, np.float32)
  geom = layer.geometry
  if geom.kind == 'einsum':
    record['equation'] = geom.equation
  if geom.kind == 'conv':
    record.update(strides=np.asarray(geom.strides), padding=np.asarray(geom.padding),
                  kernel_dilation=np.asarray(geom.kernel_dilation),
                  input_dilation=np.asarray(geom.input_dilation))
  return record


def record_geometry(record: Mapping[str, Any]) -> LayerGeometry:
  """The :class:`LayerGeometry` stored in an export record."""
  if str(record['kind']) == 'dense':
    return LayerGeometry('dense')
  if str(record['kind']) == 'einsum':
    return LayerGeometry('einsum', equation=str(record['equation']))
  ints = lambda key: tuple(int(v) for v in np.asarray(record[key]))
  return LayerGeometry('conv', ints('strides'),
                       tuple(tuple(int(v) for v in p) for p in np.asarray(record['padding'])),
                       ints('kernel_dilation'), ints('input_dilation'), int(record['groups']))


def export_integer(qmodel, path: str) -> Dict[str, Dict[str, Any]]:
  """Writes every layer's integer record to ``path`` (atomically) and returns them."""
  if qmodel.matmul_bits():
    raise ValueError('The integer export holds conv/dense layers only, and this model also '
                     'quantizes its attention matmuls (quantize_matmuls=True): export a model '
                     'quantized without quantize_matmuls.')
  records = {l.path: layer_export(l, qmodel.qstate[l.path]) for l in qmodel.layers}
  ckpt.save_checkpoint(path, records, {'kind': 'integer', 'layers': list(records)})
  return records


def load_integer(path: str) -> Dict[str, Dict[str, Any]]:
  """Reads an integer export (checksum, bits, shapes and scales verified); layer order
  is preserved."""
  fix = 'export the quantized model again'
  tree, meta = ckpt.load_checkpoint(path, fix=fix)
  layers = meta.get('layers')
  if meta.get('kind') != 'integer' or not isinstance(layers, list) or set(layers) != set(tree):
    raise ckpt.CheckpointError(f'{path} is not an integer export (written by export_integer).')
  for name in layers:
    _check_record(tree[name], f'{path}: layer {name}', fix)
  return {p: tree[p] for p in layers}


_RECORD_KEYS = ('kind', 'kernel_shape', 'w_bits', 'a_bits', 'w_codes', 'w_scale', 'w_zero_point',
                'a_scale', 'a_zero_point', 'a_code_max', 'bias', 'groups')


def _check_record(record: Any, where: str, fix: str) -> None:
  """Raises CheckpointError unless ``record`` is a well-formed export record."""
  def bad(what):
    return ckpt.CheckpointError(f'{where}: {what}; {fix}.')
  if not isinstance(record, dict) or any(k not in record for k in _RECORD_KEYS):
    raise bad(f'a record needs the fields {list(_RECORD_KEYS)}')
  if record['kind'] not in ('conv', 'dense', 'einsum') or (record['kind'] == 'conv' and any(
      k not in record for k in ('strides', 'padding', 'kernel_dilation', 'input_dilation'))
      ) or (record['kind'] == 'einsum' and not isinstance(record.get('equation'), str)):
    raise bad(f'kind {record["kind"]!r} is not conv/dense/einsum, or its geometry is missing')
  try:
    bits = [check_bits(int(record[k]), k) for k in ('w_bits', 'a_bits')]
  except (TypeError, ValueError) as e:
    raise bad(str(e)) from e
  shape = np.asarray(record['kernel_shape'])
  if shape.dtype.kind not in 'iu' or shape.ndim != 1 or not shape.size or shape.min() < 1:
    raise bad(f'kernel_shape {shape.tolist()} is not a list of positive sizes')
  out, count = int(shape[-1]), int(np.prod(shape))
  codes = np.asarray(record['w_codes'])
  need = count if bits[0] > 4 else (count + 1) // 2
  if codes.dtype != np.uint8 or codes.shape != (need,):
    raise bad(f'w_codes is {codes.dtype}{list(codes.shape)}, expected uint8[{need}]')
  for key, size in (('w_scale', out), ('w_zero_point', out), ('bias', out), ('a_scale', 1),
                    ('a_zero_point', 1), ('a_code_max', 1)):
    value = np.asarray(record[key])
    if value.size != size or not np.all(np.isfinite(value)):
      raise bad(f'{key} must hold {size} finite values')
  if np.any(np.asarray(record['w_scale']) <= 0) or float(record['a_scale']) <= 0:
    raise bad('scales must be positive')
  if 'input_divisor' in record:
    divisor = np.asarray(record['input_divisor'])
    if divisor.shape != (int(shape[0]),) or not np.all(np.isfinite(divisor) & (divisor > 0)):
      raise bad(f'input_divisor must hold {int(shape[0])} finite values > 0')


def integer_layer_output(record: Mapping[str, Any], x: jnp.ndarray) -> jnp.ndarray:
  """A layer's output computed with integer arithmetic from its export record."""
  bits = int(record['w_bits'])
  shape = tuple(int(d) for d in np.asarray(record['kernel_shape']))
  w_codes = unpack_codes(np.asarray(record['w_codes']), bits, shape).astype(np.int32)
  w_int = jnp.asarray(w_codes - np.asarray(record['w_zero_point'], np.int32))
  a_scale, a_zp = jnp.float32(record['a_scale']), jnp.int32(record['a_zero_point'])
  if 'input_divisor' in record:
    x = x / jnp.asarray(record['input_divisor'], jnp.float32)
  x_int = jnp.clip(jnp.round(x / a_scale).astype(jnp.int32) + a_zp, 0,
                   jnp.int32(record['a_code_max'])) - a_zp
  acc = apply_linear(record_geometry(record), x_int, w_int, preferred_element_type=jnp.int32)
  scale = a_scale * jnp.asarray(record['w_scale'], jnp.float32)
  return acc.astype(jnp.float32) * scale + jnp.asarray(record['bias'], jnp.float32)
