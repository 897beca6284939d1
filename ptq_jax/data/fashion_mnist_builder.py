"""A TFDS builder for Fashion-MNIST that reads the Debian package's IDX files.

The builder passes the files through TFDS's manual-data mechanism, writes
``array_record`` shards and is read back with ``tfds.data_source``; TensorFlow is
not needed. Examples have the standard ``fashion_mnist`` structure (uint8 image
28x28x1, 10-class label); the image is stored as a raw uint8 tensor because TFDS's
PNG encoder needs TensorFlow.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

from ptq_jax.data.fashion_mnist import (CLASS_NAMES, DEFAULT_IDX_DIR, IDX_DIR_ENV, IDX_FILES,
                                        read_split)


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
