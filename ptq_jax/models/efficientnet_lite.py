"""EfficientNet-Lite (Tan & Le 2019; the 'lite' variant for integer hardware) in Flax linen.

Lite drops squeeze-and-excitation, uses ReLU6, and keeps the stem (32) and head
(1280) widths fixed. Layers follow the reference TensorFlow model: TF-style SAME
padding (Flax's ``padding='SAME'`` is exactly that), BatchNorm epsilon 1e-3,
no biases before BatchNorm. Module names mirror the PyTorch port's state dict so
that importing weights is a direct name map (``ptq_jax.importers.efficientnet``).
Input: ``(x - 127) / 128`` of RGB images at 224x224.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

# (kernel, first stride, expansion, output channels, repeats): EfficientNet-B0's stages.
LITE0_STAGES: Tuple[Tuple[int, int, int, int, int], ...] = (
    (3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3),
    (5, 1, 6, 112, 3), (5, 2, 6, 192, 4), (3, 1, 6, 320, 1))


class MBConv(nn.Module):
  """Mobile inverted bottleneck without SE: expand 1x1 -> depthwise kxk -> project 1x1."""

  out_channels: int
  kernel: int
  strides: int
  expansion: int
  bn_epsilon: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(nn.Conv, use_bias=False, padding='SAME', dtype=self.dtype)
    norm = functools.partial(nn.BatchNorm, use_running_average=True, epsilon=self.bn_epsilon,
                             dtype=self.dtype)
    in_channels = x.shape[-1]
    hidden = in_channels * self.expansion
    y = x
    if self.expansion != 1:
      y = nn.relu6(norm(name='_bn0')(conv(hidden, (1, 1), name='_expand_conv')(y)))
    y = conv(hidden, (self.kernel, self.kernel), (self.strides, self.strides),
             feature_group_count=hidden, name='_depthwise_conv')(y)
    y = nn.relu6(norm(name='_bn1')(y))
    y = norm(name='_bn2')(conv(self.out_channels, (1, 1), name='_project_conv')(y))
    if self.strides == 1 and in_channels == self.out_channels:
      y = x + y
    return y


class EfficientNetLite(nn.Module):
  """EfficientNet-Lite for inference (no dropout / drop-connect: post-training use)."""

  num_classes: int = 1000
  stages: Sequence[Tuple[int, int, int, int, int]] = LITE0_STAGES
  stem_channels: int = 32
  head_channels: int = 1280
  bn_epsilon: float = 1e-3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    if train:
      raise ValueError('EfficientNetLite is an inference model here (imported weights); '
                       'it has no training mode.')
    conv = functools.partial(nn.Conv, use_bias=False, padding='SAME', dtype=self.dtype)
    norm = functools.partial(nn.BatchNorm, use_running_average=True, epsilon=self.bn_epsilon,
                             dtype=self.dtype)
    x = nn.relu6(norm(name='_bn0')(conv(self.stem_channels, (3, 3), (2, 2),
                                        name='_conv_stem')(x)))
    index = 0
    for kernel, strides, expansion, channels, repeats in self.stages:
      for i in range(repeats):
        x = MBConv(channels, kernel, strides if i == 0 else 1, expansion, self.bn_epsilon,
                   self.dtype, name=f'_blocks_{index}')(x)
        index += 1
    x = nn.relu6(norm(name='_bn1')(conv(self.head_channels, (1, 1), name='_conv_head')(x)))
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, name='_fc')(x)
    return jnp.asarray(x, jnp.float32)


def efficientnet_lite0(num_classes: int = 1000, **kwargs) -> EfficientNetLite:
  """EfficientNet-Lite0 (224x224, 4.7 M parameters, 0.4 G MACs)."""
  return EfficientNetLite(num_classes=num_classes, **kwargs)
