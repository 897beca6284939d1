"""The PyTorch reader on layouts the torch-written fixtures do not cover: bfloat16
storages, big-endian files (zip and legacy) and tensors at a storage offset.

The files are written here with torch's own layout (the zip archive's ``data.pkl``,
``data/<key>`` and ``byteorder``; the legacy magic number, protocol, system info, body,
storage keys and raw storages), through a stand-in ``torch`` module so that pickle
emits the same global names torch's pickles carry.
"""

import collections
import io
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import types
import zipfile

import ml_dtypes
import numpy as np
import pytest

from ptq_jax.importers import UnsafeCheckpointError, read_torch_checkpoint

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


# --- hostile files: refused before allocating, always UnsafeCheckpointError -------------------

READER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'ptq_jax',
                      'importers', 'torch_checkpoint.py')


def read_with_memory_limit(path, limit_mb=768):
  """The reader run alone (no JAX) in a child process whose address space is capped: a
  file that made it allocate more would die with MemoryError instead of a clear error."""
  code = textwrap.dedent(f'''
      import importlib.util, resource, sys
      resource.setrlimit(resource.RLIMIT_AS, ({limit_mb} * 2**20, {limit_mb} * 2**20))
      spec = importlib.util.spec_from_file_location('reader', {READER!r})
      reader = importlib.util.module_from_spec(spec); spec.loader.exec_module(reader)
      try:
        reader.read_torch_checkpoint({path!r})
      except reader.UnsafeCheckpointError as e:
        print('REFUSED', e)
      ''')
  return subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                        timeout=120)


def test_a_decompression_bomb_is_refused_without_inflating(fake_torch, tmp_path):
  """A 1 GiB storage of zeros packed into ~1 MB, declared as 1 GiB of float32."""
  numel = 2**28
  state = collections.OrderedDict(w=Tensor(Storage('0', 'FloatStorage', np.zeros(1, np.float32)),
                                           0, (numel,), (1,)))
  path = str(tmp_path / 'bomb.pt')
  with zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_DEFLATED) as z:
    z.writestr('archive/data.pkl', _dumps_with_numel(state, numel))
    with z.open('archive/data/0', 'w', force_zip64=True) as member:
      chunk = bytes(2**20)
      for _ in range(numel * 4 // len(chunk)):
        member.write(chunk)
  assert os.path.getsize(path) < 8 * 2**20
  proc = read_with_memory_limit(path)
  assert proc.stdout.startswith('REFUSED') and 'decompression bomb' in proc.stdout, proc.stderr


def _dumps_with_numel(state, numel):
  """``_dumps`` with the storages declaring ``numel`` elements."""
  original = Pickler.persistent_id

  def persistent_id(self, obj):
    ref = original(self, obj)
    return None if ref is None else ref[:4] + (numel,) + ref[5:]
  Pickler.persistent_id = persistent_id
  try:
    return _dumps(state)
  finally:
    Pickler.persistent_id = original


def test_a_stride_zero_view_larger_than_its_storage_is_refused(fake_torch, tmp_path):
  """Four floats viewed with stride 0 as 16384x16384 (1 GiB once copied)."""
  state = collections.OrderedDict(w=Tensor(Storage('0', 'FloatStorage', np.ones(4, np.float32)),
                                           0, (16384, 16384), (0, 0)))
  path = str(tmp_path / 'stride0.pt')
  write_zip(path, state, [state['w'].storage])
  proc = read_with_memory_limit(path)
  assert proc.stdout.startswith('REFUSED') and 'more elements than its storage' in proc.stdout, \
      proc.stderr


def test_a_legacy_storage_longer_than_the_file_is_refused(fake_torch, tmp_path):
  state, storages, _ = _state()
  path = tmp_path / 'long.pt'
  write_legacy(str(path), state, storages)
  data = path.read_bytes()
  header = struct.pack('<q', storages[0].data.size)
  at = data.index(header, len(data) - storages[0].data.nbytes - storages[1].data.nbytes - 16)
  path.write_bytes(data[:at] + struct.pack('<q', 2**40) + data[at + 8:])
  proc = read_with_memory_limit(str(path))
  assert proc.stdout.startswith('REFUSED') and 'more than the file holds' in proc.stdout, \
      proc.stderr


@pytest.mark.parametrize('name,content', [
    ('garbage', lambda: bytes(range(256)) * 4),
    ('empty', lambda: b''),
    ('truncated_zip', lambda: _small_zip()[:200]),
    ('nested_20000_deep', lambda: _legacy_with_body(
        b'\x80\x02' + b'}' + (b'X\x01\x00\x00\x00a}') * 20000 + b's' * 20000 + b'.')),
    ('list_body', lambda: _legacy_with_body(b'\x80\x02]q\x00.')),
])
def test_malformed_files_are_the_readers_own_error(fake_torch, tmp_path, name, content):
  path = tmp_path / f'{name}.pt'
  path.write_bytes(content())
  with pytest.raises(UnsafeCheckpointError):
    read_torch_checkpoint(str(path))


def _small_zip() -> bytes:
  buffer = io.BytesIO()
  state, storages, _ = _state()
  with zipfile.ZipFile(buffer, 'w') as z:
    z.writestr('archive/data.pkl', _dumps(state))
    for s in storages:
      z.writestr(f'archive/data/{s.key}', s.data.tobytes())
  return buffer.getvalue()


def _legacy_with_body(body: bytes) -> bytes:
  header = b''.join(_dumps(h) for h in (LEGACY_MAGIC, LEGACY_PROTOCOL, {'little_endian': True}))
  return header + body + _dumps([])
