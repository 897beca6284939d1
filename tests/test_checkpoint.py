"""Checkpoint round trip and the errors for corrupt, foreign and mismatched files."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ptq_jax import checkpoint as ckpt
from ptq_jax.models import create_model


@pytest.fixture(scope='module')
def resnet20_variables():
  model = create_model('resnet20')
  return model, model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))


def test_round_trip(tmp_path, resnet20_variables):
  model, variables = resnet20_variables
  path = str(tmp_path / 'r20.msgpack')
  ckpt.save_checkpoint(path, variables, {'model': 'resnet20', 'dataset': 'fashion_mnist'})
  restored, meta = ckpt.load_checkpoint(path)
  assert meta == {'model': 'resnet20', 'dataset': 'fashion_mnist'}
  jax.tree.map(np.testing.assert_array_equal, restored, variables)
  loaded_model, loaded, _ = ckpt.load_model(path)
  x = jax.random.normal(jax.random.key(3), (2, 28, 28, 1))
  np.testing.assert_array_equal(loaded_model.apply(loaded, x), model.apply(variables, x))
  assert [f for f in os.listdir(tmp_path)] == ['r20.msgpack']  # no temporary files left


def test_corrupt_and_foreign_files(tmp_path, resnet20_variables):
  _, variables = resnet20_variables
  path = tmp_path / 'r20.msgpack'
  ckpt.save_checkpoint(str(path), variables, {'model': 'resnet20'})
  data = path.read_bytes()
  truncated = tmp_path / 'truncated.msgpack'
  truncated.write_bytes(data[:len(data) // 2])
  with pytest.raises(ckpt.CheckpointError, match='corrupt or truncated'):
    ckpt.load_checkpoint(str(truncated))
  garbage = tmp_path / 'garbage.msgpack'
  garbage.write_bytes(b'\xc1' * 100)
  with pytest.raises(ckpt.CheckpointError, match='corrupt'):
    ckpt.load_checkpoint(str(garbage))
  foreign = tmp_path / 'foreign.msgpack'
  from flax import serialization
  foreign.write_bytes(serialization.msgpack_serialize({'params': {'w': np.zeros(3)}}))
  with pytest.raises(ckpt.CheckpointError, match='not a ptq_jax checkpoint'):
    ckpt.load_checkpoint(str(foreign))
  with pytest.raises(ckpt.CheckpointError, match='does not exist'):
    ckpt.load_checkpoint(str(tmp_path / 'missing.msgpack'))


def test_mismatched_model_is_refused(tmp_path, resnet20_variables):
  _, variables = resnet20_variables
  path = str(tmp_path / 'lies.msgpack')
  ckpt.save_checkpoint(path, variables, {'model': 'mobilenet_v2_fmnist'})
  with pytest.raises(ckpt.CheckpointError, match='does not fit the model'):
    ckpt.load_model(path)
  # Same structure, one wrong shape.
  bad = jax.tree.map(lambda x: x, variables)
  bad['params']['head']['kernel'] = jnp.zeros((64, 7))
  with pytest.raises(ckpt.CheckpointError, match='head/kernel has shape'):
    ckpt.check_variables_match(variables, bad)
  unknown = str(tmp_path / 'unknown.msgpack')
  ckpt.save_checkpoint(unknown, variables, {'model': 'vgg99'})
  with pytest.raises(ckpt.CheckpointError, match='Unknown model'):
    ckpt.load_model(unknown)


def test_failed_write_leaves_previous_file_intact(tmp_path, resnet20_variables, monkeypatch):
  _, variables = resnet20_variables
  path = tmp_path / 'r20.msgpack'
  ckpt.save_checkpoint(str(path), variables, {'model': 'resnet20'})
  before = path.read_bytes()

  def broken_replace(src, dst):
    raise OSError('disk full')

  monkeypatch.setattr(os, 'replace', broken_replace)
  with pytest.raises(OSError, match='disk full'):
    ckpt.save_checkpoint(str(path), variables, {'model': 'resnet20', 'v': 2})
  assert path.read_bytes() == before
  assert os.listdir(tmp_path) == ['r20.msgpack']


def test_a_version_1_file_is_refused_until_upgraded(tmp_path, resnet20_variables):
  """Files written before checksums: refused with the fix named; upgrade_checkpoint
  checks the values and rewrites them with a checksum."""
  from flax import serialization
  _, variables = resnet20_variables
  host = jax.tree.map(np.array, serialization.to_state_dict(variables))
  path = tmp_path / 'v1.msgpack'
  path.write_bytes(serialization.msgpack_serialize(
      {'format': ckpt.FORMAT, 'version': 1, 'metadata': '{"model": "resnet20"}',
       'variables': host}))
  with pytest.raises(ckpt.CheckpointError, match='upgrade_checkpoint'):
    ckpt.load_model(str(path))
  ckpt.upgrade_checkpoint(str(path))
  _, loaded, meta = ckpt.load_model(str(path))
  assert meta == {'model': 'resnet20'}
  jax.tree.map(np.testing.assert_array_equal, loaded, variables)
  host['params']['head']['kernel'][0, 0] = np.nan   # a damaged old file is not blessed
  path.write_bytes(serialization.msgpack_serialize(
      {'format': ckpt.FORMAT, 'version': 1, 'metadata': '{}', 'variables': host}))
  with pytest.raises(ckpt.CheckpointError, match='NaN'):
    ckpt.upgrade_checkpoint(str(path))
