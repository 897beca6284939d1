"""Deployable artifacts of a quantized model: the whole network with integer weights and
integer arithmetic, runnable without ptq_jax: a ``jax.export`` program
(:mod:`.jax_artifact`) or an ONNX QDQ model for ONNX Runtime (:mod:`.onnx_artifact`,
needs the ``onnx`` extra)."""

from __future__ import annotations

from typing import Any

from ptq_jax.deploy.jax_artifact import (FORMAT as JAX_FORMAT, ExportReport, LoadedProgram,
                                         export_jax, load_jax, verified_record)

FORMATS = ('jax', 'onnx')
ONNX_FORMAT = 'ptq_jax.onnx/1'


def _onnx_module():
  try:
    from ptq_jax.deploy import onnx_artifact   # onnx and onnxruntime: an optional extra
  except ImportError as e:
    raise ImportError(f'format="onnx" needs the onnx and onnxruntime packages ({e}); install '
                      "them with pip install 'ptq_jax[onnx]'.") from e
  return onnx_artifact


def export(qmodel: Any, path: str, format: str = 'jax',  # pylint: disable=redefined-builtin
           cpu: str = 'float') -> ExportReport:
  """Writes ``qmodel`` (a :class:`~ptq_jax.QuantizedModel`) as a deployable artifact
  (README, "Deploy"): ``format='jax'``, a ``jax.export`` program of the whole network
  whose weights are integer codes; ``format='onnx'``, an ONNX model in QDQ form for
  ONNX Runtime. ``cpu`` (jax only): on CPU, contract the integer operands in float32
  ('float', fast on XLA's CPU backend) or int32 ('integer'); other backends always use
  integers. Returns what was written and how it computes."""
  if format not in FORMATS:
    raise ValueError(f'format={format!r} is not one of {FORMATS}.')
  if format == 'onnx':
    return _onnx_module().export_onnx(qmodel, path)
  return export_jax(qmodel, path, cpu=cpu)


def load_exported(path: str) -> Any:
  """The artifact at ``path``, checked against the SHA-256 in ``path.json``: a callable
  ``x -> outputs`` (a :class:`LoadedProgram` for jax, an ONNX Runtime session wrapper
  for onnx) that checks its input. A missing, truncated or edited file is a
  :class:`~ptq_jax.checkpoint.CheckpointError`."""
  blob, meta = verified_record(path, (JAX_FORMAT, ONNX_FORMAT))
  if meta['format'] == ONNX_FORMAT:
    return _onnx_module().load_onnx(path, meta)
  return load_jax(path, blob, meta)


__all__ = ['FORMATS', 'ExportReport', 'LoadedProgram', 'export', 'load_exported']
