"""A PyTorch checkpoint reader that never runs pickled code and does not need torch.

``torch.save`` writes a pickle whose tensors point at raw storages, either in a
zip archive (``archive/data.pkl`` + ``archive/data/<key>``, torch >= 1.6) or, in
the legacy format, as a sequence of pickles followed by the storages' bytes. A
pickle can name any importable callable and call it while loading; this reader's
unpickler resolves only the handful of names a tensor state dict needs (tensor
and parameter reconstruction, storage dtypes, ``OrderedDict``) to its own numpy
implementations, and refuses everything else with :class:`UnsafeCheckpointError`
*before* anything is called. The result is a flat ``{name: np.ndarray}``.

Sizes are checked before anything is allocated: a zip member must unpack to exactly
the bytes its storage declares (and not far beyond its packed size), a legacy
storage cannot be longer than the rest of the file, and a tensor cannot have more
elements than its storage holds (so no stride-0 view is blown up). Every malformed
file ends in :class:`UnsafeCheckpointError`.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
import zlib
from typing import Any, Callable, Dict, Mapping, Tuple

import ml_dtypes
import numpy as np

_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
MAX_PICKLE_BYTES = 64 * 2**20   # a state dict's pickle: names and shapes, not weights
MAX_INFLATION = 100             # unpacked / packed size of a zip member
_LEGACY_PROTOCOL = 1001

_STORAGE_DTYPES: Dict[str, np.dtype] = {
    'DoubleStorage': np.dtype(np.float64), 'FloatStorage': np.dtype(np.float32),
    'HalfStorage': np.dtype(np.float16), 'BFloat16Storage': np.dtype(ml_dtypes.bfloat16),
    'LongStorage': np.dtype(np.int64), 'IntStorage': np.dtype(np.int32),
    'ShortStorage': np.dtype(np.int16), 'CharStorage': np.dtype(np.int8),
    'ByteStorage': np.dtype(np.uint8), 'BoolStorage': np.dtype(np.bool_),
}


class UnsafeCheckpointError(ValueError):
  """A checkpoint asks to run code (or build objects) beyond plain tensor reconstruction."""


class _StorageType:
  """Stands in for ``torch.<Dtype>Storage``: only its dtype matters."""

  def __init__(self, name: str):
    self.name, self.dtype = name, _STORAGE_DTYPES[name]


class _Storage:
  """A storage referenced from the pickle; its bytes are filled in after unpickling
  (legacy format) or read on demand (zip format)."""

  def __init__(self, dtype: np.dtype, numel: int):
    self.dtype, self.numel = dtype, int(numel)
    self.data: np.ndarray | None = None


class _LazyTensor:
  """A tensor view on a storage, materialised once every storage has its bytes."""

  def __init__(self, storage: _Storage, offset: int, size: Tuple[int, ...],
               stride: Tuple[int, ...]):
    self.storage, self.offset = storage, int(offset)
    self.size, self.stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)

  def materialise(self) -> np.ndarray:
    data = self.storage.data
    if data is None:
      raise UnsafeCheckpointError('A tensor refers to a storage the checkpoint does not hold.')
    needed = self.offset + 1 + sum((n - 1) * s for n, s in zip(self.size, self.stride)
                                   if n > 0)
    if any(n == 0 for n in self.size):
      return np.zeros(self.size, data.dtype)
    if len(self.stride) != len(self.size) or int(np.prod(self.size)) > data.size - self.offset:
      raise UnsafeCheckpointError(
          f'A tensor of size {self.size} (stride {self.stride}) has more elements than its '
          f'storage of {data.size} holds past offset {self.offset}: an overlapping view '
          '(e.g. stride 0) would allocate far more than the file holds; refusing it.')
    if self.offset < 0 or needed > data.size or any(s < 0 for s in self.stride):
      raise UnsafeCheckpointError(
          f'A tensor of size {self.size} (stride {self.stride}, offset {self.offset}) reaches '
          f'past its storage of {data.size} elements: the checkpoint is corrupt.')
    view = np.lib.stride_tricks.as_strided(
        data[self.offset:], self.size, [s * data.itemsize for s in self.stride], writeable=False)
    return np.array(view)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused) -> _LazyTensor:
  if not isinstance(storage, _Storage):
    raise UnsafeCheckpointError('Tensor reconstruction was given something other than a storage.')
  return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *unused):
  if not isinstance(data, _LazyTensor):
    raise UnsafeCheckpointError('Parameter reconstruction was given something other than a tensor.')
  return data


class _Dict(collections.OrderedDict):
  """``collections.OrderedDict`` that accepts the ``_metadata`` attribute torch sets."""


_ALLOWED: Dict[Tuple[str, str], Any] = {
    ('torch._utils', '_rebuild_tensor'): _rebuild_tensor,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('collections', 'OrderedDict'): _Dict,
}
_ALLOWED.update({('torch', name): _StorageType(name) for name in _STORAGE_DTYPES})


class _SafeUnpickler(pickle.Unpickler):
  """Resolves only tensor-related names; storages come back through ``persistent_load``."""

  def __init__(self, file, storage_for: Callable[[Tuple[Any, ...]], _Storage]):
    super().__init__(file)
    self._storage_for = storage_for

  def find_class(self, module: str, name: str):
    try:
      return _ALLOWED[(module, name)]
    except KeyError:
      raise UnsafeCheckpointError(
          f'The checkpoint asks for {module}.{name}, which is not part of a tensor state dict; '
          'refusing to load it (only tensors, storages and OrderedDict are allowed). If you '
          'trust the file, load it with torch and save its state_dict() or as safetensors.'
      ) from None

  def persistent_load(self, pid):
    if not isinstance(pid, tuple) or not pid or pid[0] != 'storage':
      raise UnsafeCheckpointError(f'Unsupported persistent object {str(pid)[:80]!r} '
                                  '(only tensor storages are allowed).')
    storage_type = pid[1]
    if not isinstance(storage_type, _StorageType):
      raise UnsafeCheckpointError(f'Unknown storage type {storage_type!r}.')
    return self._storage_for(pid)


def _read_zip(path: str) -> Any:
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pickles = [n for n in names if n.endswith('/data.pkl') or n == 'data.pkl']
    if len(pickles) != 1:
      raise UnsafeCheckpointError(f'{path} is a zip file but not a PyTorch checkpoint '
                                  '(no single data.pkl in it).')
    prefix = pickles[0][:-len('data.pkl')]
    byteorder = 'little'
    if prefix + 'byteorder' in names:
      byteorder = archive.read(prefix + 'byteorder').decode().strip()
    storages: Dict[str, _Storage] = {}

    def storage_for(pid):
      _, storage_type, key, _location, numel = pid[:5]
      key = str(key)
      if key not in storages:
        member = f'{prefix}data/{key}'
        if member not in names:
          raise UnsafeCheckpointError(f'{path} lacks the storage {member}: it is corrupt.')
        dtype = storage_type.dtype.newbyteorder('<' if byteorder == 'little' else '>')
        info = archive.getinfo(member)
        if info.file_size != int(numel) * dtype.itemsize or _inflated(info):
          raise UnsafeCheckpointError(
              f'{path}: storage {member} unpacks to {info.file_size} bytes from '
              f'{info.compress_size}, but declares {numel} elements of {dtype.itemsize} '
              'bytes: the file is corrupt or a decompression bomb; refusing it.')
        raw = archive.read(member)
        storage = _Storage(storage_type.dtype, len(raw) // dtype.itemsize)
        storage.data = np.frombuffer(raw, dtype).astype(storage_type.dtype)
        storages[key] = storage
      return storages[key]

    info = archive.getinfo(pickles[0])
    if info.file_size > MAX_PICKLE_BYTES or _inflated(info):
      raise UnsafeCheckpointError(
          f'{path}: {pickles[0]} unpacks to {info.file_size} bytes (from '
          f'{info.compress_size}); a state dict\'s pickle is far smaller: refusing it.')
    with archive.open(pickles[0]) as f:
      return _SafeUnpickler(io.BytesIO(f.read()), storage_for).load()


def _inflated(info: zipfile.ZipInfo) -> bool:
  """A member that unpacks to more than MAX_INFLATION times its packed size (torch
  stores members uncompressed) and to more than 1 MiB."""
  return info.file_size > max(2**20, MAX_INFLATION * info.compress_size)


def _read_legacy(path: str) -> Any:
  size = os.path.getsize(path)
  with open(path, 'rb') as f:
    def load_plain():
      return _SafeUnpickler(f, _refuse_storage).load()
    try:
      magic = load_plain()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
      if isinstance(e, UnsafeCheckpointError):
        raise
      raise UnsafeCheckpointError(f'{path} is not a PyTorch checkpoint: {e}') from e
    if magic != _LEGACY_MAGIC:
      raise UnsafeCheckpointError(f'{path} is not a PyTorch checkpoint (bad magic number).')
    if load_plain() != _LEGACY_PROTOCOL:
      raise UnsafeCheckpointError(f'{path} uses an unknown legacy protocol version.')
    sys_info = load_plain()
    little = bool(sys_info.get('little_endian', True)) if isinstance(sys_info, dict) else True
    storages: Dict[str, _Storage] = {}

    def storage_for(pid):
      if len(pid) < 5:
        raise UnsafeCheckpointError('Malformed storage reference in the checkpoint.')
      _, storage_type, key, _location, numel = pid[:5]
      view = pid[5] if len(pid) > 5 else None
      if view is not None:
        raise UnsafeCheckpointError('Legacy storage views are not supported.')
      storages.setdefault(str(key), _Storage(storage_type.dtype, numel))
      return storages[str(key)]

    result = _SafeUnpickler(f, storage_for).load()
    keys = load_plain()
    for key in keys:
      storage = storages.get(str(key))
      if storage is None:
        raise UnsafeCheckpointError(f'{path} holds bytes for an unknown storage {key!r}.')
      header = f.read(8)
      if len(header) != 8:
        raise UnsafeCheckpointError(f'{path} is truncated (storage {key}).')
      (numel,) = struct.unpack('<q' if little else '>q', header)
      dtype = storage.dtype.newbyteorder('<' if little else '>')
      if numel < 0 or numel * dtype.itemsize > size - f.tell():
        raise UnsafeCheckpointError(f'{path} declares {numel} elements for storage {key}, '
                                    'more than the file holds: it is truncated or corrupt.')
      raw = f.read(numel * dtype.itemsize)
      if len(raw) != numel * dtype.itemsize:
        raise UnsafeCheckpointError(f'{path} is truncated (storage {key}).')
      storage.data = np.frombuffer(raw, dtype).astype(storage.dtype)
    return result


def _refuse_storage(pid):
  raise UnsafeCheckpointError('A storage appears outside the checkpoint body.')


def _materialise(obj: Any, prefix: str, out: Dict[str, np.ndarray]) -> None:
  if isinstance(obj, _LazyTensor):
    out[prefix] = obj.materialise()
  elif isinstance(obj, Mapping):
    for key, value in obj.items():
      _materialise(value, f'{prefix}.{key}' if prefix else str(key), out)
  elif isinstance(obj, (int, float, str, bool, type(None))):
    pass  # Non-tensor entries (epoch counters, names) carry no weights.
  else:
    raise UnsafeCheckpointError(f'Unexpected {type(obj).__name__} at {prefix!r} in the checkpoint.')


def read_torch_checkpoint(path: str | os.PathLike) -> Dict[str, np.ndarray]:
  """The tensors of a PyTorch checkpoint (zip or legacy format) as ``{name: array}``.

  Nested dicts (e.g. ``{'state_dict': {...}}``) give dotted names. Nothing in the
  file is executed; a file that needs more than tensor reconstruction raises
  :class:`UnsafeCheckpointError`, as does a truncated or corrupt one.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'No checkpoint at {path}.')
  out: Dict[str, np.ndarray] = {}
  try:
    obj = _read_zip(path) if zipfile.is_zipfile(path) else _read_legacy(path)
    _materialise(obj, '', out)
  except UnsafeCheckpointError:
    raise
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError,
          AttributeError, struct.error, zipfile.BadZipFile, UnicodeDecodeError, RecursionError,
          MemoryError, OverflowError, OSError, zlib.error) as e:
    raise UnsafeCheckpointError(f'{path} is not a readable PyTorch checkpoint '
                                f'({type(e).__name__}: {str(e)[:200]}).') from None
  if not out:
    raise UnsafeCheckpointError(f'{path} holds no tensors.')
  return out
