"""Resumable AdaQuant: a reconstruction killed part-way and started again with the same
inputs goes on from its last finished unit and ends where an unbroken run ends."""

import os

import jax
import numpy as np
import pytest

import ptq_jax
from ptq_jax.checkpoint import CheckpointError
from ptq_jax.stages.adaquant import block as block_module
from ptq_jax.stages.adaquant import driver as driver_module
from ptq_jax.stages.adaquant.driver import run_adaquant
from ptq_jax.stages.adaquant.progress import Progress
from ptq_jax.stages.prepare import prepare
from test_quant import ToyNet, random_variables

LAYERS = ptq_jax.AdaQuantConfig(iterations=16, batch_size=16)
BLOCKS = ptq_jax.AdaQuantConfig(iterations=16, batch_size=16, unit='block',
                                rounding='learned', drop_prob=0.5)


class Killed(Exception):
  """Stands in for the process being killed."""


@pytest.fixture(scope='module')
def toy():
  model = ToyNet()
  x = np.asarray(jax.random.normal(jax.random.key(3), (48, 12, 12, 3)))
  variables = random_variables(model, x)
  base = ptq_jax.quantize(model, variables, x, w_bits=3, a_bits=4, first_last_bits=None,
                          progress=False)
  return prepare(model, variables, x, progress=False), base.qstate


def _run(toy, mode, config, resume_dir=None):
  prepared, qstate = toy
  return run_adaquant(prepared, qstate, mode, config, jax.random.key(5),
                      ptq_jax.AdaQuantRuntime(resume_dir=resume_dir))


def _same(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(np.array_equal(u, v) for u, v in zip(la, lb))


@pytest.mark.parametrize('mode,config,fit', [
    ('sequential', LAYERS, (driver_module, 'optimize_layer')),
    ('parallel', LAYERS, (driver_module, 'optimize_layer')),
    ('sequential', BLOCKS, (block_module, 'optimize_block'))],
    ids=['layers-sequential', 'layers-parallel', 'blocks-sequential'])
def test_a_killed_run_resumes_from_its_last_unit_and_ends_as_an_unbroken_one(
    toy, tmp_path, monkeypatch, caplog, mode, config, fit):
  """Catches a resumed run that redoes finished units, skips unfinished ones, restores a
  state into the wrong layer, or fits a later unit on inputs not recomputed from the
  restored prefix (the sequential runs would then differ from the unbroken one)."""
  unbroken_state, unbroken_reports = _run(toy, mode, config)
  record = Progress.record

  def killed_after_two(self, name, states, report):
    record(self, name, states, report)   # (saved first: the kill comes after the save)
    if len(self.units) == 2:
      raise Killed
  monkeypatch.setattr(Progress, 'record', killed_after_two)
  with pytest.raises(Killed):
    _run(toy, mode, config, str(tmp_path))
  monkeypatch.setattr(Progress, 'record', record)
  assert len(os.listdir(tmp_path)) == 1
  module, name = fit
  fitted, original = [], getattr(module, name)
  monkeypatch.setattr(module, name, lambda *a, **k: fitted.append(1) or original(*a, **k))
  with caplog.at_level('INFO', logger='ptq_jax.stages.adaquant.progress'):
    state, reports = _run(toy, mode, config, str(tmp_path))
  assert '2 unit(s) finished by an earlier run' in caplog.text
  assert len(fitted) == len(unbroken_reports) - 2
  assert [r.path for r in reports] == [r.path for r in unbroken_reports]
  assert [r.rel_error_after for r in reports] == [r.rel_error_after for r in unbroken_reports]
  assert _same(state, unbroken_state)
  fitted.clear()   # a finished run's file: nothing left to fit
  assert _same(_run(toy, mode, config, str(tmp_path))[0], unbroken_state) and not fitted


def test_other_settings_do_not_reuse_the_progress_and_a_damaged_file_is_refused(toy, tmp_path):
  """Catches a file named without the hyper-parameters (a run with other settings would
  take units fitted under the old ones) and a damaged file read as progress."""
  _run(toy, 'sequential', LAYERS, str(tmp_path))
  other = ptq_jax.AdaQuantConfig(iterations=17, batch_size=16)
  _run(toy, 'sequential', other, str(tmp_path))
  _run(toy, 'parallel', LAYERS, str(tmp_path))
  files = sorted(os.listdir(tmp_path))
  assert len(files) == 3
  for name in files:
    with open(tmp_path / name, 'r+b') as f:
      f.seek(-20, os.SEEK_END)
      f.write(b'\x00' * 8)
  with pytest.raises(CheckpointError, match='delete it to start this reconstruction again'):
    _run(toy, 'sequential', LAYERS, str(tmp_path))


def test_resume_dir_is_checked_before_any_work(toy, tmp_path):
  """Catches a resume_dir that is a file, or not a path, failing only after the first
  unit's work (or never)."""
  blocker = tmp_path / 'file'
  blocker.write_text('x')
  with pytest.raises(ValueError, match='resume_dir .* is a file'):
    _run(toy, 'sequential', LAYERS, str(blocker))
  with pytest.raises(TypeError, match='resume_dir must be a directory path'):
    ptq_jax.AdaQuantRuntime(resume_dir=3)


def test_a_pipeline_with_a_cache_dir_resumes_its_adaquant(toy, tmp_path, monkeypatch):
  """Catches ``run_pipeline(cache_dir=...)`` not reaching AdaQuant's runtime: its second
  run would fit every layer again."""
  prepared = toy[0]
  run = lambda: ptq_jax.run_pipeline(
      prepared.model, prepared.variables, prepared.images, 'sequential', w_bits=3, a_bits=4,
      first_last_bits=None, adaquant=LAYERS, bias_steps=2, cache_dir=str(tmp_path),
      progress=False)
  first = run()
  assert [n for n in os.listdir(tmp_path) if n.startswith('adaquant-')]
  fitted, original = [], driver_module.optimize_layer
  monkeypatch.setattr(driver_module, 'optimize_layer',
                      lambda *a, **k: fitted.append(1) or original(*a, **k))
  second = run()
  assert not fitted and _same(second.model.qstate, first.model.qstate)
