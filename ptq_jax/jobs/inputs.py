"""What every quantizing run.py job starts from: the checkpoint, the test split and a
calibration set, as the config says; and the fields every result record carries."""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable, Dict, Mapping

import flax.linen as nn
import ml_collections
import numpy as np

from ptq_jax.bundled import resolve_checkpoint
from ptq_jax.checkpoint import load_model
from ptq_jax.data import loader
from ptq_jax.evaluation import predict_logits, top1_accuracy_pct
from ptq_jax.jobs.results import describe_device
from ptq_jax.validate import check_int


@dataclasses.dataclass(frozen=True)
class JobInputs:
  model: nn.Module
  variables: Mapping[str, Any]
  meta: Dict[str, Any]
  calib: loader.CalibrationSet
  test_images: np.ndarray    # preprocessed, the first config.eval_limit (0: all)
  test_labels: np.ndarray

  def top1(self, predict: Callable[[np.ndarray], np.ndarray]) -> float:
    """Test top-1 of ``predict`` (e.g. ``QuantizedModel.predict``)."""
    return top1_accuracy_pct(predict(self.test_images), self.test_labels)

  def fp32_top1(self) -> float:
    return self.top1(lambda x: predict_logits(self.model, self.variables, x))

  def record_fields(self, **extra: Any) -> Dict[str, Any]:
    """The fields every result record of the job starts with (``extra`` before the
    device and the command)."""
    return {'model': self.meta['model'], 'calib_size': len(self.calib),
            'test_images': len(self.test_labels), **extra, 'device': describe_device(),
            'command': 'python ' + ' '.join(sys.argv)}


def load_job_inputs(config: ml_collections.ConfigDict) -> JobInputs:
  """``config.checkpoint``, the test split (``config.eval_limit``) and
  ``config.calib_size`` calibration images drawn with ``config.seed``."""
  limit = check_int(config.eval_limit, 'config.eval_limit')   # (before reading anything)
  loader.check_sample_request(config.calib_size, config.seed)
  model, variables, meta = load_model(resolve_checkpoint(config.checkpoint))
  data_kwargs = dict(data_dir=config.data.data_dir, idx_dir=config.data.idx_dir,
                     download=config.data.download)
  train = loader.load_split(config.data.dataset, 'train', **data_kwargs)
  test = loader.load_split(config.data.dataset, 'test', **data_kwargs)
  limit = limit or len(test)
  calib = loader.calibration_set(config.data.dataset, config.calib_size, config.seed, data=train)
  return JobInputs(model, variables, meta, calib,
                   loader.preprocess(config.data.dataset, test.images[:limit]),
                   test.labels[:limit])
