"""The jobs run.py can run, selected by ``config.job``; each is a library call."""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, Optional

import ml_collections

from ptq_jax.jobs import evaluate, mixed_precision, pipeline, quantize, train
from ptq_jax.io import check_output_dir

JOBS: Dict[str, Callable[[ml_collections.ConfigDict, str], Any]] = {
    'train': train.train_and_evaluate,
    'evaluate': evaluate.evaluate_checkpoint,
    'quantize': quantize.quantize_checkpoint,
    'mixed_precision': mixed_precision.mixed_precision_checkpoint,
    'pipeline': pipeline.run_pipelines,
}


def run(config: ml_collections.ConfigDict, workdir: Optional[str] = None) -> Any:
  """Runs ``config.job`` in ``workdir`` (or ``config.workdir``) and returns its results."""
  if config.job not in JOBS:
    raise ValueError(f'Unknown job {config.job!r}; choose one of {sorted(JOBS)}.')
  workdir = workdir or config.get('workdir')
  if not workdir:
    raise ValueError('No work dir: pass --workdir=DIR (or set config.workdir).')
  # Outputs are checked before any work, so a run never fails after the work is done.
  check_output_dir(workdir, 'The work dir')
  for section in ('quant', 'mixed'):
    cache_dir = config.get(section, {}).get('cache_dir') if section in config else None
    if cache_dir:
      check_output_dir(cache_dir, f'config.{section}.cache_dir')
  return JOBS[config.job](config, os.path.expanduser(workdir))
