"""The whole quantized network as one ``jax.export`` program (``format='jax'``).

The program is the model run under the library's interceptor with every quantized
layer computed from its integers (:mod:`ptq_jax.deploy.integer`): the weight codes,
scales, zero points and biases are constants of the program, so the serialized file
holds the weights as codes (packed two per byte at 4 bits or fewer) and nothing float
but scales, biases and what the user kept float (unfolded BatchNorms, float layers);
attention sites (``quantize_matmuls``) compute their two matmuls from operand codes too,
their softmax in float. The batch dimension is symbolic; the program
is lowered for CPU and CUDA at once.

Beside the program, ``PATH.json`` records its SHA-256, input signature and what it
holds; :func:`load_exported` checks both before it returns a callable that checks its
input. The program itself needs only jax to run (README, "Deploy").
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
from typing import Any, Callable, Dict, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import export as jax_export

from ptq_jax.checkpoint import CheckpointError
from ptq_jax.deploy.integer import (CPU_ARITHMETIC, IntegerLayer, dequantized_weights,
                                    integer_attention,
                                    integer_layer, integer_matmul, integer_output,
                                    uses_integer_arithmetic)
from ptq_jax.io import atomic_write_bytes, atomic_write_json, check_output_file
from ptq_jax.quant.interceptor import apply_quantized, layer_states

PLATFORMS = ('cpu', 'cuda')
FORMAT = 'ptq_jax.jax_export/1'


@dataclasses.dataclass(frozen=True)
class ExportReport:
  """What an export wrote: the program, its sidecar, sizes and the arithmetic used."""

  path: str
  bytes: int
  fp32_param_bytes: int
  sha256: str
  integer_layers: Tuple[str, ...]     # every call computed in integers
  float_layers: Tuple[str, ...]       # some call computed in float (kept float, no lax form)
  integer_attention: Tuple[str, ...]  # attention and matmul sites computed in integers
  platforms: Tuple[str, ...]
  cpu_arithmetic: str = 'float'       # integers contracted in float32 on CPU, or in int32
  bias_rounding: float = 0.0          # ONNX: largest change of a bias on its int32 grid, in steps

  @property
  def size_ratio(self) -> float:
    """Artifact bytes over the FP32 parameters' bytes."""
    return self.bytes / max(self.fp32_param_bytes, 1)


def integer_program(qmodel: Any, cpu: str = 'float'
                    ) -> Tuple[Callable[[jnp.ndarray], jnp.ndarray], Dict[str, IntegerLayer]]:
  """``x -> logits`` computed from the quantized model's integers, and those integers
  (``cpu``: how CPU contracts them, :func:`ptq_jax.deploy.integer.contract`)."""
  if cpu not in CPU_ARITHMETIC:
    raise ValueError(f'cpu={cpu!r} is not one of {CPU_ARITHMETIC}.')
  layers = {p: integer_layer(p, lq) for p, lq in layer_states(qmodel.qstate).items()}
  model, variables, qstate, folded = (qmodel.model, qmodel.variables, qmodel.qstate,
                                      qmodel.folded_bns)

  def layer_output(path, module, x, site):
    return integer_output(layers[path], module, x, site, cpu)

  attention = functools.partial(integer_attention, cpu=cpu)
  matmul = functools.partial(integer_matmul, cpu=cpu)

  def forward(x):   # (the layers' float kernels are never read, so never in the program)
    return apply_quantized(model, variables, qstate, folded, x, layer_output=layer_output,
                           attention_fn=attention, matmul=matmul,
                           tied_weight=lambda path, lq: dequantized_weights(layers[path]))
  return forward, layers


def export_jax(qmodel: Any, path: str, platforms: Sequence[str] = PLATFORMS,
               cpu: str = 'float') -> ExportReport:
  """Writes the quantized network as a ``jax.export`` program to ``path`` (and
  ``path.json`` beside it); see the module docstring. ``cpu``: how the program
  contracts the integer operands on CPU ('float': fast; 'integer')."""
  check_output_file(path, 'export path')
  check_output_file(path + '.json', 'export path')
  forward, layers = integer_program(qmodel, cpu)
  batch, = jax_export.symbolic_shape('batch')
  spec = jax.ShapeDtypeStruct((batch,) + tuple(qmodel.input_shape), jnp.float32)
  try:
    with _short_locations():
      exported = jax_export.export(jax.jit(forward), platforms=tuple(platforms))(spec)
  except Exception as e:   # a layer the traced program cannot express
    raise ValueError(f'The quantized model could not be exported as one jax program: '
                     f'{type(e).__name__}: {str(e)[:400]}') from e
  blob = bytes(exported.serialize())
  digest = hashlib.sha256(blob).hexdigest()
  integer, floats = _arithmetic(qmodel, layers)
  report = ExportReport(path, len(blob), fp32_param_bytes(qmodel), digest, integer, floats,
                        tuple(qmodel.matmul_bits()), tuple(platforms), cpu)
  atomic_write_bytes(path, blob)
  atomic_write_json(path + '.json', {
      'format': FORMAT, 'sha256': digest, 'bytes': len(blob),
      'input': {'shape': ['batch'] + list(qmodel.input_shape), 'dtype': 'float32'},
      'output_shape': [str(d) for d in exported.out_avals[0].shape],
      'platforms': list(platforms), 'cpu_arithmetic': cpu, 'model': qmodel.settings.get('model'),
      'bits': {p: list(b) for p, b in qmodel.bits().items()},
      'integer_layers': list(integer), 'float_layers': list(floats),
      'integer_attention': list(report.integer_attention),
      'fp32_param_bytes': report.fp32_param_bytes})
  return report


@contextlib.contextmanager
def _short_locations():
  """Source locations in the program without Python tracebacks (they would be about a
  tenth of a small model's artifact); jax's setting is restored afterwards."""
  name = 'jax_include_full_tracebacks_in_locations'
  previous = getattr(jax.config, name, None)
  if previous is None:   # (a jax without the setting: nothing to shorten)
    yield
    return
  jax.config.update(name, False)
  try:
    yield
  finally:
    jax.config.update(name, previous)


def _arithmetic(qmodel: Any, layers: Dict[str, IntegerLayer]) -> Tuple[Tuple[str, ...], ...]:
  """(layers computed in integers, layers with some float call)."""
  integer = [l.path for l in qmodel.layers if uses_integer_arithmetic(layers[l.path], l.geometry)]
  return tuple(integer), tuple(l.path for l in qmodel.layers if l.path not in integer)


def fp32_param_bytes(qmodel: Any) -> int:
  return 4 * sum(int(np.size(v)) for v in jax.tree.leaves(qmodel.variables.get('params', {})))


class LoadedProgram:
  """A verified exported program; calling it checks the input against its signature."""

  def __init__(self, exported: jax_export.Exported, meta: Dict[str, Any], path: str):
    self.exported, self.meta, self.path = exported, meta, path
    self.input_shape = tuple(exported.in_avals[0].shape[1:])

  def __call__(self, x: Any) -> jnp.ndarray:
    x = np.asarray(x) if not isinstance(x, jax.Array) else x
    if x.dtype != np.float32 or x.ndim != len(self.input_shape) + 1 or tuple(
        x.shape[1:]) != self.input_shape:
      raise ValueError(f'{self.path} takes float32 inputs of shape (batch, '
                       f'{", ".join(map(str, self.input_shape))}); got {x.dtype} '
                       f'{tuple(x.shape)}.')
    return self.exported.call(x)


def verified_record(path: str, formats: Sequence[str]) -> Tuple[bytes, Dict[str, Any]]:
  """(the artifact's bytes, its sidecar ``path.json``), the SHA-256 checked; a missing,
  truncated or edited file is a :class:`~ptq_jax.checkpoint.CheckpointError`."""
  fix = 'export the model again (ptq_jax.export)'
  if not os.path.isfile(path):
    raise CheckpointError(f'{path} does not exist; {fix}.')
  try:
    with open(path + '.json') as f:
      meta = json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointError(f'{path}.json (the checksum beside the artifact) is missing or not '
                          f'JSON ({e}); {fix}.') from e
  with open(path, 'rb') as f:
    blob = f.read()
  if not isinstance(meta, dict) or meta.get('format') not in formats:
    raise CheckpointError(f'{path}.json is not a ptq_jax export record; {fix}.')
  if hashlib.sha256(blob).hexdigest() != meta.get('sha256'):
    raise CheckpointError(f'{path} does not match the SHA-256 in {path}.json (truncated or '
                          f'edited); {fix}.')
  return blob, meta


def load_jax(path: str, blob: bytes, meta: Dict[str, Any]) -> LoadedProgram:
  """The verified program ``blob`` read from ``path``, ready to call."""
  try:
    exported = jax_export.deserialize(bytearray(blob))
  except Exception as e:
    raise CheckpointError(f'{path} is not a jax.export program ({type(e).__name__}); '
                          'export the model again (ptq_jax.export).') from e
  return LoadedProgram(exported, meta, path)


__all__ = ['FORMAT', 'ExportReport', 'LoadedProgram', 'export_jax', 'fp32_param_bytes',
           'integer_program', 'load_jax', 'verified_record']
