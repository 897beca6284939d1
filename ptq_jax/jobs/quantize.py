"""run.py job 'quantize': PTQ of a checkpoint, evaluated on the test split.

Writes to the work dir: ``results.json`` (FP32 and quantized top-1), ``layers.md``
(the per-layer report), ``quantized.msgpack`` (reloadable with
``QuantizedModel.load``) and ``integer.msgpack`` (the integer export).
"""

from __future__ import annotations

import time
from typing import Any, Dict, List

import ml_collections

from ptq_jax.io import atomic_write_bytes, atomic_write_json
from ptq_jax.jobs.outputs import RunOutputs
from ptq_jax.jobs.deploy import export_formats, write_artifacts
from ptq_jax.jobs.inputs import load_job_inputs
from ptq_jax.jobs.results import render_markdown
from ptq_jax.quant.export import export_integer
from ptq_jax.quantize import quantize
from ptq_jax.stages.ranges import RangeConfig


def _bits(value: int):
  return None if value == 0 else int(value)


def quantize_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> List[Dict[str, Any]]:
  """Quantizes ``config.checkpoint`` as ``config.quant`` says and evaluates it."""
  formats = export_formats(config)
  inputs = load_job_inputs(config)
  model, variables, meta, calib = inputs.model, inputs.variables, inputs.meta, inputs.calib
  q = config.quant
  print(f'Quantizing {meta["model"]} at W{q.w_bits}A{q.a_bits} ({q.range_method} ranges, '
        f'{config.calib_size} calibration images)...', flush=True)
  start = time.time()
  qm = quantize(model, variables, calib, w_bits=_bits(q.w_bits), a_bits=_bits(q.a_bits),
                first_last_bits=_bits(q.first_last_bits),
                ranges=RangeConfig(q.range_method, symmetric=q.symmetric),
                model_name=meta['model'])
  quant_seconds = time.time() - start
  fp32 = inputs.fp32_top1()
  top1 = inputs.top1(qm.predict)
  fp32_bits = qm.fp32_bits()
  common = inputs.record_fields()
  records = [
      {**common, 'method': 'fp32', 'w_bits': 32, 'a_bits': 32, 'top1_pct': round(fp32, 2),
       'size_pct_of_fp32': 100.0, 'seconds': 0.0},
      {**common, 'method': f'baseline_ptq ({q.range_method})', 'w_bits': q.w_bits,
       'a_bits': q.a_bits, 'top1_pct': round(top1, 2),
       'size_pct_of_fp32': round(100 * qm.size_bits() / fp32_bits, 2),
       'seconds': round(quant_seconds, 1)},
  ]
  with RunOutputs(workdir, 'quantize', {'model': meta['model']}) as out:
    qm.save(out.path('quantized.msgpack'))
    export_integer(qm, out.path('integer.msgpack'))
    write_artifacts(qm, out, formats)
    atomic_write_json(out.path('results.json'), records)
    atomic_write_bytes(out.path('layers.md'),
                       render_markdown(qm.report, f'Per-layer report: {meta["model"]}').encode())
  for r in records:
    bits = f'W{r["w_bits"]}A{r["a_bits"]}'
    print(f'{r["method"]:24s} {bits:7s} top-1 {r["top1_pct"]:6.2f}%   weights '
          f'{r["size_pct_of_fp32"]:6.2f}% of FP32')
  print(f'Wrote {", ".join(out.names)}, manifest.json to {workdir}')
  return records
