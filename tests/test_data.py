"""The Fashion-MNIST TFDS builder, the generic loader and the calibration sampler."""

import gzip
import hashlib
import os
import struct

import numpy as np
import pytest

from ptq_jax.data import fashion_mnist as fmnist
from ptq_jax.data import loader
from ptq_jax.data.idx import IdxFormatError, read_idx


def write_idx(path, array):
  """Writes ``array`` (uint8) as a gzipped IDX file."""
  header = struct.pack('>BBBB', 0, 0, 0x08, array.ndim) + struct.pack(
      f'>{array.ndim}I', *array.shape)
  with gzip.open(path, 'wb') as f:
    f.write(header + array.astype(np.uint8).tobytes())


def make_idx_dir(directory, n_train=64, n_test=16, seed=0):
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(seed)
  for split, n in (('train', n_train), ('test', n_test)):
    images_name, labels_name, _ = fmnist.IDX_FILES[split]
    write_idx(os.path.join(directory, images_name), rng.integers(0, 256, (n, 28, 28)))
    write_idx(os.path.join(directory, labels_name), rng.integers(0, 10, (n,)))
  return directory


def test_real_splits_shapes_dtypes_and_classes(fmnist_train, fmnist_test):
  assert len(fmnist_train) == 60000 and len(fmnist_test) == 10000
  for split in (fmnist_train, fmnist_test):
    assert split.images.shape[1:] == (28, 28, 1) and split.images.dtype == np.uint8
    assert split.labels.dtype == np.int32
    assert set(np.unique(split.labels)) == set(range(10))
  assert np.all(np.bincount(fmnist_train.labels) == 6000)
  assert np.all(np.bincount(fmnist_test.labels) == 1000)


def test_tfds_wrote_array_record_shards(fmnist_train, tfds_dir):
  version_dir = os.path.join(tfds_dir, 'fashion_mnist_idx', '1.0.0')
  shards = [f for f in os.listdir(version_dir) if '.array_record' in f]
  assert any('train' in f for f in shards) and any('test' in f for f in shards)


def test_tfds_content_matches_the_idx_files(fmnist_test):
  images, labels = fmnist.read_split(fmnist.default_idx_dir(), 'test')
  # TFDS shuffles on write: compare as multisets of (image, label).
  key = lambda ims, lbs: sorted(hashlib.sha1(i.tobytes()).hexdigest() + str(int(l))
                                for i, l in zip(ims, lbs))
  assert key(images, labels) == key(fmnist_test.images, fmnist_test.labels)


def test_a_split_is_decoded_once_and_read_back(tmp_path):
  """The first load writes the decoded arrays beside the prepared dataset, later loads
  read them; a copy that is corrupt or of the wrong length is decoded again."""
  kwargs = dict(data_dir=str(tmp_path / 'tfds'), idx_dir=make_idx_dir(tmp_path / 'idx'))
  first = loader.load_split('fashion_mnist', 'test', **kwargs)
  path = tmp_path / 'tfds' / 'fashion_mnist_idx' / '1.0.0' / 'decoded-test.npz'
  assert path.is_file() and len(first) == 16
  marked = loader.ArraySplit(first.images, (first.labels + 1) % 10)
  np.savez(path, images=marked.images, labels=marked.labels)
  np.testing.assert_array_equal(loader.load_split('fashion_mnist', 'test', **kwargs).labels,
                                marked.labels)   # read back, not decoded again
  for bad in (b'garbage', None):
    if bad is None:
      np.savez(path, images=first.images[:3], labels=first.labels[:3])   # wrong length
    else:
      path.write_bytes(bad)
    again = loader.load_split('fashion_mnist', 'test', **kwargs)
    np.testing.assert_array_equal(again.images, first.images)
    np.testing.assert_array_equal(again.labels, first.labels)


def test_read_idx_rejects_corrupt_files(tmp_path):
  good = tmp_path / 'good.gz'
  write_idx(good, np.arange(12, dtype=np.uint8).reshape(3, 4))
  np.testing.assert_array_equal(read_idx(good), np.arange(12).reshape(3, 4))
  truncated = tmp_path / 'truncated.gz'
  with gzip.open(good) as f:
    data = f.read()
  with gzip.open(truncated, 'wb') as f:
    f.write(data[:-3])
  with pytest.raises(IdxFormatError, match='corrupt'):
    read_idx(truncated)
  bad_magic = tmp_path / 'bad'
  bad_magic.write_bytes(b'\x12\x34\x08\x01' + b'\x00' * 8)
  with pytest.raises(IdxFormatError, match='not an IDX file'):
    read_idx(bad_magic)


def test_builder_reads_an_overridden_idx_dir(tmp_path, monkeypatch):
  idx_dir = make_idx_dir(str(tmp_path / 'idx'), n_train=64, n_test=16)
  monkeypatch.setenv(fmnist.IDX_DIR_ENV, idx_dir)
  split = loader.load_split('fashion_mnist', 'train', data_dir=str(tmp_path / 'tfds'))
  expected, _ = fmnist.read_split(idx_dir, 'train')
  assert len(split) == 64
  assert sorted(i.tobytes() for i in split.images) == sorted(i.tobytes() for i in expected)


@pytest.mark.parametrize('make_dir', [False, True])
def test_missing_dataset_says_how_to_install(tmp_path, make_dir):
  idx_dir = tmp_path / 'nowhere'
  if make_dir:
    idx_dir.mkdir()
  with pytest.raises(loader.DatasetNotFoundError) as info:
    loader.load_split('fashion_mnist', 'test', data_dir=str(tmp_path / 'tfds'),
                      idx_dir=str(idx_dir))
  message = str(info.value)
  assert 'apt-get install dataset-fashion-mnist' in message
  assert fmnist.IDX_DIR_ENV in message and str(idx_dir) in message
  assert ('does not exist' in message) != make_dir
  assert not (tmp_path / 'tfds').exists()  # Nothing half-prepared.


def test_unprepared_generic_dataset_error(tmp_path):
  with pytest.raises(loader.DatasetNotFoundError, match='tfds build imagenet2012'):
    loader.ImageClassificationSource('imagenet2012', 'validation', data_dir=str(tmp_path))


def test_unknown_split():
  with pytest.raises(ValueError, match="splits 'train' and 'test'"):
    loader.load_split('fashion_mnist', 'validation')


def test_calibration_is_reproducible_and_seeded(fmnist_train):
  a = loader.calibration_set('fashion_mnist', 100, seed=3, data=fmnist_train)
  b = loader.calibration_set('fashion_mnist', 100, seed=3, data=fmnist_train)
  c = loader.calibration_set('fashion_mnist', 100, seed=4, data=fmnist_train)
  np.testing.assert_array_equal(a.images, b.images)
  np.testing.assert_array_equal(a.indices, b.indices)
  assert not np.array_equal(a.indices, c.indices)
  assert len(np.unique(a.indices)) == 100 and a.indices.max() < 60000
  assert a.images.shape == (100, 28, 28, 1) and a.images.dtype == np.float32
  np.testing.assert_allclose(a.images, loader.preprocess_fashion_mnist(
      fmnist_train.images[a.indices]))


def test_calibration_is_disjoint_from_the_test_split(tfds_dir, fmnist_test):
  calib = loader.calibration_set('fashion_mnist', 1000, seed=0, data_dir=tfds_dir)
  assert calib.split == 'train'
  test_hashes = {hashlib.sha1(x.tobytes()).hexdigest()
                 for x in loader.preprocess_fashion_mnist(fmnist_test.images)}
  assert not any(hashlib.sha1(x.tobytes()).hexdigest() in test_hashes for x in calib.images)


def test_calibration_refuses_bad_requests(fmnist_train):
  with pytest.raises(ValueError, match='train split'):
    loader.calibration_set('fashion_mnist', 10, split='test', data=fmnist_train)
  with pytest.raises(ValueError, match='at least one image'):
    loader.calibration_set('fashion_mnist', 0, data=fmnist_train)
  with pytest.raises(ValueError, match='Cannot draw'):
    loader.calibration_set('fashion_mnist', 60001, data=fmnist_train)


def test_imagenet_preprocessing_shape_and_statistics():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (300, 400, 3)).astype(np.uint8)
  out = loader.preprocess_imagenet(image)
  assert out.shape == (224, 224, 3) and out.dtype == np.float32
  grey = loader.preprocess_imagenet(np.full((256, 256, 1), 124, np.uint8))
  np.testing.assert_allclose(grey[0, 0], (124 - loader.IMAGENET_MEAN) / loader.IMAGENET_STD,
                             rtol=1e-5)


def test_exported_arrays_round_trip_through_the_env_var(tmp_path, monkeypatch, fmnist_test):
  from ptq_jax.data import arrays
  arrays.save_split(arrays.arrays_path(str(tmp_path), 'fashion_mnist', 'test'), fmnist_test)
  monkeypatch.setenv(arrays.ARRAYS_DIR_ENV, str(tmp_path))
  loaded = loader.load_split('fashion_mnist', 'test')
  np.testing.assert_array_equal(loaded.images, fmnist_test.images)
  np.testing.assert_array_equal(loaded.labels, fmnist_test.labels)
  assert loaded.labels.dtype == np.int32 and loaded.images.dtype == np.uint8
  with pytest.raises(loader.DatasetNotFoundError, match='scripts/export_arrays.py'):
    loader.load_split('fashion_mnist', 'train')  # not exported


def test_corrupt_exported_arrays_are_refused(tmp_path):
  from ptq_jax.data import arrays
  path = arrays.arrays_path(str(tmp_path), 'fashion_mnist', 'test')
  with open(path, 'wb') as f:
    f.write(b'not an npz file')
  with pytest.raises(ValueError, match='Export it again|export it again'):
    loader.load_split('fashion_mnist', 'test', arrays_dir=str(tmp_path))
  np.savez(path, images=np.zeros((3, 28, 28, 1), np.float32), labels=np.zeros(3))
  with pytest.raises(ValueError, match='expected uint8'):
    loader.load_split('fashion_mnist', 'test', arrays_dir=str(tmp_path))


def test_importing_ptq_jax_does_not_need_tfds():
  import subprocess
  import sys
  code = ('import sys, ptq_jax; '
          'assert "tensorflow_datasets" not in sys.modules, "TFDS imported eagerly"')
  subprocess.run([sys.executable, '-c', code], check=True,
                 cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
