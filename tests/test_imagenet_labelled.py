"""The labelled ImageNet photos in the repository and torchvision's MobileNetV2 weights."""

import numpy as np
import pytest

from ptq_jax.data import imagenet_nips17, loader
from ptq_jax.importers.mapping import MappingError
from ptq_jax.importers import torchvision_mobilenet as tvm
from ptq_jax.importers.torch_checkpoint import read_torch_checkpoint


@pytest.fixture(scope='module')
def photos():
  return loader.load_split('imagenet_nips17', 'test')


def test_the_labelled_set_loads_whole_with_imagenet_labels(photos):
  """Catches a missing or partial set, the 1-based TrueLabel left unshifted, or a
  crop other than the 224 evaluation view."""
  assert photos.images.shape == (1000, 224, 224, 3) and photos.images.dtype == np.uint8
  assert photos.labels.min() >= 0 and photos.labels.max() <= 999
  assert len(set(photos.labels.tolist())) == 430   # (the set's classes, not one repeated)
  rows = imagenet_nips17.records()
  assert all(r['license_url'] == 'https://creativecommons.org/licenses/by/2.0/' and r['author']
             and 'flickr.com/' in r['source_url'] for r in rows)   # (each one's attribution)


def test_labels_line_up_with_their_photos(photos):
  """Known pairs from the set's images.csv (TrueLabel - 1): catches labels sorted apart
  from their images."""
  ids = [r['image_id'] for r in imagenet_nips17.records()]
  known = {'0c7ac4a8c9dfa802': 305, 'f43fbfe8a9ea876c': 883, '000b7d55b6184b08': 388,
           '001b5e6f1b89fd3b': 576}
  for image_id, label in known.items():
    assert photos.labels[ids.index(image_id)] == label


def test_a_wrong_split_or_a_missing_set_is_a_clear_error(tmp_path, monkeypatch):
  with pytest.raises(ValueError, match="one split 'test'"):
    loader.load_split('imagenet_nips17', 'train')
  monkeypatch.setenv('PTQ_JAX_IMAGENET_NIPS17_DIR', str(tmp_path))
  with pytest.raises(FileNotFoundError, match='ship in the repository'):
    loader.load_split('imagenet_nips17', 'test')


def _stem_by_hand(arrays, image):
  """torchvision's features.0 (3x3 conv, stride 2, padding 1; BN; ReLU6) in numpy."""
  w = arrays['features.0.0.weight']                   # (32, 3, 3, 3)
  size = image.shape[0]
  x = np.pad(image, ((1, 1), (1, 1), (0, 0)))
  out = np.zeros((size // 2, size // 2, w.shape[0]), np.float64)
  for i in range(3):
    for j in range(3):
      patch = x[i:i + size:2, j:j + size:2, :]        # (size / 2, size / 2, 3)
      out += patch @ w[:, :, i, j].T.astype(np.float64)
  bn = lambda k: arrays[f'features.0.1.{k}']
  out = (out - bn('running_mean')) / np.sqrt(bn('running_var') + 1e-5) * bn('weight') + bn('bias')
  return np.clip(out, 0, 6)


# torchvision's own output for photo 0 (its top five classes and logits), computed once
# with torchvision 0.29.1 / torch 2.14.1: ``mobilenet_v2()`` with this file's state dict,
# in eval mode, on ``preprocess_images(photos.images[:1])`` transposed to NCHW.
TORCHVISION_TOP5 = [388, 294, 368, 297, 387]
TORCHVISION_LOGITS = [17.5645, 13.7801, 13.2796, 12.8873, 12.6305]


def test_the_importer_reproduces_torchvision_and_its_padding(photos):
  """torchvision's logits for one photo (stored numbers, no torch here), and a hand
  computation of its first block from the file's tensors: catches the 'SAME' padding
  (which shifts every stride-2 window by a pixel), a kernel layout, a BatchNorm or a
  block-order mapping error."""
  model, variables = tvm.load_mobilenet_v2()
  arrays = read_torch_checkpoint(tvm.default_weights_path())
  image = tvm.preprocess_images(photos.images[:1])
  logits, state = model.apply(variables, image, capture_intermediates=True,
                              mutable=['intermediates'])
  stem = np.clip(np.asarray(state['intermediates']['bn_init']['__call__'][0][0]), 0, 6)
  np.testing.assert_allclose(stem, _stem_by_hand(arrays, image[0]), atol=2e-4, rtol=1e-4)
  logits = np.asarray(logits)[0]
  assert np.argsort(-logits)[:5].tolist() == TORCHVISION_TOP5
  np.testing.assert_allclose(logits[TORCHVISION_TOP5], TORCHVISION_LOGITS, atol=2e-4)


def _fake_checkpoint(widths):
  return {f'features.{i}.0.weight': np.zeros((w, 1, 1, 1), np.float32)
          for i, w in enumerate(widths)}


def test_a_neighbouring_width_is_read_and_another_structure_is_described():
  """Catches a width variant refused, or a foreign file refused without saying what it
  holds against what the loader builds."""
  assert tvm.matching_width(_fake_checkpoint(tvm.model_widths(0.5))) == 0.5
  with pytest.raises(MappingError, match=r'holds 11 feature blocks.*loader builds 19 blocks'):
    tvm.matching_width(_fake_checkpoint(tvm.model_widths(1.0)[:11]))
