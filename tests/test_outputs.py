"""A run's outputs are one consistent set: staged, published with a manifest written
last, leftovers of killed runs removed, and any mix or change detected."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from ptq_jax.io import atomic_write_bytes, clean_stale_temps
from ptq_jax.jobs.outputs import MANIFEST, OutputsError, RunOutputs, verify_outputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_run(workdir, contents, job='quantize'):
  with RunOutputs(str(workdir), job) as out:
    for name, data in contents.items():
      atomic_write_bytes(out.path(name), data)
  return out


def dead_pid():
  proc = subprocess.Popen([sys.executable, '-c', 'pass'])
  proc.wait()
  return proc.pid


def test_commit_publishes_files_and_a_manifest(tmp_path):
  out = write_run(tmp_path, {'results.json': b'[1]', 'model.msgpack': b'abc'})
  assert sorted(os.listdir(tmp_path)) == [MANIFEST, 'model.msgpack', 'results.json']
  manifest = verify_outputs(str(tmp_path))
  assert manifest['run_id'] == out.run_id and set(manifest['files']) == {'results.json',
                                                                         'model.msgpack'}


def test_a_failed_run_leaves_the_previous_set_untouched(tmp_path):
  write_run(tmp_path, {'results.json': b'[1]'})
  before = verify_outputs(str(tmp_path))
  with pytest.raises(RuntimeError):
    with RunOutputs(str(tmp_path), 'quantize') as out:
      atomic_write_bytes(out.path('results.json'), b'[2]')
      raise RuntimeError('evaluation failed')
  assert verify_outputs(str(tmp_path)) == before
  assert sorted(os.listdir(tmp_path)) == [MANIFEST, 'results.json']   # no staging left


def test_a_file_from_another_run_or_edited_is_detected(tmp_path):
  write_run(tmp_path, {'results.json': b'[1]', 'model.msgpack': b'abc'})
  (tmp_path / 'model.msgpack').write_bytes(b'abd')
  with pytest.raises(OutputsError, match='model.msgpack is missing or not the file'):
    verify_outputs(str(tmp_path))
  with pytest.raises(OutputsError, match='no manifest.json'):
    verify_outputs(str(tmp_path / 'nothing'))


def test_outputs_of_the_last_run_that_this_run_does_not_make_are_removed(tmp_path):
  write_run(tmp_path, {'results.json': b'[1]', 'layers.png': b'png'})
  write_run(tmp_path, {'results.json': b'[2]'})
  assert sorted(os.listdir(tmp_path)) == [MANIFEST, 'results.json']
  (tmp_path / 'mine.txt').write_text('a user file')   # never named by a manifest: kept
  write_run(tmp_path, {'results.json': b'[3]'})
  assert 'mine.txt' in os.listdir(tmp_path)


def test_a_run_killed_while_publishing_leaves_no_manifest(tmp_path):
  """SIGKILL after the first of two files is moved into place: the mixed directory has
  no manifest, so it reads as incomplete, never as one run's set."""
  write_run(tmp_path, {'a.json': b'old a', 'b.json': b'old b'})
  code = textwrap.dedent(f'''
      import os, signal
      from ptq_jax.io import atomic_write_bytes
      from ptq_jax.jobs.outputs import RunOutputs
      out = RunOutputs({str(tmp_path)!r}, 'quantize')
      atomic_write_bytes(out.path('a.json'), b'new a')
      atomic_write_bytes(out.path('b.json'), b'new b')
      real_replace, moved = os.replace, []
      def replace(src, dst):
        real_replace(src, dst)
        moved.append(dst)
        if len(moved) == 1:
          os.kill(os.getpid(), signal.SIGKILL)
      os.replace = replace
      out.commit()
      ''')
  proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True)
  assert proc.returncode == -signal.SIGKILL
  assert (tmp_path / 'a.json').read_bytes() == b'new a'
  assert (tmp_path / 'b.json').read_bytes() == b'old b'
  with pytest.raises(OutputsError, match='did not finish'):
    verify_outputs(str(tmp_path))
  # The next run removes the killed run's staging directory and publishes a whole set.
  write_run(tmp_path, {'a.json': b'a3', 'b.json': b'b3'})
  assert sorted(os.listdir(tmp_path)) == ['a.json', 'b.json', MANIFEST]
  assert verify_outputs(str(tmp_path))['files']['b.json']['bytes'] == 2


def test_temporary_files_of_killed_writers_are_cleaned_and_live_ones_kept(tmp_path):
  stale = tmp_path / f'.results.json.tmp{dead_pid()}.abc123'
  live = tmp_path / f'.results.json.tmp{os.getpid()}.def456'
  stale_staging = tmp_path / f'.staging-{dead_pid()}-xyz'
  stale.write_bytes(b'x' * 100)
  live.write_bytes(b'y')
  stale_staging.mkdir()
  (stale_staging / 'quantized.msgpack').write_bytes(b'z')
  assert clean_stale_temps(str(tmp_path)) == [stale.name]
  write_run(tmp_path, {'results.json': b'[1]'})
  assert sorted(os.listdir(tmp_path)) == [live.name, MANIFEST, 'results.json']


def test_output_names_must_be_plain_files(tmp_path):
  out = RunOutputs(str(tmp_path), 'quantize')
  for bad in ('../escape.json', MANIFEST, '.hidden', 'sub/dir.json'):
    with pytest.raises(ValueError, match='plain file name'):
      out.path(bad)
  out.discard()


def test_a_malformed_manifest_is_an_error(tmp_path):
  (tmp_path / MANIFEST).write_text(json.dumps({'files': 3}))
  with pytest.raises(OutputsError, match='malformed'):
    verify_outputs(str(tmp_path))
