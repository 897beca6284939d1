"""ResNets in plain Flax linen: CIFAR-style ResNet-20 and ImageNet ResNet-18/50.

Only standard ``nn.Conv``, ``nn.BatchNorm``, ``nn.Dense`` and ``nn.relu`` are used,
with no quantization code inside: ptq_jax quantizes these models without editing
them. The structure follows ``flax/examples/imagenet/models.py``.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

ModuleDef = Any


class BasicBlock(nn.Module):
  """Two 3x3 convs with a residual; a 1x1 projection when the shape changes."""

  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(self.filters, (3, 3), (self.strides, self.strides))(x)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.filters, (3, 3))(y)
    y = self.norm(scale_init=nn.initializers.zeros_init())(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters, (1, 1), (self.strides, self.strides),
                           name='conv_proj')(residual)
      residual = self.norm(name='norm_proj')(residual)
    return nn.relu(residual + y)


class BottleneckBlock(nn.Module):
  """1x1 -> 3x3 (strided) -> 1x1 (x4) bottleneck with a residual."""

  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(self.filters, (1, 1))(x)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.filters, (3, 3), (self.strides, self.strides))(y)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.filters * 4, (1, 1))(y)
    y = self.norm(scale_init=nn.initializers.zeros_init())(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters * 4, (1, 1), (self.strides, self.strides),
                           name='conv_proj')(residual)
      residual = self.norm(name='norm_proj')(residual)
    return nn.relu(residual + y)


class ResNet(nn.Module):
  """A ResNet; ``stem='cifar'`` is one 3x3 conv, ``stem='imagenet'`` 7x7/2 + max-pool."""

  stage_sizes: Sequence[int]
  block_cls: ModuleDef
  num_classes: int
  num_filters: int = 64
  stem: str = 'imagenet'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=0.9, epsilon=1e-5, dtype=self.dtype)
    if self.stem == 'imagenet':
      x = conv(self.num_filters, (7, 7), (2, 2), padding=[(3, 3), (3, 3)],
               name='conv_init')(x)
      x = nn.relu(norm(name='bn_init')(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
    elif self.stem == 'cifar':
      x = conv(self.num_filters, (3, 3), name='conv_init')(x)
      x = nn.relu(norm(name='bn_init')(x))
    else:
      raise ValueError(f"stem must be 'imagenet' or 'cifar', got {self.stem!r}")
    for i, block_size in enumerate(self.stage_sizes):
      for j in range(block_size):
        strides = 2 if i > 0 and j == 0 else 1
        x = self.block_cls(self.num_filters * 2**i, strides=strides,
                           conv=conv, norm=norm)(x)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x)
    return jnp.asarray(x, jnp.float32)


def resnet20(num_classes: int = 10, **kwargs) -> ResNet:
  """CIFAR-style ResNet-20 (He et al. 2016, 16-32-64 filters, 0.27 M params)."""
  return ResNet(stage_sizes=(3, 3, 3), block_cls=BasicBlock, num_classes=num_classes,
                num_filters=16, stem='cifar', **kwargs)


def resnet18(num_classes: int = 1000, **kwargs) -> ResNet:
  """ImageNet ResNet-18."""
  return ResNet(stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock, num_classes=num_classes,
                **kwargs)


def resnet50(num_classes: int = 1000, **kwargs) -> ResNet:
  """ImageNet ResNet-50."""
  return ResNet(stage_sizes=(3, 4, 6, 3), block_cls=BottleneckBlock,
                num_classes=num_classes, **kwargs)
