"""AdaQuant of a whole model: which layers, in which order, on which inputs and devices.

* parallel mode: every layer is fitted to the float model's inputs and targets, so
  the layers are independent; they are dealt round-robin to the local devices and,
  under ``jax.distributed``, to the processes, which exchange the results.
* sequential mode: each layer is fitted to the inputs of the already-quantized
  prefix (the whole calibration set), with the float model's targets.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import jax
import numpy as np
from tqdm.auto import tqdm

from ptq_jax.distributed import allgather_owned, local_devices, map_over_devices, process_share
from ptq_jax.quant.capture import InputCapture, capture_groups
from ptq_jax.quant.interceptor import LayerQuant, layer_states, site_key
from ptq_jax.stages.adaquant.block import run_blocks
from ptq_jax.stages.adaquant.config import MODES, AdaQuantConfig, AdaQuantRuntime
from ptq_jax.stages.adaquant.layer import commit, float_targets, optimize_layer
from ptq_jax.stages.adaquant.progress import Progress
from ptq_jax.stages.adaquant.report import UnitReport
from ptq_jax.stages.adaquant.shared import optimize_shared_layer
from ptq_jax.stages.prepare import Prepared
from ptq_jax.trace import LayerInfo

log = logging.getLogger(__name__)


def run_adaquant(prepared: Prepared, qstate: Mapping[str, LayerQuant], mode: str = 'parallel',
                 config: AdaQuantConfig = AdaQuantConfig(), key: Optional[jax.Array] = None,
                 runtime: AdaQuantRuntime = AdaQuantRuntime(),
                 devices: Optional[Sequence[Any]] = None
                 ) -> Tuple[Dict[str, LayerQuant], List[UnitReport]]:
  """AdaQuant of every quantized layer; returns the new state and a per-layer report
  (per block with ``config.unit='block'``, :func:`~.block.run_blocks`).

  ``qstate`` holds the starting point (folded weights and calibrated quantizers);
  layers without quantizers, or without a plain geometry, are left as they are.
  ``devices`` (default: all local devices): the capture passes are split over them
  and, in parallel mode, the layers are dealt to them (and, under
  ``jax.distributed``, to the processes); see :mod:`ptq_jax.distributed`.
  """
  if mode not in MODES:
    raise ValueError(f'AdaQuant mode must be one of {MODES}, got {mode!r}.')
  config = config.validate()
  key = jax.random.key(0) if key is None else key
  if config.unit == 'block':
    return run_blocks(prepared, qstate, mode, config, key, runtime)
  todo = _layers_to_optimize(prepared, qstate, config)
  progress = Progress.open(runtime.resume_dir, prepared, qstate, mode, config, key)
  run = _LayerRun(prepared, dict(qstate), mode, config, key, runtime, local_devices(devices),
                  progress)
  mine = {todo[k].path for k in process_share(len(todo))}  # this process's layers
  groups = capture_groups(todo, len(prepared.images), runtime.capture_budget_mb)
  bar = tqdm(total=len(todo), desc=f'AdaQuant ({mode})', disable=not prepared.progress,
             leave=False)
  bar.update(run.restore(todo))
  try:
    for group in groups:
      if mode == 'sequential':
        run.sequential_group(group, bar)
      else:
        run.parallel_group([l for l in group if l.path in mine], group, bar)
  finally:
    bar.close()
  if jax.process_count() > 1 and mode == 'parallel':
    _exchange_between_processes(todo, qstate, run.new_state, run.reports, mine,
                                config.iterations)
  guarded = [p for p, r in run.reports.items() if r.guard_acted]
  if guarded:
    log.info('AdaQuant guard: %d layer(s) kept an earlier state, their error having risen by '
             'the last step: %s%s', len(guarded), guarded[:6], '...' if len(guarded) > 6 else '')
  return run.new_state, [run.reports[l.path] for l in todo]


def _layers_to_optimize(prepared: Prepared, qstate: Mapping[str, LayerQuant],
                        config: AdaQuantConfig) -> List[LayerInfo]:
  """The quantized layers with a plain geometry, warning about the ones left out and
  the shared ones that take free updates only."""
  quantized = [l for l in prepared.layers
               if qstate[l.path].w_quant is not None or qstate[l.path].a_quant is not None]
  todo = [l for l in quantized if l.geometry is not None]
  skipped = [l.path for l in quantized if l.geometry is None]
  if skipped:
    warnings.warn(f'AdaQuant leaves {skipped} at their calibrated ranges: a convolution with a '
                  'mask or CIRCULAR/CAUSAL padding has no plain lax form for the per-layer '
                  'optimiser (they are quantized, not optimised).', UserWarning, stacklevel=3)
  shared = [l.path for l in todo if l.sites > 1]
  if shared and (config.rounding == 'learned' or config.drop_prob > 0):
    warnings.warn(f'AdaQuant optimises the shared layers {shared} with free weight updates and '
                  'no QDrop (learned rounding and drop_prob apply to layers called once).',
                  UserWarning, stacklevel=3)
  return todo


class _LayerRun:
  """One AdaQuant run over layers: the inputs each layer is fitted on (captured per group
  of layers within the memory budget), its fit, and the state and reports so far."""

  def __init__(self, prepared: Prepared, qstate: Dict[str, LayerQuant], mode: str,
               config: AdaQuantConfig, key: jax.Array, runtime: AdaQuantRuntime,
               devices: Sequence[Any], progress: Optional[Progress] = None):
    self.qstate, self.mode, self.config, self.key = qstate, mode, config, key
    self.progress, self.restored = progress, set()
    self.runtime, self.devices, self.images = runtime, devices, prepared.images
    self.float_state = {p: LayerQuant(lq.kernel, lq.bias)
                        for p, lq in layer_states(qstate).items()}
    self.index = {l.path: i for i, l in enumerate(prepared.layers)}
    self.holdout = config.holdout_split(len(prepared.images), key)  # the same for every layer
    self.new_state, self.reports = dict(qstate), {}
    self.capture = InputCapture(prepared.model, prepared.variables, prepared.folded_bns,
                                runtime.capture_batch_size, devices)

  def restore(self, todo: Sequence[LayerInfo]) -> int:
    """Takes the layers an earlier, killed run finished from its progress file;
    returns how many."""
    for layer in todo:
      if self.progress is not None and layer.path in self.progress:
        states, self.reports[layer.path] = self.progress.restored(layer.path)
        self.new_state.update(states)
        self.restored.add(layer.path)
    return len(self.restored)

  def sequential_group(self, group: Sequence[LayerInfo], bar) -> None:
    """Each layer fitted on the inputs of the already-optimised prefix, in order."""
    group_paths = [k for l in group for k in site_keys(l)]
    group = [l for l in group if l.path not in self.restored]
    if not group:
      return
    fp_inputs = self.capture(self.float_state, self.images, group_paths,
                             keep=[k for l in group for k in site_keys(l)])
    for layer in group:
      x = self.capture(self.new_state, self.images, group_paths, keep=site_keys(layer))
      self._done(layer, *self._optimize(layer, [fp_inputs.pop(k) for k in site_keys(layer)],
                                        [x[k] for k in site_keys(layer)]), bar)
      del x

  def parallel_group(self, mine: Sequence[LayerInfo], group: Sequence[LayerInfo],
                     bar) -> None:
    """This process's layers of ``group`` fitted on the float inputs, dealt to devices."""
    mine = [l for l in mine if l.path not in self.restored]
    if not mine:
      return
    fp_inputs = self.capture(self.float_state, self.images,
                             [k for l in group for k in site_keys(l)],
                             keep=[k for l in mine for k in site_keys(l)])
    items = [(layer, [fp_inputs.pop(k) for k in site_keys(layer)]) for layer in mine]
    for i, (lq, report) in map_over_devices(lambda item, d: self._optimize(*item, device=d),
                                            items, self.devices):
      self._done(mine[i], lq, report, bar)

  def _optimize(self, layer: LayerInfo, x_fp, x=None, device=None):
    """``x_fp`` / ``x``: the float / quantized-prefix inputs, one per call site."""
    config, runtime = self.config, self.runtime
    # Layer-parallel over several devices: this layer is pinned to ``device``.
    pin = device if device is not None and len(self.devices) > 1 else None
    ys = [None] * len(x_fp)   # parallel mode: the float target is computed from x_fp
    if x is not None:   # sequential mode: trained on x, the target from the float inputs
      float_lq = self.float_state[layer.path]
      if pin is not None:
        x_fp, float_lq = commit((x_fp, float_lq), pin)
      ys = [float_targets(layer.geometry, layer.activation, float_lq, xf,
                          runtime.eval_batches(len(xf), config)) for xf in x_fp]
    layer_key = jax.random.fold_in(self.key, self.index[layer.path])
    if layer.sites > 1:
      xs, lq = (x_fp if x is None else x), self.qstate[layer.path]
      if pin is not None:
        xs, lq = commit((xs, lq), pin)
      lq, report = optimize_shared_layer(layer, lq, xs, ys, config, layer_key, self.holdout)
    else:
      lq, report = optimize_layer(layer, self.qstate[layer.path],
                                  (x_fp if x is None else x)[0], ys[0], config, layer_key, pin,
                                  runtime, self.holdout)
    report.mode = self.mode
    if pin is not None:  # back to the host: later passes may run on any device
      lq, report.device = jax.device_get(lq), str(device)
    return lq, report

  def _done(self, layer: LayerInfo, lq: LayerQuant, report: UnitReport, bar) -> None:
    self.new_state[layer.path] = lq
    self.reports[layer.path] = report
    if self.progress is not None:
      self.progress.record(layer.path, {layer.path: lq}, report)
    bar.set_postfix_str(f'{layer.path}: rel err {report.rel_error_before:.3g} -> '
                        f'{report.rel_error_after:.3g}')
    bar.update()


def site_keys(layer: LayerInfo) -> List[str]:
  """The capture keys of a layer's call sites (one unless it is shared)."""
  return [site_key(layer.path, s) for s in range(layer.sites)]


_NUMERIC_REPORT_FIELDS = ('mse_before', 'mse_after', 'rel_error_before', 'rel_error_after',
                          'rel_error_last_step', 'kept_iteration', 'guard_examples', 'seconds')


def _exchange_between_processes(todo, qstate, new_state, reports, mine, iterations) -> None:
  """Multi-host parallel mode: every process ends with every layer's state and report."""
  owner = [k % jax.process_count() for k in range(len(todo))]
  trees = []
  for layer in todo:
    lq = new_state[layer.path] if layer.path in mine else qstate[layer.path]
    numbers = np.array([getattr(reports[layer.path], f) if layer.path in mine else 0.0
                        for f in _NUMERIC_REPORT_FIELDS], np.float64)
    trees.append((jax.device_get(lq), numbers))
  for layer, o, (lq, numbers) in zip(todo, owner, allgather_owned(trees, owner)):
    new_state[layer.path] = lq
    if layer.path not in mine:
      w, a = lq.w_quant, lq.a_quant
      values = dict(zip(_NUMERIC_REPORT_FIELDS, map(float, numbers)))
      for field in ('kept_iteration', 'guard_examples'):
        values[field] = int(values[field])
      reports[layer.path] = UnitReport(
          layer.path, layer.activation, w.bits if w else None, a.bits if a else None,
          guard_acted=values['kept_iteration'] != iterations, iterations=iterations,
          mode='parallel', process=o, **values)
