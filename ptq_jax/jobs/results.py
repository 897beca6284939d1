"""Results files: ``NAME.json`` (a flat list of records) and ``NAME.md`` rendered from it,
and the device every record names."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence

import jax

from ptq_jax.io import atomic_write_bytes, atomic_write_json


def render_markdown(records: Sequence[Dict[str, Any]], title: str,
                    columns: Optional[Sequence[str]] = None, notes: str = '') -> str:
  """A markdown table of ``records`` (all keys, in first-seen order, unless ``columns``)."""
  if columns is None:
    columns = []
    for record in records:
      columns += [k for k in record if k not in columns]
  lines = [f'# {title}', '']
  if notes:
    lines += [notes.strip(), '']
  lines.append('| ' + ' | '.join(columns) + ' |')
  lines.append('|' + '---|' * len(columns))
  for record in records:
    cells = []
    for c in columns:
      v = record.get(c, '')
      cells.append(f'{v:,}' if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 10000
                   else f'`{v}`' if c == 'command' else str(v))
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def write_results(directory: str, name: str, records: List[Dict[str, Any]], title: str,
                  columns: Optional[Sequence[str]] = None, notes: str = '') -> None:
  """Writes ``NAME.json`` and the ``NAME.md`` rendered from it, each atomically."""
  if not records:
    raise ValueError(f'No records to write for results/{name}.')
  atomic_write_json(os.path.join(directory, f'{name}.json'), records)
  atomic_write_bytes(os.path.join(directory, f'{name}.md'),
                     render_markdown(records, title, columns, notes).encode())


def read_results(directory: str, name: str) -> List[Dict[str, Any]]:
  with open(os.path.join(directory, f'{name}.json')) as f:
    return json.load(f)


def describe_device() -> str:
  """e.g. 'cpu (2 cores)' or 'NVIDIA H200 x1'."""
  devices = jax.devices()
  if devices[0].platform == 'cpu':
    return f'cpu ({os.cpu_count()} cores)'
  return f'{devices[0].device_kind} x{len(devices)}'
