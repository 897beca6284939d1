"""A guard around whole stages: keep a stage's state only if it brings the quantized
network's outputs closer to FP32's on the calibration images.

AdaQuant's own guard (``AdaQuantConfig.guard``) keeps each layer or block no worse than
it started, but a later stage can still undo that: BN tuning re-estimates statistics
from a handful of images, and on a network whose calibration photos differ from its
training data it can cost more than it restores. :func:`guarded` wraps any stage; it
measures :func:`output_kl` (the loss bias tuning minimises, so it needs no labels)
before and after the stage, and returns the stage's state only if the loss did not
rise, otherwise the state it was given. AdaQuant and BN tuning do not minimise this
loss; bias tuning does, but with fixed-rate minibatch steps, which from an already good
state can end above where they started.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Tuple

import jax
import numpy as np

from ptq_jax.evaluation import batched_predict, predict_logits
from ptq_jax.quant.interceptor import QState, apply_quantized
from ptq_jax.stages.bias_tuning import kl_per_row
from ptq_jax.stages.prepare import Prepared, Stage


class GuardReport(NamedTuple):
  """What the guard measured around one stage; ``report`` is the stage's own."""

  report: Any
  kl_before: float
  kl_after: float
  kept: bool      # False: the stage's state was dropped for the one it was given


def output_kl(prepared: Prepared, qstate: QState, batch_size: int = 250) -> float:
  """Mean over the calibration images of KL(softmax(FP32 outputs) || softmax(quantized
  outputs))."""
  return _kl_measure(prepared, batch_size)(qstate)


def _kl_measure(prepared: Prepared, batch_size: int):
  """``qstate -> output_kl``, with the FP32 outputs computed once and the quantized
  forward compiled once for every state of the same structure."""
  model, variables, images = prepared.model, prepared.variables, prepared.images
  teacher = predict_logits(model, variables, images, batch_size)
  forward = jax.jit(lambda v, state, x: apply_quantized(model, v, state, prepared.folded_bns,
                                                        x))

  def measure(qstate: QState) -> float:
    student = batched_predict(lambda x: forward(variables, qstate, x), images, batch_size)
    return float(np.mean(np.asarray(kl_per_row(teacher, student), np.float64)))
  return measure


def guarded(stage: Stage, batch_size: int = 250) -> Stage:
  """``stage`` (same name), its state kept only if :func:`output_kl` did not rise; the
  report is a :class:`GuardReport` around the stage's own."""
  if not isinstance(stage, Stage):
    raise TypeError(f'guarded() takes a Stage, got {type(stage).__name__}.')

  def apply(prepared: Prepared, qstate: QState, key: jax.Array) -> Tuple[QState, Any]:
    measure = _kl_measure(prepared, batch_size)
    before = measure(qstate)
    state, report = stage.apply(prepared, qstate, key)
    after = measure(state)
    kept = bool(after <= before)
    return (state if kept else dict(qstate)), GuardReport(report, before, after, kept)
  return Stage(stage.name, apply)
