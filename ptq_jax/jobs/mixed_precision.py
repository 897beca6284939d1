"""run.py job 'mixed_precision': IP bit allocation of a checkpoint, evaluated.

Computes (or loads from ``config.mixed.cache_dir``) every option's state and the
sensitivity table, solves the integer program for each budget in
``config.budgets``, evaluates each mixed model on the test split beside FP32, and
writes to the work dir: ``results.json``, ``results.md``, ``sensitivity.md`` (the
dL table), and ``mixed.msgpack`` (the first budget's model, reloadable with
``QuantizedModel.load``).
"""

from __future__ import annotations

import os
import time
from typing import Any, Dict, List

import jax
import ml_collections

from ptq_jax.io import atomic_write_bytes, atomic_write_json
from ptq_jax.jobs.outputs import RunOutputs
from ptq_jax.jobs.inputs import load_job_inputs
from ptq_jax.jobs.results import render_markdown
from ptq_jax.mixed_precision import mixed_precision
from ptq_jax.quant.quantizer import option_name
from ptq_jax.stages.adaquant import AdaQuantConfig

BUDGET_KEYS = ('size_pct', 'bops_pct', 'loss')


def _budgets(config: ml_collections.ConfigDict) -> List[Dict[str, float]]:
  """``config.budgets``: a list of strings such as 'size_pct=13' or 'size_pct=16,bops_pct=2'."""
  out = []
  for text in config.budgets:
    budget = {}
    for part in str(text).split(','):
      name, _, value = part.partition('=')
      if name.strip() not in BUDGET_KEYS or not value:
        raise ValueError(f'Budget {text!r} is not understood: write e.g. "size_pct=13", '
                         f'"bops_pct=2" or "size_pct=16,loss=0.05" (keys {BUDGET_KEYS}).')
      budget[name.strip()] = float(value)
    out.append(budget)
  if not out:
    raise ValueError('config.budgets is empty: give at least one, e.g. ["size_pct=13"].')
  return out


def mixed_precision_checkpoint(config: ml_collections.ConfigDict, workdir: str
                               ) -> List[Dict[str, Any]]:
  budgets = _budgets(config)
  inputs = load_job_inputs(config)
  model, variables, meta, calib = inputs.model, inputs.variables, inputs.meta, inputs.calib
  m = config.mixed
  print(f'Mixed precision for {meta["model"]}: options {", ".join(m.options)} '
        f'({m.method} states, {config.calib_size} calibration images)...', flush=True)
  start = time.time()
  mp = mixed_precision(
      model, variables, calib, options=list(m.options), method=m.method,
      adaquant=AdaQuantConfig(iterations=m.iterations) if m.method == 'adaquant' else None,
      key=jax.random.key(config.seed), cache_dir=os.path.expanduser(m.cache_dir) if m.cache_dir
      else None, model_name=meta['model'], progress=True)
  prep_seconds = time.time() - start
  fp32 = inputs.fp32_top1()
  common = inputs.record_fields(option_method=m.method)
  records = [{**common, 'method': 'fp32', 'budget': '-', 'w_bits': 32, 'a_bits': 32,
              'top1_pct': round(fp32, 2), 'size_pct_of_fp32': 100.0, 'bops_pct_of_fp32': 100.0,
              'seconds': 0.0}]
  with RunOutputs(workdir, 'mixed_precision', {'model': meta['model']}) as out:
    for i, budget in enumerate(budgets):
      qm, allocation = mp.quantize(**budget)
      top1 = inputs.top1(qm.predict)
      records.append({
          **common, 'method': 'mixed_precision',
          'budget': ','.join(f'{k}={v:g}' for k, v in budget.items()), 'w_bits': 'mixed',
          'a_bits': 'mixed', 'top1_pct': round(top1, 2),
          'size_pct_of_fp32': round(allocation.size_pct_of_fp32, 2),
          'bops_pct_of_fp32': round(allocation.bops_pct_of_fp32, 3),
          'predicted_loss': round(allocation.predicted_loss, 5),
          'layers_per_option': ' '.join(f'{k}:{v}' for k, v in sorted(allocation.counts().items())),
          'solve_seconds': round(allocation.solve_seconds, 3),
          'seconds': round(prep_seconds if i == 0 else allocation.solve_seconds, 1)})
      if i == 0:
        qm.save(out.path('mixed.msgpack'))
    table = mp.table
    sens_rows = [{'path': p, **{option_name(o): float(f'{table.raw_delta[i, j]:.4g}')
                                for j, o in enumerate(table.options)}}
                 for i, p in enumerate(table.paths)]
    atomic_write_json(out.path('results.json'), records)
    atomic_write_bytes(out.path('results.md'), render_markdown(
        records, f'Mixed precision: {meta["model"]}').encode())
    atomic_write_bytes(out.path('sensitivity.md'), render_markdown(
        sens_rows, f'Sensitivity dL ({table.loss}) per layer and option: {meta["model"]}').encode())
  for r in records:
    print(f'{r["method"]:16s} {r["budget"]:22s} top-1 {r["top1_pct"]:6.2f}%   size '
          f'{r["size_pct_of_fp32"]:6.2f}%  BOPs {r["bops_pct_of_fp32"]:7.3f}% of FP32'
          + (f'   [{r["layers_per_option"]}]' if 'layers_per_option' in r else ''))
  print(f'Wrote results.json, results.md, sensitivity.md, mixed.msgpack, manifest.json to '
        f'{workdir}')
  return records
