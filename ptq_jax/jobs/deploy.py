"""The jobs' deployable artifacts: which formats a config asks for, and writing them
among the run's outputs (so the manifest lists them)."""

from __future__ import annotations

from typing import Any, List, Tuple

from ptq_jax.deploy import FORMATS, export
from ptq_jax.jobs.outputs import RunOutputs

FILES = {'jax': 'quantized.jaxexport', 'onnx': 'quantized.onnx'}


def export_formats(config: Any) -> Tuple[str, ...]:
  """The formats in ``config.export`` ('jax', 'onnx', both comma-separated, '' for none),
  checked before any work."""
  text = config.get('export', '')
  if not isinstance(text, str):
    raise ValueError(f'config.export must be a string such as "jax" or "" (none), got '
                     f'{text!r}.')
  formats = tuple(f.strip() for f in text.split(',') if f.strip())
  unknown = [f for f in formats if f not in FORMATS]
  if unknown:
    raise ValueError(f'config.export names {unknown}; the formats are {list(FORMATS)} '
                     '(or "" for none).')
  return formats


def write_artifacts(qmodel: Any, out: RunOutputs, formats: Tuple[str, ...]) -> List[str]:
  """Exports ``qmodel`` in each format into the run's outputs; returns the file names."""
  names = []
  for fmt in formats:
    name = FILES[fmt]
    export(qmodel, out.path(name), format=fmt)
    out.path(name + '.json')   # (written beside it by the export; listed in the manifest)
    names += [name, name + '.json']
  return names
