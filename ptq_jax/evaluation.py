"""Batched, jit-compiled inference and accuracy of a (float or quantized) model."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict

import flax.linen as nn
import jax
import numpy as np

from ptq_jax.models.fast_depthwise import fast_depthwise


def batched_predict(forward: Callable[[np.ndarray], Any], images: np.ndarray,
                    batch_size: int = 500) -> np.ndarray:
  """``forward`` over ``images`` in batches; the last partial batch is zero-padded to
  ``batch_size`` so a jitted ``forward`` compiles only one shape."""
  if len(images) == 0:
    raise ValueError('Nothing to predict: the set of images is empty.')
  outputs = []
  for start in range(0, len(images), batch_size):
    batch = np.asarray(images[start:start + batch_size], np.float32)
    n = len(batch)
    if n < batch_size and len(images) > batch_size:
      batch = np.concatenate([batch, np.zeros((batch_size - n,) + batch.shape[1:], batch.dtype)])
    outputs.append(np.asarray(forward(batch))[:n])
  return np.concatenate(outputs)


def predict_logits(model: nn.Module, variables: Dict[str, Any], images: np.ndarray,
                   batch_size: int = 500, use_fast_depthwise: bool = True) -> np.ndarray:
  """Logits of the float ``model`` on ``images`` (float32, NHWC), batched and jitted."""

  @jax.jit
  def forward(variables, x):
    ctx = fast_depthwise() if use_fast_depthwise else contextlib.nullcontext()
    with ctx:
      return model.apply(variables, x, train=False)

  return batched_predict(lambda x: forward(variables, x), images, batch_size)


def top1_accuracy_pct(logits: np.ndarray, labels: np.ndarray) -> float:
  """Percentage of rows whose arg-max equals the label."""
  return float(100.0 * np.mean(np.argmax(logits, axis=-1) == np.asarray(labels)))
