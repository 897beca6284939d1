"""AdaQuant's settings: the method's hyper-parameters apart from how it is executed.

:class:`AdaQuantConfig` is what changes the result (iterations, minibatch, learning
rates, schedule); :class:`AdaQuantRuntime` only changes where and how fast it runs
(steps per compiled call, capture memory, evaluation batching). Both are frozen
dataclasses, validated on construction.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional, Sequence, Tuple

import jax
import numpy as np

from ptq_jax.io import check_output_dir
from ptq_jax.linear import is_plain_depthwise, is_pointwise
from ptq_jax.trace import LayerInfo

MODES = ('parallel', 'sequential')
MICRO_MIN_BYTES = 256 * 1024   # one example's activations, below which no micro-batches
LR_SCHEDULES = ('constant', 'cosine')
RANGE_UPDATES = ('absolute', 'relative')
ROUNDINGS = ('free', 'learned')
UNITS = ('layer', 'block')
HOLDOUT_SALT = 0x7FFFFFFF   # folded into the stage key for the holdout (layers use 0, 1, ...)


@dataclasses.dataclass(frozen=True)
class AdaQuantConfig:
  """AdaQuant's hyper-parameters (docs/method.md, "AdaQuant").

  The learning rates, iteration count and minibatch are the reference code's. The
  cosine decay of every rate to 0 is ours: on held-out training images it scored
  above the constant rates, though not best of every variant tried
  (results/adaquant_tuning.md lists them all).
  """

  iterations: int = 1000
  batch_size: int = 50
  lr_kernel: float = 1e-5
  lr_bias: float = 1e-3
  lr_w_quant: float = 1e-3
  lr_a_quant: float = 1e-1
  lr_schedule: str = 'cosine'           # or 'constant' (the reference's)
  # The guard: the layer's error over all its calibration inputs is measured at the
  # start and after each of ``guard_checks`` equal parts of the iterations, and the
  # best state is kept, so no layer ends worse than it started. False: the paper's
  # AdaQuant exactly (the last state, whatever its error).
  guard: bool = True
  guard_checks: int = 4
  # A fraction of the calibration examples held out of the optimisation, on which the
  # guard measures the start and each checked state (the same examples for every
  # layer / block): the kept state is then the one that generalises best, not the one
  # that fits the examples it was trained on best (with a few hundred examples a unit
  # can fit them and do worse on others). 0: the guard measures on the whole set,
  # which the optimiser also trains on.
  guard_holdout: float = 0.0
  # 'absolute': the weight quantizer's range and low end move by about lr_w_quant per
  # step (the paper's), large for a layer whose weights are small; 'relative': in units
  # of each channel's starting range.
  weight_range_updates: str = 'absolute'
  # QDrop: the probability that an element of a layer's input skips input quantization
  # in a training step (drawn anew every step); 0 is AdaQuant exactly. Errors and the
  # guard always measure the fully quantized layer.
  drop_prob: float = 0.0
  # 'free': AdaQuant's continuous weight updates (lr_kernel); 'learned': each weight
  # rounded down or up by a learned choice (AdaRound's idea; see
  # ptq_jax.stages.adaquant.rounding), with its own rate and regulariser weight.
  rounding: str = 'free'
  lr_rounding: float = 1e-2
  rounding_reg: float = 1.0
  # 'layer': each layer fitted to its own float output (the paper's); 'block': the
  # layers of each block of the traced graph (a residual block, a transformer
  # half-layer, else one layer) fitted jointly to the float block's output
  # (ptq_jax.stages.adaquant.block).
  unit: str = 'layer'

  def __post_init__(self):
    self.validate()

  def validate(self) -> 'AdaQuantConfig':
    if not isinstance(self.guard, (bool, np.bool_)):
      raise ValueError(f'AdaQuant guard must be True or False, got {self.guard!r}.')
    for name in ('iterations', 'batch_size', 'guard_checks'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f'AdaQuant {name} must be an integer, got {value!r}.')
    if self.iterations < 0 or self.batch_size < 1 or self.guard_checks < 1:
      raise ValueError(f'AdaQuant needs iterations >= 0, batch_size >= 1 and guard_checks '
                       f'>= 1, got {self.iterations}, {self.batch_size} and '
                       f'{self.guard_checks}.')
    for name in ('lr_kernel', 'lr_bias', 'lr_w_quant', 'lr_a_quant'):
      value = getattr(self, name)
      if not isinstance(value, (int, float, np.floating, np.integer)) or not math.isfinite(
          value) or value < 0:
        raise ValueError(f'AdaQuant {name} must be a finite number >= 0, got {value!r}.')
    if (isinstance(self.drop_prob, bool)
        or not isinstance(self.drop_prob, (int, float, np.floating, np.integer))
        or not 0.0 <= float(self.drop_prob) < 1.0):
      raise ValueError(f'AdaQuant drop_prob must be a number in [0, 1), got {self.drop_prob!r}.')
    if (isinstance(self.guard_holdout, bool)
        or not isinstance(self.guard_holdout, (int, float, np.floating, np.integer))
        or not 0.0 <= float(self.guard_holdout) <= 0.5):
      raise ValueError(f'AdaQuant guard_holdout must be a fraction in [0, 0.5], got '
                       f'{self.guard_holdout!r}.')
    if self.guard_holdout and not self.guard:
      raise ValueError('AdaQuant guard_holdout holds examples out for the guard; set '
                       'guard=True, or guard_holdout=0 to train on every example.')
    if self.unit not in UNITS:
      raise ValueError(f'AdaQuant unit must be one of {UNITS}, got {self.unit!r}.')
    if self.rounding not in ROUNDINGS:
      raise ValueError(f'AdaQuant rounding must be one of {ROUNDINGS}, got {self.rounding!r}.')
    for name in ('lr_rounding', 'rounding_reg'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(
          value, (int, float, np.floating, np.integer)) or not math.isfinite(value) or value < 0:
        raise ValueError(f'AdaQuant {name} must be a finite number >= 0, got {value!r}.')
    if self.weight_range_updates not in RANGE_UPDATES:
      raise ValueError(f'AdaQuant weight_range_updates must be one of {RANGE_UPDATES}, got '
                       f'{self.weight_range_updates!r}.')
    if self.lr_schedule not in LR_SCHEDULES:
      raise ValueError(f'AdaQuant lr_schedule must be one of {LR_SCHEDULES}, got '
                       f'{self.lr_schedule!r}.')
    return self

  def holdout_size(self, n: int) -> int:
    """How many of ``n`` calibration examples ``guard_holdout`` holds out (0: none);
    raises if that leaves none held out or none to train on."""
    if not self.guard_holdout or self.iterations == 0:
      return 0
    held = int(round(n * float(self.guard_holdout)))
    if held < 1 or n - held < 1:
      raise ValueError(f'AdaQuant guard_holdout={self.guard_holdout} of {n} calibration '
                       f'examples holds out {held}; it needs at least one held out and one '
                       'to train on: use more calibration examples or a larger fraction '
                       '(or guard_holdout=0).')
    return held

  def holdout_split(self, n: int, key: jax.Array
                    ) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """(train, check) example indices of a set of ``n`` for ``guard_holdout``, drawn
    from the stage's ``key`` (the same split for every layer or block); None without a
    holdout (train and check on all ``n``)."""
    held = self.holdout_size(n)
    if not held:
      return None
    order = np.asarray(jax.random.permutation(jax.random.fold_in(key, HOLDOUT_SALT), n))
    return np.sort(order[held:]), np.sort(order[:held])

  def check_steps(self) -> Tuple[int, ...]:
    """The iteration counts after which the guard measures the error (the last is
    ``iterations``); ``(iterations,)`` without the guard."""
    if not self.guard or self.iterations == 0:
      return (self.iterations,)
    checks = min(self.guard_checks, self.iterations)
    return tuple(sorted({round(self.iterations * (k + 1) / checks) for k in range(checks)}))

  def rates(self) -> jax.Array:
    """The four learning rates and the iteration count, as one array argument (so
    changing them does not recompile the step)."""
    # (device_put: jnp.asarray would compile a copy program for it.)
    return jax.device_put(np.array([self.lr_kernel, self.lr_bias, self.lr_w_quant,
                                    self.lr_a_quant, max(self.iterations, 1)], np.float32))


@dataclasses.dataclass(frozen=True)
class AdaQuantRuntime:
  """How AdaQuant runs; none of these change what it computes beyond float rounding.

  * ``steps_per_call``: optimiser steps per compiled call; None: 1 on CPU (a Python
    loop; XLA's CPU backend runs convolutions inside loops far slower) and all of
    them in one ``lax.fori_loop`` elsewhere (results/adaquant_speed*.md).
  * ``capture_budget_mb``: memory for the captured inputs of a group of layers
    (host memory on CPU, device memory elsewhere).
  * ``capture_batch_size``: images per capture pass.
  * ``eval_batch_size``: batch of the float-target and error passes; None: the CPU
    way (one call for the target, host-side batches of ERROR_BATCH for the error)
    on CPU and the minibatch size elsewhere, so a GPU autotunes each conv shape once.
  * ``micro_batch``: examples per gradient pass inside a step (the minibatch's
    gradient as the mean over micro-batches, :func:`~.steps.value_and_grad`), so a
    large feature map stays in cache; the same gradient up to float rounding, except
    that QDrop draws each micro-batch's masks from a key of its own. None: automatic
    (:meth:`micro_batch_for`); 0: never split.
  * ``resume_dir``: a directory where each finished layer or block is saved as it
    ends, so a run killed part-way and started again with the same inputs goes on
    from there (:mod:`~.progress`); None: nothing saved.
  """

  steps_per_call: Optional[int] = None
  capture_budget_mb: float = 1024.0
  capture_batch_size: int = 100
  eval_batch_size: Optional[int] = None
  micro_batch: Optional[int] = None
  resume_dir: Optional[str] = None

  def __post_init__(self):
    if self.steps_per_call is not None and self.steps_per_call < 1:
      raise ValueError(f'steps_per_call must be >= 1 or None, got {self.steps_per_call}.')
    if not self.capture_budget_mb > 0 or self.capture_batch_size < 1:
      raise ValueError('capture_budget_mb must be > 0 and capture_batch_size >= 1, got '
                       f'{self.capture_budget_mb} and {self.capture_batch_size}.')
    if self.eval_batch_size is not None and self.eval_batch_size < 1:
      raise ValueError(f'eval_batch_size must be >= 1 or None, got {self.eval_batch_size}.')
    if self.micro_batch is not None and self.micro_batch < 0:
      raise ValueError(f'micro_batch must be >= 0 or None, got {self.micro_batch}.')
    if self.resume_dir is not None:
      if not isinstance(self.resume_dir, (str, os.PathLike)):
        raise TypeError(f'resume_dir must be a directory path or None, got {self.resume_dir!r}.')
      check_output_dir(os.path.expanduser(self.resume_dir), 'AdaQuantRuntime resume_dir')

  def resuming_in(self, cache_dir: Optional[str]) -> 'AdaQuantRuntime':
    """These settings, saving finished units in ``cache_dir`` unless ``resume_dir`` is
    set (an entry point's ``cache_dir`` holds both its cache and AdaQuant's progress)."""
    if cache_dir is None or self.resume_dir is not None:
      return self
    return dataclasses.replace(self, resume_dir=cache_dir)

  def micro_batch_for(self, batch: int, layers: Sequence[LayerInfo]) -> int:
    """Examples per gradient pass when a step's program holds ``layers`` (one layer, or
    a block's) at minibatch ``batch``; 0: the whole minibatch at once.

    Automatic: on CPU, 2 (1 for an odd minibatch) when every layer's linear map runs
    without a general convolution (dense, pointwise, depthwise: XLA's CPU backend runs
    convolutions inside loops far slower) and the activations of one example take at
    least ``MICRO_MIN_BYTES`` and twice the weights (each micro-batch reads every
    weight again); elsewhere never (results/adaquant_speed.md, ``micro_batch``). A
    given size must divide the minibatch."""
    if self.micro_batch is not None:
      if self.micro_batch and self.micro_batch < batch and batch % self.micro_batch:
        raise ValueError(f'AdaQuantRuntime micro_batch={self.micro_batch} does not divide the '
                         f'minibatch of {batch}; choose a divisor, or 0 to not split.')
      return self.micro_batch if self.micro_batch < batch else 0
    if jax.default_backend() != 'cpu' or batch < 2 or not layers:
      return 0
    example = sum(4 * (math.prod(l.input_shape) + math.prod(l.output_shape)) for l in layers)
    weights = sum(4 * math.prod(l.kernel_shape) for l in layers if l.kernel_shape)
    if (not all(_loop_friendly(l) for l in layers) or example < MICRO_MIN_BYTES
        or example < 2 * weights):
      return 0
    return 2 if batch % 2 == 0 else 1

  def eval_batches(self, n: int, config: AdaQuantConfig) -> Optional[int]:
    """The batch of a layer's float-target and error passes over ``n`` inputs (inside
    one program each, ``lax.map``), or None for the CPU way (see the class)."""
    if self.eval_batch_size is not None:
      return min(self.eval_batch_size, n)
    return None if jax.default_backend() == 'cpu' else min(config.batch_size, n)

  def chunk(self, config: AdaQuantConfig) -> int:
    """Steps per compiled call."""
    if self.steps_per_call:
      return max(1, min(self.steps_per_call, max(config.iterations, 1)))
    return 1 if jax.default_backend() == 'cpu' else max(config.iterations, 1)

  def single_program(self, n: int, config: AdaQuantConfig) -> bool:
    """Whether a layer's whole AdaQuant on ``n`` inputs (target, errors, optimiser
    start, every step) is one compiled program: when its passes are batched and one
    call runs all the iterations (both off CPU by default)."""
    return (self.eval_batches(n, config) is not None and config.iterations >= 1
            and self.chunk(config) >= config.iterations)

  def call_plan(self, config: AdaQuantConfig) -> Tuple[Tuple[int, ...], ...]:
    """Per guard check (:meth:`AdaQuantConfig.check_steps`), the ``steps`` of each call
    of the step loop: the whole part in one call when it fits a chunk (as in the one
    program), else full chunks, then the remainder one step at a time (no new loop
    length to compile). The same calls give the same float rounding on every path."""
    chunk, done, plan = self.chunk(config), 0, []
    for end in config.check_steps():
      n = end - done
      plan.append((n,) if 0 < n <= chunk else (chunk,) * (n // chunk) + (1,) * (n % chunk))
      done = end
    return tuple(plan)

  def step_counts(self, config: AdaQuantConfig) -> Tuple[int, ...]:
    """The distinct ``steps`` values the step loop is called with."""
    return tuple(sorted({s for calls in self.call_plan(config) for s in calls}))


def _loop_friendly(layer: LayerInfo) -> bool:
  """Whether the layer's linear map runs on CPU without a general convolution."""
  geom = layer.geometry
  if geom is None or not layer.kernel_shape:
    return False
  return (geom.kind in ('dense', 'einsum')
          or is_plain_depthwise(geom, (1,) + tuple(layer.input_shape), layer.kernel_shape)
          or is_pointwise(geom, layer.kernel_shape))
