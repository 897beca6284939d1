"""ImageNet photographs with human labels: the 1,000 photos of the NIPS 2017
adversarial-competition development set (one split, ``'test'``).

The repository holds them in ``data/imagenet_nips17/`` (made once by
``scripts/make_imagenet_nips17.py``): JPEGs with the short side at 256 pixels and
``labels.csv`` with each photo's ImageNet class index (0..999, the standard order), its
author, source URL and licence (CC BY 2.0, every one). :func:`load` returns the
standard evaluation view, the centre 224 x 224 crop, as uint8; a model's own
preprocessing standardises it (torchvision's mean and std: :func:`standardise`).
``$PTQ_JAX_IMAGENET_NIPS17_DIR`` points elsewhere.
"""

from __future__ import annotations

import csv
import os
from typing import List

import numpy as np

from ptq_jax.data.arrays import ArraySplit, DatasetNotFoundError

NAME = 'imagenet_nips17'
SPLITS = ('test',)
SIZE = 224
MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255
STD = np.array([0.229, 0.224, 0.225], np.float32) * 255


def data_dir() -> str:
  default = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__)))), 'data', NAME)
  return os.environ.get('PTQ_JAX_IMAGENET_NIPS17_DIR', default)


def records(directory: str = '') -> List[dict]:
  """The rows of ``labels.csv`` (image_id, label, author, source_url, license_url)."""
  directory = directory or data_dir()
  path = os.path.join(directory, 'labels.csv')
  if not os.path.isfile(path):
    raise DatasetNotFoundError(
        f'The labelled ImageNet photos are not in {directory}: they ship in the repository '
        '(data/imagenet_nips17); use a git checkout, or rebuild them with '
        'scripts/make_imagenet_nips17.py, or set $PTQ_JAX_IMAGENET_NIPS17_DIR.')
  with open(path, encoding='utf-8') as f:
    return list(csv.DictReader(f))


def centre_crop(path: str, size: int = SIZE) -> np.ndarray:
  from PIL import Image  # Imported here: only the photo sets need Pillow.
  with Image.open(path) as image:
    image = image.convert('RGB')
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)), np.uint8)


def load(split: str = 'test', directory: str = '') -> ArraySplit:
  """All 1,000 photos as uint8 (1000, 224, 224, 3) centre crops and int32 labels."""
  if split not in SPLITS:
    raise ValueError(f'{NAME} has the one split {SPLITS[0]!r}, not {split!r}.')
  directory = directory or data_dir()
  rows = records(directory)
  images = np.stack([centre_crop(os.path.join(directory, 'images', r['image_id'] + '.jpg'))
                     for r in rows])
  return ArraySplit(images, np.asarray([int(r['label']) for r in rows], np.int32))


def standardise(images: np.ndarray) -> np.ndarray:
  """uint8 (N, H, W, 3) -> float32 with torchvision's ImageNet mean and std."""
  return ((np.asarray(images, np.float32) - MEAN) / STD).astype(np.float32)


__all__ = ['NAME', 'SPLITS', 'data_dir', 'load', 'records', 'standardise']
