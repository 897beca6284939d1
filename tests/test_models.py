"""Bundled model shapes, the fast depthwise path, and traced parameter / MAC counts."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ptq_jax.linear import LayerGeometry, depthwise_conv2d, is_pointwise, pointwise_conv
from ptq_jax.models import MODELS, create_model, init_variables
from ptq_jax.models.fast_depthwise import fast_depthwise
from ptq_jax.trace import totals, trace


@pytest.mark.parametrize('name', sorted(MODELS))
def test_output_shapes(name):
  spec = MODELS[name]
  model = create_model(name)
  x = jnp.zeros((2,) + spec.input_shape)
  variables = jax.eval_shape(lambda: init_variables(name, jax.random.key(0)))
  # (An NNX model's Linen view without BatchNorm has no batch statistics.)
  assert set(variables) == ({'params', 'batch_stats'} if spec.init is None else {'params'})
  out = jax.eval_shape(lambda v: model.apply(v, x), variables)
  assert out.shape == (2, spec.num_classes) and out.dtype == jnp.float32


@pytest.mark.parametrize('name', ['resnet20', 'mobilenet_v2_fmnist'])
def test_fmnist_models_run_and_train_mode_updates_batch_stats(name):
  model = create_model(name)
  x = jax.random.normal(jax.random.key(1), (4, 28, 28, 1))
  # jitted: op by op, MobileNetV2's init and training step compile hundreds of small ops
  variables = jax.jit(model.init)(jax.random.key(0), x)
  train_apply = jax.jit(lambda v, x, key: model.apply(v, x, train=True, mutable=['batch_stats'],
                                                      rngs={'dropout': key}))
  logits, updates = train_apply(variables, x, jax.random.key(2))
  assert logits.shape == (4, 10) and bool(jnp.all(jnp.isfinite(logits)))
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), variables['batch_stats'],
                         updates['batch_stats'])
  assert all(jax.tree.leaves(changed))


@pytest.mark.parametrize('padding,strides', [('SAME', 1), ('SAME', 2), ('VALID', 1),
                                             ([(2, 0), (1, 1)], 2)])
def test_fast_depthwise_equals_grouped_conv(padding, strides):
  conv = nn.Conv(12, (3, 3), strides=strides, padding=padding, feature_group_count=12)
  x = jax.random.normal(jax.random.key(0), (3, 9, 10, 12))
  variables = conv.init(jax.random.key(1), x)
  expected = conv.apply(variables, x)
  with fast_depthwise():
    actual = conv.apply(variables, x)
  np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('kernel_hw,strides,pads', [
    ((3, 3), (1, 1), ((1, 1), (1, 1))), ((3, 3), (2, 2), ((0, 1), (0, 1))),
    ((3, 3), (3, 2), ((2, 0), (1, 2))), ((5, 3), (2, 1), ((2, 2), (0, 0))),
    ((1, 1), (1, 1), ((0, 0), (0, 0)))])
def test_depthwise_gradients_equal_grouped_conv(kernel_hw, strides, pads):
  """The hand-written VJP of the shifted-product depthwise conv equals autodiff of
  XLA's grouped conv, for strides that leave rows unused and asymmetric padding."""
  x = jax.random.normal(jax.random.key(0), (2, 9, 10, 6))
  kernel = jax.random.normal(jax.random.key(1), kernel_hw + (1, 6))

  def grouped(x, k):
    return jax.lax.conv_general_dilated(x, k, strides, pads, dimension_numbers=(
        'NHWC', 'HWIO', 'NHWC'), feature_group_count=6)

  shifted = lambda x, k: depthwise_conv2d(x, k, strides, pads)
  y, vjp = jax.vjp(shifted, x, kernel)
  y_ref, vjp_ref = jax.vjp(grouped, x, kernel)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  g = jax.random.normal(jax.random.key(2), y.shape)
  for got, want in zip(vjp(g), vjp_ref(g)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('spatial,strides', [((7, 6), (1, 1)), ((7, 6), (2, 2)), ((9,), (3,))])
def test_pointwise_conv_equals_conv(spatial, strides):
  """A 1x1 conv as a matmul over the strided pixels: same values and gradients as
  ``lax.conv_general_dilated``."""
  n = len(spatial)
  x = jax.random.normal(jax.random.key(0), (2,) + spatial + (5,))
  kernel = jax.random.normal(jax.random.key(1), (1,) * n + (5, 3))
  geom = LayerGeometry('conv', strides, ((0, 0),) * n, (1,) * n, (1,) * n, 1)
  assert is_pointwise(geom, kernel.shape)
  assert not is_pointwise(geom._replace(padding=((1, 1),) * n), kernel.shape)
  spec = 'HWD'[:n]

  def conv(x, k):
    return jax.lax.conv_general_dilated(x, k, strides, ((0, 0),) * n,
                                        dimension_numbers=(f'N{spec}C', f'{spec}IO', f'N{spec}C'))

  y, vjp = jax.vjp(lambda x, k: pointwise_conv(x, k, strides), x, kernel)
  y_ref, vjp_ref = jax.vjp(conv, x, kernel)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  g = jax.random.normal(jax.random.key(2), y.shape)
  for got, want in zip(vjp(g), vjp_ref(g)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_fast_depthwise_leaves_other_convs_alone():
  conv = nn.Conv(8, (3, 3), feature_group_count=2)  # grouped but not depthwise
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 4))
  variables = conv.init(jax.random.key(1), x)
  plain = conv.apply(variables, x)           # outside the block: Flax's own conv
  with fast_depthwise():
    inside = conv.apply(variables, x)
  # The same lax convolution runs inside the block, so the outputs are identical (a
  # depthwise substitute applied to this grouped conv would compute something else).
  np.testing.assert_array_equal(inside, plain)


def test_resnet20_trace_matches_hand_counts():
  model = create_model('resnet20')
  x = jnp.zeros((1, 28, 28, 1))
  layers = trace(model, jax.eval_shape(lambda: model.init(jax.random.key(0), x)), x)
  assert len(layers) == 19 + 2 + 1  # 19 3x3 convs, 2 projections, 1 dense
  first, head = layers[0], layers[-1]
  assert (first.kind, first.kernel_shape, first.output_shape) == ('conv', (3, 3, 1, 16), (28, 28, 16))
  assert first.params == 9 * 16 and first.macs == 28 * 28 * 16 * 9
  assert (head.kind, head.params, head.macs) == ('dense', 64 * 10 + 10, 640)
  # Stage-2 first conv: 16 -> 32 at stride 2, so 14x14 outputs.
  s2 = [l for l in layers if l.kernel_shape == (3, 3, 16, 32)][0]
  assert s2.output_shape == (14, 14, 32) and s2.macs == 14 * 14 * 32 * 9 * 16
  # Hand count: stem + 3 stages of 3 blocks (2 convs each) + 2 projections + head.
  params = (9 * 16 + 6 * 9 * 16 * 16 + (9 * 16 * 32 + 5 * 9 * 32 * 32) + (9 * 32 * 64 + 5 * 9 * 64 * 64)
            + 16 * 32 + 32 * 64 + 64 * 10 + 10)
  assert totals(layers)['params'] == params


def test_depthwise_trace_counts():
  model = create_model('mobilenet_v2_fmnist')
  x = jnp.zeros((1, 28, 28, 1))
  layers = trace(model, jax.eval_shape(lambda: model.init(jax.random.key(0), x)), x)
  dw = [l for l in layers if l.groups > 1]
  assert dw and all(l.kernel_shape[2] == 1 and l.groups == l.kernel_shape[3] for l in dw)
  first = dw[0]  # block 0: 16 channels at 14x14, stride 1
  assert first.macs == 14 * 14 * 16 * 9 and first.params == 9 * 16
