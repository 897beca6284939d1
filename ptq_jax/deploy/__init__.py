"""Deployable artifacts of a quantized model: the whole network with integer weights and
integer arithmetic, runnable without ptq_jax (:mod:`.jax_artifact`)."""

from __future__ import annotations

from typing import Any

from ptq_jax.deploy.jax_artifact import ExportReport, LoadedProgram, export_jax, load_exported

FORMATS = ('jax',)


def export(qmodel: Any, path: str, format: str = 'jax',  # pylint: disable=redefined-builtin
           cpu: str = 'float') -> ExportReport:
  """Writes ``qmodel`` (a :class:`~ptq_jax.QuantizedModel`) as a deployable artifact:
  ``format='jax'``, a ``jax.export`` program of the whole network whose weights are
  integer codes (README, "Deploy"). ``cpu``: on CPU, contract the integer operands in
  float32 ('float', fast on XLA's CPU backend) or int32 ('integer'); other backends
  always use integers. Returns what was written and how it computes."""
  if format not in FORMATS:
    raise ValueError(f'format={format!r} is not one of {FORMATS}.')
  return export_jax(qmodel, path, cpu=cpu)


__all__ = ['FORMATS', 'ExportReport', 'LoadedProgram', 'export', 'load_exported']
