"""AdaQuant: per-layer reconstruction of quantized layers (DESIGN.md §2.3-2.4).

For each layer, minimise over the calibration set

    mean || f(W X + b) - f(Q(W + V) Q(X) + b') ||^2

jointly over the continuous weight, the bias, the weight quantizer (range and low
end per output channel) and the input quantizer (per tensor), with Adam and one
learning rate per group (``optax.multi_transform``). ``f`` is the activation the
traced graph found after the layer (ReLU / ReLU6), identity otherwise.

* parallel mode: the layer's input ``X`` is what the float model feeds it; layers
  are independent.
* sequential mode: ``X`` comes from the already-quantized prefix, for the whole
  calibration set; the target stays the float model's.

Speed: the step is compiled from the layer's geometry (``ptq_jax.linear``), not its
module, so every layer with the same geometry, shapes and bit widths reuses one
compiled function. The iteration driver runs ``steps_per_call`` steps per call:
1 on CPU (a Python loop: XLA's CPU backend runs convs inside loops ~40x slower,
DESIGN.md §5) and all of them in one ``lax.fori_loop`` on GPU/TPU.
Compilation: on a GPU it is most of a cold run. JAX's persistent compilation cache
(``ptq_jax.enable_compilation_cache``, on by default in ``run.py`` on GPU/TPU) takes a
later run with the same layer shapes from 101-115 s to 33 s (ResNet-50, one H200).
``precompile=True`` compiles every layer's programs up front on a thread pool
(``ptq_jax.aot``) while the inputs are captured. Off CPU, a layer's float target and
reconstruction error are computed in minibatch-sized pieces (``eval_batch_size``), so
their convs have the step's shapes and a GPU autotunes each conv shape once, not again
at the whole set's and the error batch's shapes; and the target, both errors, the
optimiser's start and all the steps are one compiled program per layer geometry
(``_fit_layer``; ``AdaQuantConfig.single_program``), not four.
Memory: layer inputs are captured for a group of layers at a time, bounded by
``capture_budget_mb`` (host memory on CPU, device memory elsewhere), and released
after that group; the capture pass compiles once per group, so a larger budget on a
big accelerator means fewer, larger groups.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from ptq_jax import aot
from ptq_jax.distributed import (allgather_owned, local_devices, map_over_devices,
                                 padded_batches, process_share)
from ptq_jax.linear import LayerGeometry, apply_linear
from ptq_jax.quant.qmodel import LayerQuant, apply_quantized, quantized_input, quantized_weight
from ptq_jax.trace import LayerInfo

MODES = ('parallel', 'sequential')
LR_SCHEDULES = ('constant', 'cosine')


@dataclasses.dataclass(frozen=True)
class AdaQuantConfig:
  """Optimisation settings.

  The learning rates, iteration count and minibatch are the reference code's; the
  cosine decay of every rate to 0 is ours: with constant rates, 1000 parallel-mode
  iterations on ResNet-20 W4A4 ended *below* baseline PTQ (the kernel drifts), with
  the decay they end best of the variants we tried on held-out data
  (``benchmarks/adaquant_tuning.py``, results/adaquant_tuning.md).
  """

  iterations: int = 1000
  batch_size: int = 50
  lr_kernel: float = 1e-5
  lr_bias: float = 1e-3
  lr_w_quant: float = 1e-3
  lr_a_quant: float = 1e-1
  lr_schedule: str = 'cosine'           # or 'constant' (the reference's)
  steps_per_call: Optional[int] = None  # None: 1 on CPU, all iterations elsewhere
  capture_budget_mb: float = 1024.0     # memory for captured layer inputs (host on CPU)
  capture_batch_size: int = 100
  precompile: bool = False              # compile every layer's programs up front on a
  #                                       thread pool (see ptq_jax.aot: no gain measured on
  #                                       an H200; the persistent cache is what helps)
  compile_threads: int = 0              # 0: one per CPU core
  eval_batch_size: Optional[int] = None  # batch of the float-target and error passes;
  #                                       None: see eval_batches()

  def validate(self) -> 'AdaQuantConfig':
    if self.iterations < 0 or self.batch_size < 1:
      raise ValueError(f'AdaQuant needs iterations >= 0 and batch_size >= 1, got '
                       f'{self.iterations} and {self.batch_size}.')
    for name in ('lr_kernel', 'lr_bias', 'lr_w_quant', 'lr_a_quant'):
      if getattr(self, name) < 0:
        raise ValueError(f'AdaQuant {name} must be >= 0, got {getattr(self, name)}.')
    if self.eval_batch_size is not None and self.eval_batch_size < 1:
      raise ValueError(f'AdaQuant eval_batch_size must be >= 1 or None, got '
                       f'{self.eval_batch_size}.')
    if self.lr_schedule not in LR_SCHEDULES:
      raise ValueError(f'AdaQuant lr_schedule must be one of {LR_SCHEDULES}, got '
                       f'{self.lr_schedule!r}.')
    return self

  def rates(self) -> jnp.ndarray:
    """The four learning rates and the iteration count, as one array argument (so
    changing them does not recompile the step)."""
    # (device_put: jnp.asarray would compile a copy program for it.)
    return jax.device_put(np.array([self.lr_kernel, self.lr_bias, self.lr_w_quant,
                                    self.lr_a_quant, max(self.iterations, 1)], np.float32))

  def eval_batches(self, n: int) -> Optional[int]:
    """The batch in which a layer's float target and reconstruction error are computed
    over ``n`` captured inputs, inside one program each (``lax.map``); None: the CPU
    way, the target in one call and the error in host-side batches of ERROR_BATCH
    (XLA's CPU backend runs convs inside loops far slower).

    Elsewhere the default is the minibatch size: those passes' convs then have the
    step's shapes, so a GPU autotunes each conv shape once per layer geometry rather
    than again at the whole set and at ERROR_BATCH."""
    if self.eval_batch_size is not None:
      return min(self.eval_batch_size, n)
    return None if jax.default_backend() == 'cpu' else min(self.batch_size, n)

  def single_program(self, n: int) -> bool:
    """Whether AdaQuant of a layer on ``n`` inputs runs as one compiled program
    (target, errors, optimiser start and every step): when its passes are batched (off
    CPU by default) and one call runs all the iterations (off CPU by default)."""
    return (self.eval_batches(n) is not None and self.iterations >= 1
            and self.chunk() >= self.iterations)

  def chunk(self) -> int:
    if self.steps_per_call:
      return max(1, min(self.steps_per_call, max(self.iterations, 1)))
    return 1 if jax.default_backend() == 'cpu' else max(self.iterations, 1)

  def step_counts(self) -> Tuple[int, ...]:
    """The distinct ``steps`` values :func:`optimize_layer` calls the step with."""
    chunk = self.chunk()
    counts = set()
    if self.iterations >= chunk:
      counts.add(chunk)
    if self.iterations % chunk:
      counts.add(1)
    return tuple(sorted(counts))


def activation_fn(name: str):
  """The activation the traced graph found after a layer."""
  return {'relu': jax.nn.relu, 'relu6': lambda y: jnp.clip(y, 0.0, 6.0),
          'none': lambda y: y}[name]


def _labels(lq: LayerQuant) -> LayerQuant:
  """The optimizer group of every leaf of ``lq`` (for ``optax.multi_transform``)."""
  def group(q, name):
    return None if q is None else q.replace(range=name, low=name)
  return LayerQuant('kernel', 'bias', group(lq.w_quant, 'w_quant'), group(lq.a_quant, 'a_quant'))


def _optimizer(rates: jnp.ndarray, labels: LayerQuant, schedule: str
               ) -> optax.GradientTransformation:
  """Adam per parameter group; ``rates`` is :meth:`AdaQuantConfig.rates`."""
  def rate(i):
    if schedule == 'constant':
      return rates[i]
    return lambda count: rates[i] * 0.5 * (1 + jnp.cos(jnp.pi * jnp.minimum(count / rates[4], 1)))
  return optax.multi_transform(
      {'kernel': optax.adam(rate(0)), 'bias': optax.adam(rate(1)),
       'w_quant': optax.adam(rate(2)), 'a_quant': optax.adam(rate(3))}, labels)


def layer_output(geom: LayerGeometry, activation: str, lq: LayerQuant,
                 x: jnp.ndarray) -> jnp.ndarray:
  """``f(Q(W) Q(x) + b)`` for one layer."""
  y = apply_linear(geom, quantized_input(lq, x), quantized_weight(lq)) + lq.bias
  return activation_fn(activation)(y)


def float_target(geom: LayerGeometry, activation: str, lq: LayerQuant,
                 x: jnp.ndarray) -> jnp.ndarray:
  """``f(W x + b)`` with the float folded weights (the reconstruction target)."""
  return activation_fn(activation)(apply_linear(geom, x, lq.kernel) + lq.bias)


_float_target = jax.jit(float_target, static_argnums=(0, 1))


@functools.partial(jax.jit, static_argnums=0)
def _init_optimizer(schedule: str, rates: jnp.ndarray, lq: LayerQuant):
  return _optimizer(rates, _labels(lq), schedule).init(lq)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _run_steps(geom: LayerGeometry, activation: str, steps: int, batch: int, schedule: str,
               lq: LayerQuant, opt_state, xs, ys, key, step0, rates):
  """``steps`` Adam steps on one layer. The module is not an argument of this or the
  programs below, only its geometry, so ``jax.jit`` compiles each once per geometry,
  shapes and bit widths."""
  tx = _optimizer(rates, _labels(lq), schedule)

  def loss_fn(lq, x, y):
    return jnp.mean((layer_output(geom, activation, lq, x) - y)**2)

  def minibatch(i):
    return jax.random.choice(jax.random.fold_in(key, step0 + i), xs.shape[0], (batch,),
                             replace=False)
  # Every step's minibatch drawn up front in one batched op (the same indices as drawing
  # them step by step), so the loop body holds no small sort kernels.
  indices = minibatch(0)[None] if steps == 1 else jax.vmap(minibatch)(jnp.arange(steps))

  def body(i, carry):
    lq, opt_state, _ = carry
    idx = indices[i]
    loss, grads = jax.value_and_grad(loss_fn)(lq, xs[idx], ys[idx])
    updates, opt_state = tx.update(grads, opt_state, lq)
    return optax.apply_updates(lq, updates), opt_state, loss

  carry = (lq, opt_state, jnp.zeros((), jnp.float32))
  if steps == 1:
    return body(0, carry)
  return jax.lax.fori_loop(0, steps, body, carry)


def compiled_step_count() -> int:
  """How many AdaQuant step programs (:func:`_run_steps`, :func:`_fit_layer`) have been
  compiled so far (tests, benchmarks)."""
  return _run_steps._cache_size() + _fit_layer._cache_size()


@functools.partial(jax.jit, static_argnums=(0, 1))
def _error_sums(geom: LayerGeometry, activation: str, lq: LayerQuant, x, y):
  err = layer_output(geom, activation, lq, x) - y
  return jnp.sum(err**2), jnp.sum(y**2)


ERROR_BATCH = 250


def _in_batches(fn, batch: int, *arrays):
  """``fn`` over leading-axis batches of ``arrays`` (``lax.map``; a smaller last call
  for the remainder), stacked back."""
  n = arrays[0].shape[0]
  full = n // batch * batch
  parts = []
  if full:
    split = [a[:full].reshape((full // batch, batch) + a.shape[1:]) for a in arrays]
    out = jax.lax.map(lambda xs: fn(*xs), split)
    parts.append(jax.tree.map(lambda o: o.reshape((full,) + o.shape[2:]), out))
  if full < n:
    parts.append(fn(*[a[full:] for a in arrays]))
  return parts[0] if len(parts) == 1 else jax.tree.map(lambda *p: jnp.concatenate(p), *parts)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _batched_float_target(geom: LayerGeometry, activation: str, batch: int, lq: LayerQuant, xs):
  return _in_batches(functools.partial(float_target, geom, activation, lq), batch, xs)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _batched_error_sums(geom: LayerGeometry, activation: str, batch: int, lq: LayerQuant,
                        xs, ys):
  def sums(x, y):   # per-example sums, added up after (no carry across batches)
    per_example = lambda a: jnp.sum(a.reshape(len(a), -1)**2, axis=1)
    return per_example(layer_output(geom, activation, lq, x) - y), per_example(y)
  err, ref = _in_batches(sums, batch, xs, ys)
  return jnp.sum(err), jnp.sum(ref)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
def _fit_layer(geom: LayerGeometry, activation: str, steps: int, batch: int, schedule: str,
               eval_batch: int, lq: LayerQuant, xs, ys, key, rates):
  """A layer's whole AdaQuant in one program: the float target (``ys=None``: the float
  layer's own outputs on ``xs``, as in parallel mode), the error before, the optimiser
  state, all ``steps`` steps and the error after. Used off CPU when one call runs every
  iteration: one compilation per layer geometry instead of four, and the passes'
  convs all have the minibatch's shapes (``eval_batch``). Returns the new state and
  the (error, target) sums of squares before and after."""
  # (The jitted helpers called here are traced into this one program, not compiled apart.)
  if ys is None:
    ys = _batched_float_target(geom, activation, eval_batch, LayerQuant(lq.kernel, lq.bias), xs)
  before = _batched_error_sums(geom, activation, eval_batch, lq, xs, ys)
  opt_state = _init_optimizer(schedule, rates, lq)
  lq, _, _ = _run_steps(geom, activation, steps, batch, schedule, lq, opt_state, xs, ys, key,
                        np.int32(0), rates)
  return lq, before, _batched_error_sums(geom, activation, eval_batch, lq, xs, ys)


def float_targets(geom: LayerGeometry, activation: str, lq: LayerQuant, xs: jnp.ndarray,
                  batch: Optional[int] = None) -> jnp.ndarray:
  """:func:`float_target` over a whole captured set, in ``batch``-sized pieces inside
  one program, or (``batch=None``) in one call."""
  if batch is None:
    return _float_target(geom, activation, lq, xs)
  return _batched_float_target(geom, activation, batch, lq, xs)


def _error_batch_sizes(n: int, batch: int = ERROR_BATCH) -> Tuple[int, ...]:
  return tuple(sorted({min(batch, n - start) for start in range(0, n, batch)}))


def reconstruction_error(geom: LayerGeometry, activation: str, lq: LayerQuant, xs: jnp.ndarray,
                         ys: jnp.ndarray, batch: Optional[int] = None) -> Tuple[float, float]:
  """(MSE, MSE / mean(target^2)) of a quantized layer over a whole captured set: in
  ``batch``-sized pieces inside one program, or (``batch=None``) in host-side calls of
  ERROR_BATCH examples."""
  if batch is not None:
    return _relative_error(_batched_error_sums(geom, activation, batch, lq, xs, ys), ys.size)
  total_err = total_ref = 0.0
  for start in range(0, xs.shape[0], ERROR_BATCH):
    e, r = _error_sums(geom, activation, lq, xs[start:start + ERROR_BATCH],
                       ys[start:start + ERROR_BATCH])
    total_err, total_ref = total_err + float(e), total_ref + float(r)
  return _relative_error((total_err, total_ref), ys.size)


def _relative_error(sums, count: int) -> Tuple[float, float]:
  """(MSE, MSE / mean(target^2)) from the sums of squared errors and targets."""
  total_err, total_ref = map(float, sums)
  mse = total_err / count
  return mse, mse / max(total_ref / count, 1e-30)


def optimize_layer(layer: LayerInfo, lq: LayerQuant, xs: jnp.ndarray,
                   ys: Optional[jnp.ndarray], config: AdaQuantConfig, key: jax.Array,
                   device: Optional[Any] = None) -> Tuple[LayerQuant, Dict[str, Any]]:
  """AdaQuant of one layer on captured inputs ``xs`` and float targets ``ys`` (None:
  the float layer's own outputs on ``xs``, i.e. ``lq``'s kernel and bias unquantized,
  as in parallel mode).

  Off CPU (batched passes, every step in one call) this is one compiled program per
  layer geometry (:func:`_fit_layer`); otherwise the target, errors and step loop are
  separate calls. With ``device``, everything is committed to it first: the layer runs
  there (layer-parallel mode) and the calls find the programs :func:`layer_programs`
  compiled ahead of time for it. Without, the arrays stay where they are."""
  start = time.time()
  geom = layer.geometry
  rates = config.rates()
  pin = (lambda tree: aot.commit(tree, device)) if device is not None else (lambda tree: tree)
  lq, xs, ys, key, rates = pin((lq, xs, ys, key, rates))
  n = xs.shape[0]
  eval_batch = config.eval_batches(n)
  batch = min(config.batch_size, n)
  if config.single_program(n):
    lq, before, after = _fit_layer(geom, layer.activation, config.iterations, batch,
                                   config.lr_schedule, eval_batch, lq, xs, ys, key, rates)
    count = n * int(np.prod(layer.output_shape))   # target elements
    (before, rel_before), (after, rel_after) = (_relative_error(before, count),
                                                _relative_error(after, count))
  else:
    if ys is None:
      ys = float_targets(geom, layer.activation, LayerQuant(lq.kernel, lq.bias), xs,
                         eval_batch)
    before, rel_before = reconstruction_error(geom, layer.activation, lq, xs, ys, eval_batch)
    chunk = config.chunk()
    # (Committed again: outputs that do not depend on an input come back uncommitted.)
    opt_state = pin(_init_optimizer(config.lr_schedule, rates, lq))
    done = 0
    while done < config.iterations:
      # Full chunks, then the remainder one step at a time (no new loop length to compile).
      steps = chunk if config.iterations - done >= chunk else 1
      # (The step's outputs stay committed; ``step0`` goes uncommitted, as it was compiled.)
      lq, opt_state, _ = _run_steps(geom, layer.activation, steps, batch, config.lr_schedule,
                                    lq, opt_state, xs, ys, key, np.int32(done), rates)
      done += steps
    after, rel_after = reconstruction_error(geom, layer.activation, lq, xs, ys, eval_batch)
  report = {'path': layer.path, 'activation': layer.activation,
            'w_bits': lq.w_quant.bits if lq.w_quant else None,
            'a_bits': lq.a_quant.bits if lq.a_quant else None,
            'mse_before': before, 'mse_after': after, 'rel_error_before': rel_before,
            'rel_error_after': rel_after, 'iterations': config.iterations,
            'seconds': time.time() - start}
  return lq, report


def layer_programs(layer: LayerInfo, lq: LayerQuant, n_images: int, config: AdaQuantConfig,
                   device: Any, mode: str = 'parallel'
                   ) -> List[Tuple[Any, Any, Tuple[Any, ...]]]:
  """``(key, jitted function, abstract arguments)`` of every program that AdaQuant of
  ``layer`` on ``n_images`` captured inputs runs on ``device`` in ``mode``, as
  :func:`optimize_layer` calls them (the float target, the reconstruction error, the
  optimiser's start and the step loop, or the one program doing all of that). Layers
  with the same geometry, shapes and bit widths give the same keys (one compilation
  serves them all)."""
  geom, act = layer.geometry, layer.activation
  at = functools.partial(aot.abstract, device=device)
  lq_a = at(lq)
  float_a = LayerQuant(lq_a.kernel, lq_a.bias)
  xs_a = at(jax.ShapeDtypeStruct((n_images,) + tuple(layer.input_shape), jnp.float32))
  ys_a = at(jax.eval_shape(functools.partial(float_target, geom, act), float_a, xs_a))
  rates_a = at(config.rates())
  key_a = at(jax.eval_shape(lambda: jax.random.key(0)))
  eval_batch = config.eval_batches(n_images)
  single = config.single_program(n_images)
  programs = []
  if eval_batch is None:
    statics = (geom, act)
    programs.append((('float_target', statics, aot.signature((float_a, xs_a))), _float_target,
                     (geom, act, float_a, xs_a)))
    for b in _error_batch_sizes(n_images):
      part = lambda a: at(jax.ShapeDtypeStruct((b,) + a.shape[1:], a.dtype))
      args = (lq_a, part(xs_a), part(ys_a))
      programs.append((('error_sums', statics, aot.signature(args)), _error_sums,
                       (geom, act) + args))
  else:
    statics = (geom, act, eval_batch)
    if mode == 'sequential' or not single:   # (the single program computes parallel targets)
      programs.append((('batched_float_target', statics, aot.signature((float_a, xs_a))),
                       _batched_float_target, statics + (float_a, xs_a)))
    if single:
      statics = (geom, act, config.iterations, min(config.batch_size, n_images),
                 config.lr_schedule, eval_batch)
      args = (lq_a, xs_a, ys_a if mode == 'sequential' else None, key_a, rates_a)
      return programs + [(('fit_layer', statics, aot.signature(args)), _fit_layer,
                          statics + args)]
    programs.append((('batched_error_sums', statics, aot.signature((lq_a, xs_a, ys_a))),
                     _batched_error_sums, statics + (lq_a, xs_a, ys_a)))
  programs.append((('init_optimizer', config.lr_schedule, aot.signature((rates_a, lq_a))),
                   _init_optimizer, (config.lr_schedule, rates_a, lq_a)))
  opt_a = at(jax.eval_shape(functools.partial(_init_optimizer, config.lr_schedule), rates_a,
                            lq_a))
  step0_a = jax.ShapeDtypeStruct((), jnp.int32)   # a host scalar, not committed
  batch = min(config.batch_size, n_images)
  for steps in config.step_counts():
    statics = (geom, act, steps, batch, config.lr_schedule)
    args = (lq_a, opt_a, xs_a, ys_a, key_a, step0_a, rates_a)
    programs.append((('run_steps', statics, aot.signature(args)), _run_steps, statics + args))
  return programs


class InputCapture:
  """Captures the float inputs that layers receive when the network computes with a
  given quantization state, over a whole image set, one jitted pass per batch.

  The pass is compiled once per group of layers (``paths``) and state structure;
  ``keep`` says which of the group's inputs to hold. Batches are split over
  ``devices`` (default: all local devices).
  """

  def __init__(self, model: nn.Module, variables: Mapping[str, Any], folded_bns: frozenset,
               batch_size: int = 100, devices: Optional[Sequence[Any]] = None):
    self.variables, self.batch_size = variables, batch_size
    self.devices = local_devices(devices)

    def batch_inputs(variables, qstate, x, paths):
      found: Dict[str, jnp.ndarray] = {}

      def on_layer(path, inputs):
        if path in paths and path not in found:
          found[path] = inputs
      apply_quantized(model, variables, qstate, folded_bns, x, on_layer=on_layer)
      return found

    self._batch_inputs = jax.jit(batch_inputs, static_argnums=3)

  def __call__(self, qstate: Mapping[str, LayerQuant], images: np.ndarray,
               paths: Sequence[str], keep: Optional[Sequence[str]] = None
               ) -> Dict[str, jnp.ndarray]:
    keep = list(paths if keep is None else keep)
    # On CPU the inputs gather in host memory; on an accelerator they stay on the device
    # (no round trip through the host for every layer group).
    to_host = jax.default_backend() == 'cpu'
    parts: Dict[str, List[Any]] = {p: [] for p in keep}
    for batch, n in padded_batches(images, self.batch_size, self.devices):
      found = self._batch_inputs(self.variables, qstate, batch, tuple(paths))
      for p in keep:
        parts[p].append(np.asarray(found[p][:n], np.float32) if to_host else found[p][:n])
    if to_host:
      return {p: jnp.asarray(np.concatenate(parts[p])) for p in keep}
    return {p: jnp.concatenate(parts.pop(p)) for p in keep}


def _capture_groups(layers: Sequence[LayerInfo], n_images: int, budget_mb: float
                    ) -> List[List[LayerInfo]]:
  """Consecutive groups of layers whose captured inputs fit in ``budget_mb``."""
  groups, current, size = [], [], 0.0
  for layer in layers:
    mb = n_images * int(np.prod(layer.input_shape)) * 4 / 2**20
    if current and size + mb > budget_mb:
      groups.append(current)
      current, size = [], 0.0
    current.append(layer)
    size += mb
  if current:
    groups.append(current)
  return groups


def run_adaquant(model: nn.Module, variables: Mapping[str, Any], layers: Sequence[LayerInfo],
                 qstate: Mapping[str, LayerQuant], images: np.ndarray, mode: str = 'parallel',
                 config: AdaQuantConfig = AdaQuantConfig(), key: Optional[jax.Array] = None,
                 progress: bool = True, devices: Optional[Sequence[Any]] = None
                 ) -> Tuple[Dict[str, LayerQuant], List[Dict[str, Any]]]:
  """AdaQuant of every quantized layer; returns the new state and a per-layer report.

  ``qstate`` holds the starting point (folded weights and calibrated quantizers);
  layers without quantizers, or without a plain geometry, are left as they are.
  ``devices`` (default: all local devices): the capture passes are split over them
  and, in parallel mode, the layers are dealt to them (and, under
  ``jax.distributed``, to the processes); see :mod:`ptq_jax.distributed`.
  """
  if mode not in MODES:
    raise ValueError(f'AdaQuant mode must be one of {MODES}, got {mode!r}.')
  config = config.validate()
  devices = local_devices(devices)
  key = jax.random.key(0) if key is None else key
  folded_bns = frozenset(l.bn_path for l in layers if l.bn_path)
  float_state = {p: LayerQuant(lq.kernel, lq.bias) for p, lq in qstate.items()}
  todo = [l for l in layers if l.geometry is not None
          and (qstate[l.path].w_quant is not None or qstate[l.path].a_quant is not None)]
  index = {l.path: i for i, l in enumerate(layers)}
  new_state = dict(qstate)
  reports: Dict[str, Dict[str, Any]] = {}
  mine = {todo[k].path for k in process_share(len(todo))}  # this process's layers
  groups = _capture_groups(todo, len(images), config.capture_budget_mb)
  # Where each layer runs: parallel mode deals a group's layers (this process's share)
  # round-robin over the devices (map_over_devices), sequential mode uses the first.
  placement = {}
  for group in groups:
    share = [l for l in group if mode == 'sequential' or l.path in mine]
    for i, layer in enumerate(share):
      placement[layer.path] = devices[0] if mode == 'sequential' else devices[i % len(devices)]
  precompiler = aot.Precompiler(config.compile_threads or None) if config.precompile else None
  program_keys: Dict[str, List[Any]] = {}
  if precompiler is not None:  # compiles while the main thread captures inputs
    for layer in todo:
      if layer.path in placement:
        programs = layer_programs(layer, qstate[layer.path], len(images), config,
                                  placement[layer.path], mode)
        program_keys[layer.path] = [k for k, _, _ in programs]
        for program_key, fn, args in programs:
          precompiler.submit(program_key, fn, *args)
  bar = tqdm(total=len(todo), desc=f'AdaQuant ({mode})', disable=not progress, leave=False)
  capture = InputCapture(model, variables, folded_bns, config.capture_batch_size, devices)

  def optimize(layer, x_fp, x=None, device=None):
    spread = device is not None and len(devices) > 1  # layer-parallel: this layer on `device`
    waited = time.time()
    if precompiler is not None:
      precompiler.wait(program_keys.get(layer.path, []))
    waited = time.time() - waited
    # Pinned to its device when layer-parallel or compiled ahead of time for it.
    pin = placement[layer.path] if spread or precompiler is not None else None
    y = None   # parallel mode: optimize_layer computes the float target from x_fp
    if x is not None:   # sequential mode: trained on x, the target from the float inputs
      float_lq = float_state[layer.path]
      if pin is not None:
        x_fp, float_lq = aot.commit((x_fp, float_lq), pin)
      y = float_targets(layer.geometry, layer.activation, float_lq, x_fp,
                        config.eval_batches(len(x_fp)))
    lq, report = optimize_layer(layer, qstate[layer.path], x_fp if x is None else x, y, config,
                                jax.random.fold_in(key, index[layer.path]), pin)
    report['mode'], report['compile_wait_seconds'] = mode, waited
    if spread:  # back to the host: later passes may run on any device
      lq, report['device'] = jax.device_get(lq), str(device)
    return lq, report

  def done(layer, lq, report):
    new_state[layer.path] = lq
    reports[layer.path] = report
    bar.set_postfix_str(f'{layer.path}: rel err {report["rel_error_before"]:.3g} -> '
                        f'{report["rel_error_after"]:.3g}')
    bar.update()

  try:
    for group in groups:
      group_paths = [l.path for l in group]
      if mode == 'sequential':
        fp_inputs = capture(float_state, images, group_paths)
        for layer in group:
          # Inputs from the quantized prefix: layers before this one already optimised.
          x = capture(new_state, images, group_paths, keep=[layer.path])[layer.path]
          done(layer, *optimize(layer, fp_inputs.pop(layer.path), x))
          del x
        continue
      group = [l for l in group if l.path in mine]
      if not group:
        continue
      fp_inputs = capture(float_state, images, group_paths, keep=[l.path for l in group])
      items = [(layer, fp_inputs.pop(layer.path)) for layer in group]
      for i, (lq, report) in map_over_devices(lambda item, d: optimize(*item, device=d),
                                              items, devices):
        done(group[i], lq, report)
      del items
  except BaseException:
    if precompiler is not None:
      precompiler.cancel()
    raise
  finally:
    bar.close()
    if precompiler is not None:
      precompiler.close()
  if jax.process_count() > 1 and mode == 'parallel':
    _exchange_between_processes(todo, qstate, new_state, reports, mine, config.iterations)
  return new_state, [reports[l.path] for l in todo]


_NUMERIC_REPORT_FIELDS = ('mse_before', 'mse_after', 'rel_error_before', 'rel_error_after',
                          'seconds')


def _exchange_between_processes(todo, qstate, new_state, reports, mine, iterations) -> None:
  """Multi-host parallel mode: every process ends with every layer's state and report."""
  owner = [k % jax.process_count() for k in range(len(todo))]
  trees = []
  for layer in todo:
    lq = new_state[layer.path] if layer.path in mine else qstate[layer.path]
    numbers = np.array([reports[layer.path][f] if layer.path in mine else 0.0
                        for f in _NUMERIC_REPORT_FIELDS], np.float64)
    trees.append((jax.device_get(lq), numbers))
  for layer, o, (lq, numbers) in zip(todo, owner, allgather_owned(trees, owner)):
    new_state[layer.path] = lq
    if layer.path not in mine:
      w, a = lq.w_quant, lq.a_quant
      reports[layer.path] = {'path': layer.path, 'activation': layer.activation,
                             'w_bits': w.bits if w else None, 'a_bits': a.bits if a else None,
                             **dict(zip(_NUMERIC_REPORT_FIELDS, map(float, numbers))),
                             'iterations': iterations, 'mode': 'parallel', 'process': o}
