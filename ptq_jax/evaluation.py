"""Batched, jit-compiled inference and accuracy of a (float or quantized) model."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Optional, Sequence

import jax
import numpy as np

from ptq_jax.calling import inference_kwargs
from ptq_jax.nnx_bridge import as_linen
from ptq_jax.distributed import local_devices, padded_batches
from ptq_jax.models.fast_depthwise import fast_depthwise


def batched_predict(forward: Callable[[np.ndarray], Any], images: np.ndarray,
                    batch_size: int = 500, devices: Optional[Sequence[Any]] = None
                    ) -> np.ndarray:
  """``forward`` over ``images`` in batches of one size (the last zero-padded, so a
  jitted ``forward`` compiles once), each split over ``devices`` (default: all local
  devices; data-parallel through ``jax.sharding``)."""
  if len(images) == 0:
    raise ValueError('Nothing to predict: the set of images is empty.')
  outputs = [np.asarray(forward(batch))[:n]
             for batch, n in padded_batches(images, batch_size, local_devices(devices))]
  return np.concatenate(outputs)


def predict_logits(model: Any, variables: Optional[Dict[str, Any]] = None, images: Any = None,
                   batch_size: int = 500, use_fast_depthwise: bool = True,
                   devices: Optional[Sequence[Any]] = None) -> np.ndarray:
  """Logits of the float ``model`` on ``images`` (float32, NHWC), batched and jitted
  (``train=False`` / ``deterministic=True`` passed only where the model takes them)."""

  model, variables = as_linen(model, variables, images)

  @jax.jit
  def forward(variables, x):
    ctx = fast_depthwise() if use_fast_depthwise else contextlib.nullcontext()
    with ctx:
      return model.apply(variables, x, **inference_kwargs(model))

  return batched_predict(lambda x: forward(variables, x), images, batch_size, devices)


def top1_accuracy_pct(logits: np.ndarray, labels: np.ndarray) -> float:
  """Percentage of rows whose arg-max equals the label."""
  return float(100.0 * np.mean(np.argmax(logits, axis=-1) == np.asarray(labels)))
