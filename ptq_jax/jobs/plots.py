"""The figures the run.py jobs write: accuracy per stage, per-layer AdaQuant error.

matplotlib is imported when a figure is drawn (with the non-interactive Agg backend),
so importing this module changes nothing for a notebook's plots."""

from __future__ import annotations

import io
from typing import Any, Dict, List

from ptq_jax.io import atomic_write_bytes

STAGE_LABELS = {'ranges': 'baseline PTQ', 'adaquant': '+ AdaQuant', 'bn_tuning': '+ BN tuning',
                'bias_tuning': '+ bias tuning', 'mixed_precision': 'mixed precision'}


def plot_stages(records: List[Dict[str, Any]], path: str) -> None:
  """Test top-1 after each stage of each run, FP32 as a line."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  rows = [r for r in records if r['stage'] != 'fp32']
  fig, ax = plt.subplots(figsize=(max(5, 0.55 * len(rows)), 3.5))
  ax.bar(range(len(rows)), [r['top1_pct'] for r in rows], color='tab:blue')
  ax.axhline(records[0]['top1_pct'], color='k', ls='--', lw=1, label='FP32')
  low = min(r['top1_pct'] for r in records)
  ax.set_ylim(max(0.0, low - 2), min(100.0, records[0]['top1_pct'] + 1))
  ax.set_xticks(range(len(rows)), [f'{r["run"]}\n{STAGE_LABELS[r["stage"]]}' for r in rows],
                rotation=60, ha='right', fontsize=7)
  ax.set_ylabel('test top-1 (%)')
  ax.legend()
  save_figure(fig, path)


def plot_layers(reports, path: str) -> None:
  """Per-layer relative reconstruction error before and after AdaQuant."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(reports)), 3.5))
  xs = range(len(reports))
  ax.semilogy(xs, [r['rel_error_before'] for r in reports], 'o-', label='ranges only')
  ax.semilogy(xs, [r['rel_error_after'] for r in reports], 'o-', label='after AdaQuant')
  ax.set_xticks(list(xs), [r['path'] for r in reports], rotation=90, fontsize=6)
  ax.set_ylabel('relative MSE of layer output')
  ax.legend()
  save_figure(fig, path)


def save_figure(fig, path: str) -> None:
  """Writes ``fig`` as a PNG atomically and closes it."""
  import matplotlib.pyplot as plt
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=110)
  plt.close(fig)
  atomic_write_bytes(path, buffer.getvalue())
