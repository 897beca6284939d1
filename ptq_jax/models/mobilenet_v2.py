"""MobileNetV2 (Sandler et al. 2018) in plain Flax linen.

Inverted residual blocks (1x1 expand -> 3x3 depthwise -> 1x1 linear projection)
with ReLU6, built only from ``nn.Conv``, ``nn.BatchNorm``, ``nn.Dense`` and
activations. ``mobilenet_v2`` is the ImageNet network at 224x224;
``mobilenet_v2_fmnist`` keeps the block structure at half width with two of
the five strides, so that 28x28 inputs run at 14x14, 7x7 and 4x4 (16 M MACs).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

ModuleDef = Any

# (expansion t, output channels c, repeats n, first stride s), as in the paper's Table 2.
IMAGENET_BLOCKS: Tuple[Tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
    (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
# Same blocks for 28x28 inputs after a stride-2 stem: 14x14 -> 7x7 -> 4x4.
FMNIST_BLOCKS: Tuple[Tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 1),
    (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def make_divisible(value: float, divisor: int = 8) -> int:
  """Round channels to a multiple of ``divisor`` without losing more than 10%."""
  new = max(divisor, int(value + divisor / 2) // divisor * divisor)
  if new < 0.9 * value:
    new += divisor
  return new


class InvertedResidual(nn.Module):
  """Expand (1x1) -> depthwise (3x3) -> project (1x1, linear); residual if shapes match."""

  out_channels: int
  expansion: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x):
    in_channels = x.shape[-1]
    hidden = in_channels * self.expansion
    y = x
    if self.expansion != 1:
      y = nn.relu6(self.norm()(self.conv(hidden, (1, 1))(y)))
    y = self.conv(hidden, (3, 3), (self.strides, self.strides),
                  feature_group_count=hidden)(y)
    y = nn.relu6(self.norm()(y))
    y = self.conv(self.out_channels, (1, 1))(y)
    y = self.norm()(y)
    if self.strides == 1 and in_channels == self.out_channels:
      y = x + y
    return y


class MobileNetV2(nn.Module):
  """MobileNetV2 with a configurable stem stride, block table and width."""

  num_classes: int
  width_multiplier: float = 1.0
  stem_strides: int = 2
  blocks: Sequence[Tuple[int, int, int, int]] = IMAGENET_BLOCKS
  last_channels: int = 1280
  dropout_rate: float = 0.2
  dtype: Any = jnp.float32
  # PyTorch's padding, (k - 1) // 2 on every side (torchvision's weights need it); else
  # 'SAME', which pads a stride-2 conv of an even input on the far side only.
  symmetric_padding: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv = functools.partial(Conv, use_bias=False, dtype=self.dtype,
                             symmetric_padding=self.symmetric_padding)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=0.9, epsilon=1e-5, dtype=self.dtype)
    x = conv(make_divisible(32 * self.width_multiplier), (3, 3),
             (self.stem_strides, self.stem_strides), name='conv_init')(x)
    x = nn.relu6(norm(name='bn_init')(x))
    for t, c, n, s in self.blocks:
      out = make_divisible(c * self.width_multiplier)
      for i in range(n):
        x = InvertedResidual(out, t, s if i == 0 else 1, conv=conv, norm=norm)(x)
    last = make_divisible(self.last_channels * max(1.0, self.width_multiplier))
    x = conv(last, (1, 1), name='conv_last')(x)
    x = nn.relu6(norm(name='bn_last')(x))
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x)
    return jnp.asarray(x, jnp.float32)


class Conv(nn.Conv):
  """``nn.Conv`` padded 'SAME', or symmetrically as PyTorch pads."""

  padding: Any = 'SAME'
  symmetric_padding: bool = False

  def __post_init__(self):
    if self.symmetric_padding:
      object.__setattr__(self, 'padding', tuple(((k - 1) // 2,) * 2 for k in self.kernel_size))
    super().__post_init__()


def mobilenet_v2(num_classes: int = 1000, **kwargs) -> MobileNetV2:
  """ImageNet MobileNetV2 (224x224, width 1.0, 3.5 M params)."""
  return MobileNetV2(num_classes=num_classes, **kwargs)


def mobilenet_v2_fmnist(num_classes: int = 10, **kwargs) -> MobileNetV2:
  """MobileNetV2 sized for 28x28: stride-2 stem, two stride-2 stages, width 0.5."""
  kwargs.setdefault('width_multiplier', 0.5)
  kwargs.setdefault('stem_strides', 2)
  kwargs.setdefault('blocks', FMNIST_BLOCKS)
  kwargs.setdefault('last_channels', 640)
  kwargs.setdefault('dropout_rate', 0.1)
  return MobileNetV2(num_classes=num_classes, **kwargs)
