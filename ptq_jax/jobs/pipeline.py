"""run.py job 'pipeline': quantize a checkpoint with the paper's pipelines, stage by stage.

Runs ``config.pipelines`` in order and prints one table: FP32, then every stage of
every run (cumulative), with test top-1, weight size and wall time. Each entry is a
pipeline name ('sequential', 'light', 'advanced': fixed bit widths ``config.quant``)
or ``NAME@SIZE`` ('light@13', 'advanced@13': mixed precision at SIZE % of the FP32
weight size). Consecutive light/advanced runs share their per-option states. Writes
``results.json``, ``results.md``, ``stages.png`` (top-1 after each stage),
``layers.png`` (the per-layer AdaQuant reconstruction error before and after, when
AdaQuant ran) and ``quantized.msgpack`` (the last run's final model) to the work dir.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List

import jax
import ml_collections

from ptq_jax.io import atomic_write_bytes, atomic_write_json
from ptq_jax.jobs.deploy import export_formats, write_artifacts
from ptq_jax.jobs.outputs import RunOutputs
from ptq_jax.jobs.inputs import load_job_inputs
from ptq_jax.jobs.plots import STAGE_LABELS, plot_layers, plot_stages
from ptq_jax.jobs.results import render_markdown
from ptq_jax.pipelines import PIPELINES, parse_run, run_label, run_pipeline
from ptq_jax.quant.quantizer import parse_option
from ptq_jax.stages.adaquant import AdaQuantConfig
from ptq_jax.stages.bias_tuning import bias_optimizer
from ptq_jax.stages.ranges import RangeConfig


def run_pipelines(config: ml_collections.ConfigDict, workdir: str) -> List[Dict[str, Any]]:
  if not config.pipelines:
    raise ValueError('config.pipelines is empty: name some of '
                     f'{PIPELINES}, e.g. ("advanced", "advanced@13").')
  runs = [parse_run(entry) for entry in config.pipelines]
  formats = export_formats(config)
  q = config.quant
  adaquant = AdaQuantConfig(iterations=q.iterations, unit=q.get('unit', 'layer'),
                            rounding=q.get('rounding', 'free'),
                            drop_prob=q.get('drop_prob', 0.0),
                            guard_holdout=q.get('guard_holdout', 0.0))   # (checked before the work)
  try:
    ranges = RangeConfig(q.get('range_method', 'minmax'))
  except ValueError as e:
    raise ValueError(f'config.quant.range_method: {e}') from None
  for bits in [(q.w_bits, q.a_bits)] + ([(q.first_last_bits,) * 2] if q.first_last_bits else []):
    parse_option(bits)
  try:
    bias_optimizer(q.get('bias_optimizer', 'sgd'))
  except ValueError as e:
    raise ValueError(f'config.quant.{e}') from None
  inputs = load_job_inputs(config)
  model, variables, meta, calib = inputs.model, inputs.variables, inputs.meta, inputs.calib
  fp32 = inputs.fp32_top1()
  common = inputs.record_fields()
  records = [{**common, 'pipeline': '-', 'stage': 'fp32', 'w_bits': 32, 'a_bits': 32,
              'top1_pct': round(fp32, 2), 'size_pct_of_fp32': 100.0, 'seconds': 0.0}]
  with RunOutputs(workdir, 'pipeline', {'model': meta['model']}) as out:
    result, shared = None, {}
    for pipeline, size_pct in runs:
      label = run_label(pipeline, size_pct, q.w_bits, q.a_bits)
      print(f'Running {label} on {meta["model"]} ({config.calib_size} calibration images)...',
            flush=True)
      result = run_pipeline(
          model, variables, calib, pipeline, w_bits=q.w_bits, a_bits=q.a_bits,
          first_last_bits=q.first_last_bits or None, size_pct=size_pct, options=q.options,
          ranges=ranges, adaquant=adaquant, bias_steps=q.bias_steps, key=jax.random.key(config.seed),
          cache_dir=os.path.expanduser(q.cache_dir) if q.cache_dir else None,
          model_name=meta['model'], mixed=shared.get(pipeline),
          bn_target=q.get('bn_target', 'data'), stage_guard=q.get('stage_guard', False),
          bias_optimizer=q.get('bias_optimizer', 'sgd'),
          progress=True)
      if result.mixed is not None:
        shared.setdefault(pipeline, result.mixed)
      records += _stage_records(result, label, size_pct is not None, q, inputs, common)
      fitted = [s for s in result.stages if s.name == 'adaquant' and s.model.layer_reports]
      if fitted:
        plot_layers(fitted[0].model.layer_reports, out.path('layers.png'))
    result.model.save(out.path('quantized.msgpack'))
    write_artifacts(result.model, out, formats)
    atomic_write_json(out.path('results.json'), records)
    atomic_write_bytes(out.path('results.md'), render_markdown(
        records, f'Pipelines: {meta["model"]}').encode())
    plot_stages(records, out.path('stages.png'))
  _print_table(records)
  total = sum(r['seconds'] for r in records)
  print(f'Stages took {total:.0f}s. Wrote {", ".join(out.names)}, manifest.json to {workdir}')
  return records


def _stage_records(result, label: str, mixed: bool, q, inputs, common) -> List[Dict[str, Any]]:
  """One record per stage of a pipeline run (test top-1, size, seconds), each printed."""
  records, fp32_bits = [], result.model.fp32_bits()
  for stage in result.stages:
    top1 = inputs.top1(stage.model.predict)
    records.append({**common, 'pipeline': result.pipeline, 'run': label, 'stage': stage.name,
                    'w_bits': 'mixed' if mixed else q.w_bits,
                    'a_bits': 'mixed' if mixed else q.a_bits,
                    'range_method': stage.model.settings.get('range_method'),
                    'top1_pct': round(top1, 2),
                    'size_pct_of_fp32': round(100 * stage.model.size_bits() / fp32_bits, 2),
                    'seconds': round(stage.seconds, 1)})
    if stage.guard is not None:
      records[-1]['stage_kept'] = stage.kept
    dropped = '' if stage.kept else (
        f'  [dropped by the stage guard: KL {stage.guard.kl_before:.4g} -> '
        f'{stage.guard.kl_after:.4g}; went on from the state before it]')
    print(f'  {STAGE_LABELS[stage.name]:16s} top-1 {top1:6.2f}%  ({stage.seconds:.1f}s)'
          f'{dropped}', flush=True)
  return records


def _print_table(records: List[Dict[str, Any]]) -> None:
  print(f'\n{"stage":36s} {"bits":7s} {"top-1":>7s} {"size":>8s} {"seconds":>8s}')
  for r in records:
    name = 'FP32' if r['stage'] == 'fp32' else f'{r["run"]}: {STAGE_LABELS[r["stage"]]}'
    name += ' (dropped)' if r.get('stage_kept') is False else ''
    bits = f'W{r["w_bits"]}A{r["a_bits"]}' if r['w_bits'] != 'mixed' else 'mixed'
    print(f'{name:36s} {bits:7s} {r["top1_pct"]:6.2f}% {r["size_pct_of_fp32"]:7.2f}% '
          f'{r["seconds"]:8.1f}')
