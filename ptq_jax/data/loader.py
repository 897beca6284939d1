"""Loading image-classification data through ``tfds.data_source`` (no TensorFlow).

* ``load_split('fashion_mnist', split)`` gives a whole split in memory, built from
  the Debian IDX files by :class:`FashionMnistIdx` (or, where they are absent and
  downloads are allowed, from the standard ``fashion_mnist`` TFDS dataset).
* :class:`ImageClassificationSource` streams any TFDS image-classification
  dataset the user has prepared (``imagenet2012`` for instance) in preprocessed
  batches, without holding it in memory.
* ``calibration_set`` draws a seeded, unlabelled calibration sample from the
  *train* split only.

TFDS decodes a split one example at a time (seconds for Fashion-MNIST's 70,000), so
``load_split`` keeps the decoded arrays beside the prepared dataset (``decoded-SPLIT.npz``
in its versioned directory) and later loads read them back; a directory it cannot
write just goes without.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple

import numpy as np

from ptq_jax.data import fashion_mnist as fmnist
from ptq_jax.data import imagenet_nips17 as nips17
from ptq_jax.data.arrays import (ArraySplit, DatasetNotFoundError, default_arrays_dir,
                                 load_saved_split, save_split)

FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32) * 255


def preprocess_fashion_mnist(images: np.ndarray) -> np.ndarray:
  """uint8 (N, 28, 28, 1) -> float32 standardised with the train-set mean and std."""
  return ((np.asarray(images, np.float32) / 255.0 - FASHION_MNIST_MEAN)
          / FASHION_MNIST_STD).astype(np.float32)


def resize_center_crop(image: np.ndarray, image_size: int = 224,
                       crop_fraction: float = 0.875) -> np.ndarray:
  """One uint8 HWC image -> uint8 (S, S, 3): the short side resized to S/crop_fraction
  (bicubic), then the centre S x S crop (the standard ImageNet evaluation view)."""
  from PIL import Image  # Imported here: only the ImageNet-style path needs Pillow.
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  pil = Image.fromarray(image[..., :3].astype(np.uint8))
  short = int(round(image_size / crop_fraction))
  w, h = pil.size
  scale = short / min(w, h)
  pil = pil.resize((max(short, round(w * scale)), max(short, round(h * scale))),
                   Image.BICUBIC)
  w, h = pil.size
  left, top = (w - image_size) // 2, (h - image_size) // 2
  return np.asarray(pil.crop((left, top, left + image_size, top + image_size)), np.uint8)


def preprocess_imagenet(image: np.ndarray, image_size: int = 224,
                        crop_fraction: float = 0.875) -> np.ndarray:
  """One uint8 HWC image -> float32 (S, S, 3): :func:`resize_center_crop`, then
  standardised with the ImageNet mean and std."""
  pil = resize_center_crop(image, image_size, crop_fraction)
  return ((np.asarray(pil, np.float32) - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)


def _fashion_mnist_source(split: str, data_dir: Optional[str], idx_dir: Optional[str],
                          download: bool):
  """The ``tfds.data_source`` of one Fashion-MNIST split, preparing it if needed."""
  import tensorflow_datasets as tfds
  from ptq_jax.data.fashion_mnist_builder import FashionMnistIdx
  idx_dir = idx_dir or fmnist.default_idx_dir()
  missing = fmnist.missing_idx_files(idx_dir)
  if not missing:
    builder = FashionMnistIdx(data_dir=data_dir, file_format='array_record')
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=idx_dir))
    return builder.as_data_source(split=split)
  if download:
    return tfds.data_source('fashion_mnist', split=split, data_dir=data_dir, download=True,
                            builder_kwargs={'file_format': 'array_record'})
  where = ('does not exist' if not os.path.isdir(idx_dir)
           else f'lacks {", ".join(missing)}')
  raise DatasetNotFoundError(
      f'Fashion-MNIST IDX directory {idx_dir} {where}. Install the data with '
      f'`apt-get install dataset-fashion-mnist` (files go to {fmnist.DEFAULT_IDX_DIR}), or '
      f'point ${fmnist.IDX_DIR_ENV} or --config.data.idx_dir at a directory holding the '
      f'four *-ubyte.gz files, or allow downloads (--config.data.download=True) to use the '
      f'standard TFDS fashion_mnist dataset.')


def load_split(dataset: str, split: str, data_dir: Optional[str] = None,
               idx_dir: Optional[str] = None, download: bool = False,
               arrays_dir: Optional[str] = None) -> ArraySplit:
  """Loads a whole split into memory (for small datasets such as Fashion-MNIST).

  Args:
    dataset: 'fashion_mnist', 'imagenet_nips17' (1,000 labelled ImageNet photos in the
      repository, split 'test'), or the name of any prepared TFDS dataset whose
      examples have 'image' and 'label' features.
    split: 'train' or 'test' (any TFDS split for other datasets).
    data_dir: TFDS data directory (default: TFDS's own, ``~/tensorflow_datasets``).
    idx_dir: Fashion-MNIST IDX directory (default: ``$PTQ_JAX_FASHION_MNIST_DIR`` or
      the Debian package's).
    download: allow TFDS to download a dataset that is missing locally.
    arrays_dir: read the split from ``DIR/{dataset}-{split}.npz`` exported by
      :mod:`ptq_jax.data.arrays` instead of TFDS (default ``$PTQ_JAX_ARRAYS_DIR``;
      ``''`` forces TFDS).
  """
  arrays_dir = default_arrays_dir() if arrays_dir is None else arrays_dir
  if arrays_dir:
    return load_saved_split(arrays_dir, dataset, split)
  if dataset == nips17.NAME:
    return nips17.load(split)
  if dataset == 'fashion_mnist':
    if split not in fmnist.IDX_FILES:
      raise ValueError(f"Fashion-MNIST has splits 'train' and 'test', not {split!r}.")
    source = _fashion_mnist_source(split, data_dir, idx_dir, download)
  else:
    source = _tfds_source(dataset, split, data_dir, download)
  return _decoded(source, split)


def _decoded(source, split: str) -> ArraySplit:
  """Every example of a TFDS data source as arrays, from the decoded copy beside the
  prepared dataset when there is one of the right length, else decoded (and saved)."""
  try:
    path = os.path.join(source.dataset_info.data_dir,
                        'decoded-' + re.sub(r'[^A-Za-z0-9_.-]', '_', split) + '.npz')
  except AttributeError:   # a source without a directory of its own
    path = None
  if path and os.path.isfile(path):
    try:
      with np.load(path) as f:
        images, labels = f['images'], f['labels']
      if len(labels) == len(source) == len(images) and images.dtype == np.uint8:
        return ArraySplit(images, labels.astype(np.int32))
    except (OSError, ValueError, KeyError):
      pass   # unreadable: decode again and replace it
  examples = source.__getitems__(range(len(source)))
  data = ArraySplit(np.stack([np.asarray(e['image']) for e in examples]).astype(np.uint8),
                    np.asarray([e['label'] for e in examples], np.int32))
  if path:
    try:
      save_split(path, data, compressed=False)
    except OSError:
      pass   # a read-only dataset directory: the next load decodes again
  return data


def _tfds_source(name: str, split: str, data_dir: Optional[str], download: bool):
  import tensorflow_datasets as tfds
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=download,
                            builder_kwargs={'file_format': 'array_record'})
  except Exception as e:  # TFDS raises several types for "not prepared".
    raise DatasetNotFoundError(
        f'TFDS dataset {name!r} (split {split!r}) is not prepared in '
        f'{data_dir or "the default TFDS data dir"} as array_record: {e}. Prepare it '
        f'once with `tfds build {name} --file_format=array_record` (ImageNet needs the '
        f'manual download in <data_dir>/downloads/manual), then pass --config.data.data_dir.'
    ) from e


PREPROCESSORS: Dict[str, Callable[[np.ndarray], np.ndarray]] = {
    'fashion_mnist': preprocess_fashion_mnist,
    nips17.NAME: nips17.standardise,   # (already the centre 224 crop)
}


def preprocess(dataset: str, images: np.ndarray) -> np.ndarray:
  """Model-ready float32 batch for ``dataset`` (ImageNet-style for unknown names)."""
  if dataset in PREPROCESSORS:
    return PREPROCESSORS[dataset](images)
  return np.stack([preprocess_imagenet(im) for im in images])


class ImageClassificationSource:
  """Random access to a prepared TFDS image-classification split, preprocessed.

  Only the examples asked for are read and decoded, so a 50,000-image ImageNet
  validation split is streamed rather than held in memory.
  """

  def __init__(self, name: str, split: str, data_dir: Optional[str] = None,
               image_size: int = 224, download: bool = False):
    self.name, self.split, self.image_size = name, split, image_size
    self._source = _tfds_source(name, split, data_dir, download)

  def __len__(self) -> int:
    return len(self._source)

  def get_batch(self, indices: Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
    """Preprocessed float32 images (B, S, S, 3) and int32 labels (B,)."""
    examples = self._source.__getitems__(list(indices))
    images = np.stack([preprocess_imagenet(np.asarray(e['image']), self.image_size)
                       for e in examples])
    return images, np.asarray([e['label'] for e in examples], np.int32)

  def batches(self, batch_size: int, limit: Optional[int] = None
              ) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """Batches in split order (the last one may be smaller)."""
    n = len(self) if limit is None else min(limit, len(self))
    for start in range(0, n, batch_size):
      yield self.get_batch(range(start, min(start + batch_size, n)))


def sample_indices(num_examples: int, n: int, seed: int) -> np.ndarray:
  """``n`` distinct indices in ``[0, num_examples)``, a pure function of ``seed``."""
  check_sample_request(n, seed)
  if n > num_examples:
    raise ValueError(f'Cannot draw {n} calibration images from a split of {num_examples}.')
  return np.random.default_rng(seed).choice(num_examples, size=n, replace=False)


def check_sample_request(n: int, seed: int) -> None:
  """A clear error unless ``n`` is a positive integer and ``seed`` an integer >= 0
  (checked before any data is read)."""
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f'seed must be an integer >= 0, got {seed!r}.')
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
    raise TypeError(f'n (the calibration set size) must be an integer, got {n!r}.')
  if n <= 0:
    raise ValueError(f'The calibration set must hold at least one image; got n={n}.')


@dataclasses.dataclass(frozen=True)
class CalibrationSet:
  """Unlabelled, preprocessed calibration images and where they came from."""

  images: np.ndarray
  indices: np.ndarray
  dataset: str
  split: str
  seed: int

  def __len__(self) -> int:
    return len(self.images)


def calibration_set(dataset: str, n: int, seed: int = 0, split: str = 'train',
                    data: Optional[ArraySplit] = None, **load_kwargs) -> CalibrationSet:
  """Draws ``n`` unlabelled images from the train split, reproducibly from ``seed``.

  ``data`` may pass an already loaded train split to avoid reading it again.
  Labels are dropped: post-training quantization here never sees them.
  """
  if split.split('[')[0] in ('test', 'validation'):
    raise ValueError(f'Calibration images must come from the train split, not {split!r}: '
                     'the test split is kept for evaluation.')
  if data is None and dataset != 'fashion_mnist':
    source = ImageClassificationSource(dataset, split, **load_kwargs)
    indices = sample_indices(len(source), n, seed)
    images, _ = source.get_batch(indices)
  else:
    data = data if data is not None else load_split(dataset, split, **load_kwargs)
    indices = sample_indices(len(data), n, seed)
    images = preprocess(dataset, data.images[indices])
  return CalibrationSet(images, indices, dataset, split, seed)
