"""The first stage of every entry point: check the calibration data once, trace the
model, fold its BatchNorms. Also the one signature every later stage has.

A stage is a pure function ``(prepared, qstate, key) -> (qstate, report)``: it reads
the prepared model and its checked calibration images, takes a quantization state
and returns a new one with a report of what it did. Pipelines are ordered lists of
stages (:mod:`ptq_jax.pipelines`), the way optax chains gradient transformations.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ptq_jax.quant.folding import fold_batchnorm
from ptq_jax.quant.interceptor import LayerQuant, QState
from ptq_jax.nnx_bridge import as_linen
from ptq_jax.float_ops import UNSUPPORTED_POLICIES, FloatOp, check_unsupported
from ptq_jax.matmul_sites import MatmulSite
from ptq_jax.trace import AttentionSite, LayerInfo, trace_model


def check_calibration(images: Any, input_shape: Optional[Sequence[int]] = None) -> np.ndarray:
  """The calibration images as float32 (N, ...), or a clear error: empty, not
  preprocessed floats, the wrong per-example shape, or NaN/Inf values."""
  images = np.asarray(getattr(images, 'images', images))
  if images.ndim == 0 or len(images) == 0:
    raise ValueError('The calibration set is empty: pass at least one image '
                     '(e.g. ptq_jax.calibration_set("fashion_mnist", n=1000)).')
  if not np.issubdtype(images.dtype, np.floating):
    raise ValueError(f'Calibration images must be preprocessed floats, got dtype {images.dtype} '
                     '(use ptq_jax.preprocess or ptq_jax.calibration_set).')
  if input_shape is not None and tuple(images.shape[1:]) != tuple(input_shape):
    raise ValueError(f'Calibration images have shape {images.shape[1:]} per example; the model '
                     f'expects {tuple(input_shape)}.')
  bad = ~np.isfinite(images)
  if bad.any():
    which = np.unique(np.nonzero(bad.reshape(len(images), -1))[0])
    raise ValueError(f'The calibration set holds NaN or Inf values in {len(which)} image(s) '
                     f'(first indices {which[:5].tolist()}); clean or drop them.')
  return images.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Prepared:
  """A model ready to quantize: its layer table, folded float weights and the checked
  calibration images. Every stage reads it; none changes it."""

  model: nn.Module
  variables: Mapping[str, Any]
  layers: Tuple[LayerInfo, ...]
  float_state: QState            # folded kernel and bias of every layer, no quantizers
  images: np.ndarray             # checked float32 calibration images
  model_name: Optional[str] = None
  # Parameter-carrying operations kept in float32 (only with unsupported='keep_float').
  float_ops: Tuple[FloatOp, ...] = ()
  # Attention modules whose matmuls quantize_matmuls=True quantizes.
  attention: Tuple[AttentionSite, ...] = ()
  # Other activation x activation matmuls it quantizes (ptq_jax.matmul_sites).
  matmul_sites: Tuple[MatmulSite, ...] = ()
  # The one switch for progress bars of every stage that reads this (no stage prints).
  progress: bool = True

  @property
  def folded_bns(self) -> frozenset:
    return frozenset(l.bn_path for l in self.layers if l.bn_path)

  @property
  def input_shape(self) -> Tuple[int, ...]:
    return tuple(self.images.shape[1:])


def prepare(model: Any, variables: Optional[Mapping[str, Any]] = None, calib: Any = None,
            input_shape: Optional[Sequence[int]] = None,
            model_name: Optional[str] = None, unsupported: str = 'error',
            quantize_matmuls: bool = False, progress: bool = True) -> Prepared:
  """Checks ``calib`` (images or a ``CalibrationSet``), traces ``model`` on one image
  and folds every BatchNorm that directly follows a layer.

  Any other parameter-carrying linear operation (``ptq_jax.float_ops``) is an
  :class:`~ptq_jax.float_ops.UnsupportedLayerError`, or with
  ``unsupported='keep_float'`` stays float32 with a warning. With
  ``quantize_matmuls``, every activation x activation matmul is quantized: the
  recognised attention modules' and the matmul sites anywhere else
  (:mod:`ptq_jax.matmul_sites`); one it cannot reach (inside a loop) is refused or kept
  float the same way, and a model with no such matmul at all is a ValueError.
  ``progress``: whether the stages run on this show progress bars."""
  if unsupported not in UNSUPPORTED_POLICIES:
    raise ValueError(f'unsupported must be one of {UNSUPPORTED_POLICIES}, got {unsupported!r}.')
  model, variables = as_linen(model, variables, calib)   # an NNX module: its Linen view
  images = check_calibration(calib, input_shape)
  try:
    traced = trace_model(model, variables, jnp.asarray(images[:1]))
    layers = traced.layers
  except Exception as e:  # Flax reports a shape clash deep inside the model.
    raise ValueError(f'The model cannot run with these variables on calibration images of '
                     f'shape {images.shape[1:]} (are they this model\'s variables and its input '
                     f'shape?): {type(e).__name__}: {str(e)[:300]}') from e
  if not isinstance(quantize_matmuls, bool):
    raise TypeError(f'quantize_matmuls must be True or False, got {quantize_matmuls!r}.')
  # (keep_float: warned, kept float)
  check_unsupported(list(traced.float_ops) + (list(traced.other_matmuls) if quantize_matmuls
                                              else []), unsupported)
  if quantize_matmuls:
    if not (traced.attention or traced.matmul_sites or traced.other_matmuls):
      raise ValueError('quantize_matmuls=True, but the model has no activation x activation '
                       'matmul (such as attention\'s) to quantize; leave quantize_matmuls off.')
  if not layers:
    raise ValueError('The model has no nn.Conv or nn.Dense layer to quantize.')
  folded = fold_batchnorm(layers, variables)
  float_state = {l.path: LayerQuant(folded[l.path].kernel, folded[l.path].bias,
                                    view=l.kernel_view) for l in layers}
  return Prepared(model, dict(variables), tuple(layers), float_state, images, model_name,
                  tuple(traced.float_ops) + (tuple(traced.other_matmuls) if quantize_matmuls
                                             else ()), tuple(traced.attention),
                  tuple(traced.matmul_sites) if quantize_matmuls else (), bool(progress))


StageFn = Callable[[Prepared, QState, jax.Array], Tuple[QState, Any]]


class Stage(NamedTuple):
  """A named stage: ``apply(prepared, qstate, key) -> (qstate, report)``."""

  name: str
  apply: StageFn


def run_stages(prepared: Prepared, stages: Sequence[Stage], key: jax.Array,
               qstate: Optional[QState] = None) -> List[Tuple[str, QState, Any, float]]:
  """Runs ``stages`` in order from ``qstate`` (default: the float state); returns
  ``(name, state, report, seconds)`` after each. Every stage gets ``key``; one that
  draws random numbers derives its own stream from it."""
  state = dict(prepared.float_state if qstate is None else qstate)
  out = []
  for stage in stages:
    start = time.time()
    state, report = stage.apply(prepared, state, key)
    out.append((stage.name, dict(state), report, time.time() - start))
  return out
