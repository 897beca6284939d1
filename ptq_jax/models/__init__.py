"""Bundled Flax models and a registry that builds them by name."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from ptq_jax.models.mobilenet_v2 import MobileNetV2, mobilenet_v2, mobilenet_v2_fmnist
from ptq_jax.models.resnet import ResNet, resnet18, resnet20, resnet50
from ptq_jax.models.vit_nnx import init_vit_fmnist, vit_fmnist


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """How to build a bundled model and what input it expects (HWC, no batch)."""

  constructor: Callable[..., nn.Module]
  input_shape: Tuple[int, int, int]
  num_classes: int
  description: str
  # How to initialise its variables from a PRNG key (num_classes as a keyword), for
  # models that are not plain Linen (an NNX model's Linen view); None: ``model.init``.
  init: Optional[Callable[..., Any]] = None


MODELS: Dict[str, ModelSpec] = {
    'resnet20': ModelSpec(resnet20, (28, 28, 1), 10,
                          'CIFAR-style ResNet-20, stem for 28x28x1 (Fashion-MNIST)'),
    'mobilenet_v2_fmnist': ModelSpec(mobilenet_v2_fmnist, (28, 28, 1), 10,
                                     'MobileNetV2 width 0.5, strides for 28x28x1 (Fashion-MNIST)'),
    'resnet18': ModelSpec(resnet18, (224, 224, 3), 1000, 'ImageNet ResNet-18'),
    'resnet50': ModelSpec(resnet50, (224, 224, 3), 1000, 'ImageNet ResNet-50'),
    'mobilenet_v2': ModelSpec(mobilenet_v2, (224, 224, 3), 1000, 'ImageNet MobileNetV2 1.0'),
    'vit_fmnist': ModelSpec(vit_fmnist, (28, 28, 1), 10,
                            'ViT in Flax NNX, 4x4 patches, 4 blocks (Fashion-MNIST)',
                            init=init_vit_fmnist),
}


def get_model_spec(name: str) -> ModelSpec:
  """Returns the registry entry for ``name`` or raises a KeyError listing the choices."""
  if name not in MODELS:
    raise KeyError(f'Unknown model {name!r}; choose one of {sorted(MODELS)}.')
  return MODELS[name]


def create_model(name: str, num_classes: int | None = None, **kwargs) -> nn.Module:
  """Builds a bundled model by registry name (``num_classes`` defaults to the spec's)."""
  spec = get_model_spec(name)
  return spec.constructor(num_classes=num_classes or spec.num_classes, **kwargs)


def init_variables(name: str, key: jax.Array, **kwargs) -> Dict[str, Any]:
  """Freshly initialised variables of registry model ``name`` (inference-mode init)."""
  spec = get_model_spec(name)
  kwargs.setdefault('num_classes', spec.num_classes)
  if spec.init is not None:
    return spec.init(key, **kwargs)
  model = create_model(name, **kwargs)
  return model.init(key, jnp.zeros((1,) + spec.input_shape), train=False)


__all__ = ['MODELS', 'ModelSpec', 'MobileNetV2', 'ResNet', 'create_model', 'get_model_spec',
           'init_variables', 'mobilenet_v2', 'mobilenet_v2_fmnist', 'resnet18', 'resnet20',
           'resnet50', 'vit_fmnist']
