"""run.py job 'pipeline': quantize a checkpoint with the paper's pipelines, stage by stage.

Runs ``config.pipelines`` (any of 'sequential', 'light', 'advanced') and prints one
table: FP32, then every stage of every pipeline (cumulative), with test top-1, weight
size and wall time. Writes ``results.json``, ``results.md``, ``layers.png`` (the
per-layer AdaQuant reconstruction error before and after, when AdaQuant ran) and
``quantized.msgpack`` (the last pipeline's final model) to the work dir.
"""

from __future__ import annotations

import io
import os
from typing import Any, Dict, List

import jax
import ml_collections

import ptq_jax
from ptq_jax.checkpoint import atomic_write_bytes, atomic_write_json
from ptq_jax.job_inputs import load_job_inputs
from ptq_jax.results import render_markdown

STAGE_LABELS = {'ranges': 'baseline PTQ', 'adaquant': '+ AdaQuant', 'bn_tuning': '+ BN tuning',
                'bias_tuning': '+ bias tuning', 'mixed_precision': 'mixed precision'}


def run_pipelines(config: ml_collections.ConfigDict, workdir: str) -> List[Dict[str, Any]]:
  unknown = [p for p in config.pipelines if p not in ptq_jax.PIPELINES]
  if unknown or not config.pipelines:
    raise ValueError(f'config.pipelines={tuple(config.pipelines)} must name some of '
                     f'{ptq_jax.PIPELINES}.')
  inputs = load_job_inputs(config)
  model, variables, meta, calib = inputs.model, inputs.variables, inputs.meta, inputs.calib
  fp32 = inputs.fp32_top1()
  common = inputs.record_fields()
  records = [{**common, 'pipeline': '-', 'stage': 'fp32', 'w_bits': 32, 'a_bits': 32,
              'top1_pct': round(fp32, 2), 'size_pct_of_fp32': 100.0, 'seconds': 0.0}]
  q = config.quant
  adaquant = ptq_jax.AdaQuantConfig(iterations=q.iterations)
  os.makedirs(workdir, exist_ok=True)
  result = None
  for pipeline in config.pipelines:
    mixed = pipeline != 'sequential'
    label = (f'{pipeline} at {q.size_pct:g}% size' if mixed else
             f'{pipeline} at W{q.w_bits}A{q.a_bits}')
    print(f'Running the {label} pipeline on {meta["model"]} ({config.calib_size} calibration '
          'images)...', flush=True)
    result = ptq_jax.run_pipeline(
        model, variables, calib, pipeline, w_bits=q.w_bits, a_bits=q.a_bits,
        first_last_bits=q.first_last_bits or None, size_pct=q.size_pct if mixed else None,
        adaquant=adaquant, bias_steps=q.bias_steps, key=jax.random.key(config.seed),
        cache_dir=os.path.expanduser(q.cache_dir) if q.cache_dir else None,
        model_name=meta['model'], progress=True)
    fp32_bits = 32 * sum(l.params for l in result.model.layers)
    for stage in result.stages:
      top1 = inputs.top1(stage.model.predict)
      records.append({**common, 'pipeline': pipeline, 'stage': stage.name,
                      'w_bits': 'mixed' if mixed else q.w_bits,
                      'a_bits': 'mixed' if mixed else q.a_bits, 'top1_pct': round(top1, 2),
                      'size_pct_of_fp32': round(100 * stage.model.size_bits() / fp32_bits, 2),
                      'seconds': round(stage.seconds, 1)})
    adaquant_stage = [s for s in result.stages if s.name == 'adaquant']
    if adaquant_stage:
      _plot_layers(adaquant_stage[0].report, os.path.join(workdir, 'layers.png'))
  result.model.save(os.path.join(workdir, 'quantized.msgpack'))
  atomic_write_json(os.path.join(workdir, 'results.json'), records)
  atomic_write_bytes(os.path.join(workdir, 'results.md'), render_markdown(
      records, f'Pipelines: {meta["model"]}').encode())
  print(f'\n{"stage":34s} {"bits":9s} {"top-1":>7s} {"size":>8s} {"seconds":>8s}')
  for r in records:
    name = 'FP32' if r['stage'] == 'fp32' else f'{r["pipeline"]}: {STAGE_LABELS[r["stage"]]}'
    bits = f'W{r["w_bits"]}A{r["a_bits"]}' if r['w_bits'] != 'mixed' else 'mixed'
    print(f'{name:34s} {bits:9s} {r["top1_pct"]:6.2f}% {r["size_pct_of_fp32"]:7.2f}% '
          f'{r["seconds"]:8.1f}')
  print(f'Wrote results.json, results.md, quantized.msgpack'
        f'{", layers.png" if os.path.exists(os.path.join(workdir, "layers.png")) else ""} '
        f'to {workdir}')
  return records


def _plot_layers(reports, path: str) -> None:
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
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=110)
  plt.close(fig)
  atomic_write_bytes(path, buffer.getvalue())
