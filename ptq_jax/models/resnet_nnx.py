"""ResNet-20 written with Flax NNX: the bundled Linen ResNet-20's twin, layer for layer.

``resnet20_nnx(variables)`` builds it holding a Linen ResNet-20's weights (the bundled
checkpoint, say), so both APIs can be quantized and compared on the same network.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx


class BasicBlock(nnx.Module):
  """Two 3x3 convs with a residual; a 1x1 projection when the shape changes."""

  def __init__(self, in_features: int, filters: int, strides: int, rngs: nnx.Rngs):
    conv = lambda i, o, k, s: nnx.Conv(i, o, (k, k), strides=(s, s), use_bias=False, rngs=rngs)
    norm = lambda n: nnx.BatchNorm(n, momentum=0.9, epsilon=1e-5, rngs=rngs)
    self.conv0, self.bn0 = conv(in_features, filters, 3, strides), norm(filters)
    self.conv1, self.bn1 = conv(filters, filters, 3, 1), norm(filters)
    self.projects = strides != 1 or in_features != filters
    if self.projects:
      self.conv_proj, self.norm_proj = conv(in_features, filters, 1, strides), norm(filters)

  def __call__(self, x):
    y = nnx.relu(self.bn0(self.conv0(x)))
    y = self.bn1(self.conv1(y))
    residual = self.norm_proj(self.conv_proj(x)) if self.projects else x
    return nnx.relu(residual + y)


class ResNet20(nnx.Module):
  """CIFAR-style ResNet-20 (16-32-64 filters) on 28x28x1 inputs."""

  def __init__(self, num_classes: int = 10, rngs: nnx.Rngs = None):
    rngs = rngs or nnx.Rngs(0)
    self.conv_init = nnx.Conv(1, 16, (3, 3), use_bias=False, rngs=rngs)
    self.bn_init = nnx.BatchNorm(16, momentum=0.9, epsilon=1e-5, rngs=rngs)
    blocks, features = [], 16
    for i in range(3):
      for j in range(3):
        filters = 16 * 2**i
        blocks.append(BasicBlock(features, filters, 2 if i > 0 and j == 0 else 1, rngs))
        features = filters
    self.blocks = nnx.List(blocks)
    self.head = nnx.Linear(64, num_classes, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn_init(self.conv_init(x)))
    for block in self.blocks:
      x = block(x)
    return self.head(jnp.mean(x, axis=(1, 2)))


def resnet20_nnx(variables: Mapping[str, Any], num_classes: int = 10) -> ResNet20:
  """An NNX ResNet-20 holding the weights of a Linen ``resnet20`` (in eval mode)."""
  # Built abstractly (no random init to throw away), then every variable is filled in.
  model = nnx.eval_shape(lambda: ResNet20(num_classes))
  params, stats = variables['params'], variables['batch_stats']

  def bn(name, where_params, where_stats):
    return {'scale': where_params[name]['scale'], 'bias': where_params[name]['bias'],
            'mean': where_stats[name]['mean'], 'var': where_stats[name]['var']}

  pure = {'conv_init': {'kernel': params['conv_init']['kernel']},
          'bn_init': bn('bn_init', params, stats),
          'head': {'kernel': params['head']['kernel'], 'bias': params['head']['bias']},
          'blocks': {}}
  for k, block in enumerate(model.blocks):
    p, s = params[f'BasicBlock_{k}'], stats[f'BasicBlock_{k}']
    entry = {'conv0': {'kernel': p['Conv_0']['kernel']}, 'bn0': bn('BatchNorm_0', p, s),
             'conv1': {'kernel': p['Conv_1']['kernel']}, 'bn1': bn('BatchNorm_1', p, s)}
    if block.projects:
      entry.update(conv_proj={'kernel': p['conv_proj']['kernel']},
                   norm_proj=bn('norm_proj', p, s))
    pure['blocks'][k] = entry
  state = nnx.state(model, (nnx.Param, nnx.BatchStat))
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, pure))
  nnx.update(model, state)
  model.eval()
  return model
