"""Real photographs from Debian packages, for ImageNet models (no ImageNet images exist offline).

Sources (each optional; at least one must be installed):

* ``tuxpaint-stamps-default``: photographic RGBA cut-outs of animals, food, plants,
  instruments, tools, ... (drawn stamps, those with an SVG original, cartoons and
  symbols are left out); composited on white.
* ``opencv-doc``: the sample photos in ``examples/data`` (and the ILSVRC-2012
  class-name list used to label photos by file name).
* ``mate-backgrounds``: the nature photos.
* scikit-image's sample photos (coffee, chelsea, astronaut, rocket, ...).

:func:`photo_splits` deals them, seeded, into disjoint calibration and
evaluation sets. A photo whose file name is an ImageNet class name or synonym
(``pelican.png``, ``tennis_ball.png``, ``orange.jpg``) carries that label; the
others carry -1 and count only in agreement-with-FP32 metrics.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ptq_jax.data.loader import DatasetNotFoundError, resize_center_crop

TUXPAINT_DIR = '/usr/share/tuxpaint/stamps'
OPENCV_DATA_DIR = '/usr/share/doc/opencv-doc/examples/data'
IMAGENET_CLASSES_FILE = os.path.join(OPENCV_DATA_DIR, 'dnn',
                                     'classification_classes_ILSVRC2012.txt')
MATE_NATURE_DIR = '/usr/share/backgrounds/mate/nature'
SKIMAGE_PHOTOS = ('astronaut', 'chelsea', 'coffee', 'rocket', 'cat', 'hubble_deep_field')
INSTALL_HINT = ('apt-get install tuxpaint-stamps-default opencv-doc mate-backgrounds '
                '(./scripts/setup.sh does it)')
# opencv-doc's examples/data holds test patterns and renders too; these are photographs.
OPENCV_PHOTOS = ('apple.jpg', 'baboon.jpg', 'butterfly.jpg', 'fruits.jpg', 'home.jpg',
                 'messi5.jpg', 'orange.jpg', 'squirrel_cls.jpg', 'building.jpg', 'lena.jpg',
                 'aero1.jpg', 'aero3.jpg', 'board.jpg', 'HappyFish.jpg', 'stuff.jpg',
                 'starry_night.jpg', 'leuvenA.jpg', 'blox.jpg', 'ellipses.jpg')


@dataclasses.dataclass(frozen=True)
class Photo:
  """One photograph: where it comes from and its ImageNet label (-1: none)."""

  path: str        # a file path, or 'skimage:NAME'
  source: str
  label: int = -1


def imagenet_class_names(path: str = IMAGENET_CLASSES_FILE) -> List[str]:
  """The 1000 ILSVRC-2012 class names (each 'name, synonym, ...') from opencv-doc."""
  if not os.path.isfile(path):
    raise DatasetNotFoundError(f'The ImageNet class list {path} is missing: apt-get install '
                               'opencv-doc (./scripts/setup.sh does it).')
  names = [line.strip() for line in open(path, encoding='utf-8') if line.strip()]
  if len(names) != 1000:
    raise DatasetNotFoundError(f'{path} lists {len(names)} classes, not 1000.')
  return names


def _synonym_index(classes: Sequence[str]) -> Dict[str, int]:
  """Lower-case synonym -> class index, leaving out synonyms shared by two classes."""
  index: Dict[str, int] = {}
  shared = set()
  for i, entry in enumerate(classes):
    for synonym in {s.strip().lower() for s in entry.split(',') if s.strip()}:
      if synonym in index and index[synonym] != i:
        shared.add(synonym)
      index.setdefault(synonym, i)
  return {s: i for s, i in index.items() if s not in shared}


def name_label(path: str, synonyms: Dict[str, int]) -> int:
  """The ImageNet class a file is named after ('tennis_ball-2.png' -> 852), or -1."""
  stem = os.path.splitext(os.path.basename(path))[0].lower()
  stem = re.sub(r'[-_ ]*\d+$', '', stem).replace('_', ' ').replace('-', ' ').strip()
  return synonyms.get(stem, -1)


def _tuxpaint_photos() -> List[str]:
  found = []
  for root, dirs, files in os.walk(TUXPAINT_DIR):
    dirs[:] = sorted(d for d in dirs if d not in ('cartoon', 'symbols'))
    for name in sorted(files):
      stem, ext = os.path.splitext(name)
      if ext == '.png' and f'{stem}.svg' not in files:
        found.append(os.path.join(root, name))
  return found


def find_photos() -> List[Photo]:
  """Every available photograph, labelled where its name is an ImageNet class."""
  photos: List[Tuple[str, str]] = [(p, 'tuxpaint') for p in _tuxpaint_photos()]
  photos += [(os.path.join(OPENCV_DATA_DIR, n), 'opencv-doc') for n in OPENCV_PHOTOS
             if os.path.isfile(os.path.join(OPENCV_DATA_DIR, n))]
  if os.path.isdir(MATE_NATURE_DIR):
    photos += [(os.path.join(MATE_NATURE_DIR, n), 'mate-backgrounds')
               for n in sorted(os.listdir(MATE_NATURE_DIR)) if n.endswith('.jpg')]
  try:
    import skimage.data  # noqa: F401
    photos += [(f'skimage:{n}', 'scikit-image') for n in SKIMAGE_PHOTOS]
  except ImportError:
    pass
  if not any(source != 'scikit-image' for _, source in photos):
    raise DatasetNotFoundError(f'No photographs found: {INSTALL_HINT}.')
  synonyms = _synonym_index(imagenet_class_names())
  return [Photo(p, s, name_label(p.split(':')[-1], synonyms)) for p, s in photos]


def _read(path: str) -> np.ndarray:
  """uint8 RGB; RGBA cut-outs composited on white."""
  if path.startswith('skimage:'):
    import skimage.data
    image = np.asarray(getattr(skimage.data, path.split(':', 1)[1])())
  else:
    from PIL import Image
    with Image.open(path) as pil:
      image = np.asarray(pil.convert('RGBA' if pil.mode in ('RGBA', 'LA', 'P') else 'RGB'))
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  if image.shape[-1] == 4:
    alpha = image[..., 3:].astype(np.float32) / 255.0
    image = image[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
  return np.clip(np.round(image[..., :3]), 0, 255).astype(np.uint8)


def load_photos(photos: Sequence[Photo], image_size: int = 224) -> np.ndarray:
  """uint8 (N, S, S, 3) resized-and-centre-cropped views of ``photos``."""
  return np.stack([resize_center_crop(_read(p.path), image_size) for p in photos])


def photo_splits(calibration_size: int, seed: int = 0,
                 photos: Optional[Sequence[Photo]] = None
                 ) -> Tuple[List[Photo], List[Photo]]:
  """Disjoint (calibration, evaluation) photos, dealt by a seeded permutation.

  Labelled photos all go to evaluation (they are few and the accuracy metric
  needs them); the calibration set is drawn from the unlabelled rest.
  """
  photos = list(find_photos() if photos is None else photos)
  unlabelled = [p for p in photos if p.label < 0]
  if not 0 < calibration_size < len(unlabelled):
    raise ValueError(f'calibration_size={calibration_size} must be between 1 and '
                     f'{len(unlabelled) - 1} (there are {len(unlabelled)} unlabelled photos; '
                     'the rest must stay for evaluation).')
  order = np.random.default_rng(seed).permutation(len(unlabelled))
  calibration = [unlabelled[i] for i in sorted(order[:calibration_size])]
  chosen = {p.path for p in calibration}
  return calibration, [p for p in photos if p.path not in chosen]
