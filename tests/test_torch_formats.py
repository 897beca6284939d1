"""The PyTorch reader on layouts the torch-written fixtures do not cover: bfloat16
storages, big-endian files (zip and legacy) and tensors at a storage offset.

The files are written here with torch's own layout (the zip archive's ``data.pkl``,
``data/<key>`` and ``byteorder``; the legacy magic number, protocol, system info, body,
storage keys and raw storages), through a stand-in ``torch`` module so that pickle
emits the same global names torch's pickles carry.
"""

import collections
import io
import pickle
import struct
import sys
import types
import zipfile

import ml_dtypes
import numpy as np
import pytest

from ptq_jax.importers import read_torch_checkpoint

LEGACY_MAGIC, LEGACY_PROTOCOL = 0x1950a86a20f9469cfc6c, 1001


@pytest.fixture
def fake_torch(monkeypatch):
  """A module named ``torch`` with the storage classes and rebuild function whose
  qualified names torch's pickles use."""
  torch = types.ModuleType('torch')
  utils = types.ModuleType('torch._utils')

  def _rebuild_tensor_v2(*args):
    raise AssertionError('never called: only pickled')
  _rebuild_tensor_v2.__module__ = 'torch._utils'
  _rebuild_tensor_v2.__qualname__ = '_rebuild_tensor_v2'
  utils._rebuild_tensor_v2 = _rebuild_tensor_v2
  for name in ('FloatStorage', 'BFloat16Storage', 'HalfStorage'):
    setattr(torch, name, type(name, (), {'__module__': 'torch'}))
  torch._utils = utils
  monkeypatch.setitem(sys.modules, 'torch', torch)
  monkeypatch.setitem(sys.modules, 'torch._utils', utils)
  return torch


class Storage:
  def __init__(self, key, kind, data):
    self.key, self.kind, self.data = key, kind, data


class Tensor:
  def __init__(self, storage, offset, size, stride):
    self.storage, self.args = storage, (offset, size, stride)

  def __reduce__(self):
    return (sys.modules['torch._utils']._rebuild_tensor_v2,
            (self.storage,) + self.args + (False, collections.OrderedDict()))


class Pickler(pickle.Pickler):
  def __init__(self, f, legacy=False):
    super().__init__(f, protocol=2)
    self.legacy = legacy

  def persistent_id(self, obj):
    if isinstance(obj, Storage):
      ref = ('storage', getattr(sys.modules['torch'], obj.kind), obj.key, 'cpu', obj.data.size)
      return ref + (None,) if self.legacy else ref
    return None


def _dumps(obj, legacy=False) -> bytes:
  f = io.BytesIO()
  Pickler(f, legacy).dump(obj)
  return f.getvalue()


def write_zip(path, state, storages, byteorder='little'):
  order = '<' if byteorder == 'little' else '>'
  with zipfile.ZipFile(path, 'w') as z:
    z.writestr('archive/data.pkl', _dumps(state))
    z.writestr('archive/byteorder', byteorder)
    for s in storages:
      z.writestr(f'archive/data/{s.key}', s.data.astype(s.data.dtype.newbyteorder(order)).tobytes())


def write_legacy(path, state, storages, little_endian=True):
  order = '<' if little_endian else '>'
  with open(path, 'wb') as f:
    for header in (LEGACY_MAGIC, LEGACY_PROTOCOL,
                   {'protocol_version': LEGACY_PROTOCOL, 'little_endian': little_endian,
                    'type_sizes': {'short': 2, 'int': 4, 'long': 4}}):
      f.write(_dumps(header))
    f.write(_dumps(state, legacy=True))
    f.write(_dumps([s.key for s in storages]))
    for s in storages:
      f.write(struct.pack(order + 'q', s.data.size))
      f.write(s.data.astype(s.data.dtype.newbyteorder(order)).tobytes())


def _state():
  """A float32 tensor at a storage offset (a slice saved with its whole storage), a
  bfloat16 one, and a transposed view."""
  base = Storage('0', 'FloatStorage', np.arange(20, dtype=np.float32) - 7.5)
  bf16 = Storage('1', 'BFloat16Storage',
                 np.array([1.5, -2.25, 3.0e3, 0.0078125], ml_dtypes.bfloat16))
  state = collections.OrderedDict(
      sliced=Tensor(base, 5, (3, 4), (4, 1)),
      transposed=Tensor(base, 2, (4, 3), (1, 4)),
      bf16=Tensor(bf16, 0, (2, 2), (2, 1)))
  expected = {'sliced': (np.arange(20, dtype=np.float32) - 7.5)[5:17].reshape(3, 4),
              'transposed': (np.arange(20, dtype=np.float32) - 7.5)[2:14].reshape(3, 4).T,
              'bf16': np.array([[1.5, -2.25], [3.0e3, 0.0078125]], ml_dtypes.bfloat16)}
  return state, [base, bf16], expected


@pytest.mark.parametrize('layout', ['zip-little', 'zip-big', 'legacy-little', 'legacy-big'])
def test_offsets_bfloat16_and_byte_order(fake_torch, tmp_path, layout):
  state, storages, expected = _state()
  path = str(tmp_path / 'model.pt')
  fmt, order = layout.split('-')
  if fmt == 'zip':
    write_zip(path, state, storages, byteorder=order)
  else:
    write_legacy(path, state, storages, little_endian=order == 'little')
  arrays = read_torch_checkpoint(path)
  assert sorted(arrays) == sorted(expected)
  for name, want in expected.items():
    assert arrays[name].dtype == want.dtype, name
    np.testing.assert_array_equal(arrays[name], want, err_msg=name)
    assert arrays[name].dtype.byteorder in ('=', '|', '<') or arrays[name].dtype.isnative
