"""The jobs run.py can run, selected by ``config.job``; each is a library call."""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, Optional

import ml_collections


def run(config: ml_collections.ConfigDict, workdir: Optional[str] = None) -> Dict[str, Any]:
  """Runs ``config.job`` in ``workdir`` (or ``config.workdir``) and returns its results."""
  from ptq_jax import evaluate_job, mixed_job, pipeline_job, quantize_job, train
  jobs: Dict[str, Callable[..., Dict[str, Any]]] = {
      'train': train.train_and_evaluate,
      'evaluate': evaluate_job.evaluate_checkpoint,
      'quantize': quantize_job.quantize_checkpoint,
      'mixed_precision': mixed_job.mixed_precision_checkpoint,
      'pipeline': pipeline_job.run_pipelines,
  }
  if config.job not in jobs:
    raise ValueError(f'Unknown job {config.job!r}; choose one of {sorted(jobs)}.')
  workdir = workdir or config.get('workdir')
  if not workdir:
    raise ValueError('No work dir: pass --workdir=DIR (or set config.workdir).')
  return jobs[config.job](config, os.path.expanduser(workdir))
