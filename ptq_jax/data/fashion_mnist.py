"""A TFDS builder for Fashion-MNIST that reads the Debian package's IDX files.

``dataset-fashion-mnist`` installs the original ``*-idx?-ubyte.gz`` files in
``/usr/share/datasets/fashion-mnist``. The builder passes them through TFDS's
manual-data mechanism, writes ``array_record`` shards and is read back with
``tfds.data_source``; TensorFlow is not needed. Examples have the standard
``fashion_mnist`` structure (uint8 image 28x28x1, 10-class label); the image is
stored as a raw uint8 tensor because TFDS's PNG encoder needs TensorFlow.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

from ptq_jax.data.idx import read_idx

DEFAULT_IDX_DIR = '/usr/share/datasets/fashion-mnist'
IDX_DIR_ENV = 'PTQ_JAX_FASHION_MNIST_DIR'
IDX_FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz', 60000),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz', 10000),
}
CLASS_NAMES = ('t-shirt/top', 'trouser', 'pullover', 'dress', 'coat', 'sandal', 'shirt',
               'sneaker', 'bag', 'ankle boot')


def default_idx_dir() -> str:
  """The IDX directory: ``$PTQ_JAX_FASHION_MNIST_DIR`` or the Debian package's."""
  return os.environ.get(IDX_DIR_ENV) or DEFAULT_IDX_DIR


def missing_idx_files(idx_dir: str) -> list:
  """Names of the IDX files absent from ``idx_dir`` (empty when all are there)."""
  names = [n for images, labels, _ in IDX_FILES.values() for n in (images, labels)]
  return [n for n in names if not os.path.isfile(os.path.join(idx_dir, n))]


def read_split(idx_dir: str, split: str):
  """Images (N, 28, 28, 1) uint8 and labels (N,) int64 of one split, validated.

  The official files hold 60,000 / 10,000 examples; a directory of other sizes
  (a subset, a test fixture) is accepted as long as images and labels agree.
  """
  images_name, labels_name, _ = IDX_FILES[split]
  images = read_idx(os.path.join(idx_dir, images_name))
  labels = read_idx(os.path.join(idx_dir, labels_name))
  if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
    raise ValueError(f'Fashion-MNIST {split} split in {idx_dir} has images {images.shape} and '
                     f'labels {labels.shape}; expected (N, 28, 28) and (N,).')
  if labels.size and labels.max() >= len(CLASS_NAMES):
    raise ValueError(f'Fashion-MNIST {split} labels in {idx_dir} exceed 9: corrupt file.')
  return images[..., None].astype(np.uint8), labels.astype(np.int64)


class FashionMnistIdx(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST built from local IDX files (TFDS manual data)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Built from the IDX files of Debian dataset-fashion-mnist.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f'Install the IDX files with `apt-get install dataset-fashion-mnist` (they go to '
      f'{DEFAULT_IDX_DIR}) or point ${IDX_DIR_ENV} / --config.data.idx_dir at a directory '
      f'holding {", ".join(n for v in IDX_FILES.values() for n in v[:2])}.')

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
            'label': tfds.features.ClassLabel(names=CLASS_NAMES),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://github.com/zalandoresearch/fashion-mnist',
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    idx_dir = os.fspath(dl_manager.manual_dir)
    return {split: self._generate_examples(idx_dir, split) for split in IDX_FILES}

  def _generate_examples(self, idx_dir: str, split: str):
    images, labels = read_split(idx_dir, split)
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {'image': image, 'label': int(label)}
