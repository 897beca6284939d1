"""Fashion-MNIST's local IDX files: where they live, which they are, reading them.

``dataset-fashion-mnist`` installs the original ``*-idx?-ubyte.gz`` files in
``/usr/share/datasets/fashion-mnist``. The TFDS builder that turns them into a
dataset is in :mod:`ptq_jax.data.fashion_mnist_builder`; this module does not
import TFDS, so ``import ptq_jax`` works where TFDS is not installed.
"""

from __future__ import annotations

import os

import numpy as np

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
