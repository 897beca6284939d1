"""CPU fast paths of the AdaQuant step give the plain path's numbers, and one layer's step
compiles once however many iterations it runs."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ptq_jax
from ptq_jax import linear
from ptq_jax.linear import LayerGeometry, conv_with_canonical_grad
from ptq_jax.quant.interceptor import LayerQuant
from ptq_jax.quant.quantizer import init_range
from ptq_jax.stages.adaquant import layer as adaquant
from ptq_jax.trace import LayerInfo


def _geometry(nd, stride, padding, dilation, size, k):
  if isinstance(padding, str):
    pads = jax.lax.padtype_to_pads((size,) * nd, ((k - 1) * dilation + 1,) * nd,
                                   (stride,) * nd, padding)
  else:
    pads = (padding,) * nd
  return LayerGeometry('conv', (stride,) * nd, tuple(map(tuple, pads)), (dilation,) * nd,
                       (1,) * nd, 1)


CASES = [(nd, s, p, d, k) for nd, s, p, d, k in itertools.product(
    (1, 2), (1, 2, 3), ('SAME', 'VALID', (2, 0)), (1, 2), (1, 3, 4))]


@pytest.mark.parametrize('nd,stride,padding,dilation,k', CASES[::7])   # every value of each
def test_canonical_kernel_gradient_equals_autodiffs(nd, stride, padding, dilation, k):
  """The hand-written conv gradients (kernel as a canonical conv, input against the
  flipped kernel) equal autodiff's for strides, paddings (incl. asymmetric ones whose
  last rows the forward never reads), dilations and 1-D/2-D convs: a wrong crop, flip
  or dilation in either gradient changes numbers here."""
  size = 8
  geom = _geometry(nd, stride, padding, dilation, size, k)
  x = jax.random.normal(jax.random.key(0), (3,) + (size,) * nd + (4,))
  kernel = jax.random.normal(jax.random.key(1), (k,) * nd + (4, 5))
  plain = lambda x, w: linear._conv(x, w, geom)
  y, plain_vjp = jax.vjp(plain, x, kernel)
  g = jax.random.normal(jax.random.key(2), y.shape)
  fast_y, fast_vjp = jax.vjp(lambda x, w: conv_with_canonical_grad(x, w, geom), x, kernel)
  np.testing.assert_array_equal(fast_y, y)
  for fast, slow in zip(fast_vjp(g), plain_vjp(g)):
    np.testing.assert_allclose(fast, slow, rtol=1e-5, atol=1e-5)


def _case(layer: LayerInfo, seed: int):
  """``layer``'s W4A4 min/max start, 64 non-negative cached inputs and float targets."""
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  kernel = 0.3 * jax.random.normal(k1, layer.kernel_shape)
  bias = 0.1 * jax.random.normal(k2, layer.kernel_shape[-1:])
  xs = jax.nn.relu(jax.random.normal(k3, (64,) + layer.input_shape))
  lq = LayerQuant(kernel, bias, init_range(kernel, 4, 'minmax', channel_axis=-1),
                  init_range(xs, 4, 'minmax'))
  target = adaquant.float_target(layer.geometry, layer.activation, LayerQuant(kernel, bias), xs)
  return layer, lq, xs, target


def _conv_layer(channels=(5, 7), size=9):
  c_in, c_out = channels
  geom = _geometry(2, 1, 'SAME', 1, size, 3)
  return _case(LayerInfo('fast/conv', 'conv', (3, 3, c_in, c_out), 1, (size, size, c_in),
                         (size, size, c_out), 9 * c_in * c_out + c_out,
                         size * size * 9 * c_in * c_out, geom, activation='relu'), seed=3)


def test_fast_and_plain_conv_paths_give_the_same_adaquant_steps(monkeypatch):
  """Twenty AdaQuant steps on a conv with the canonical-gradient path and with autodiff's
  conv give the same layer to float rounding (a gradient bug would send them apart)."""
  layer, lq, xs, ys = _conv_layer()
  config = ptq_jax.AdaQuantConfig(iterations=20, batch_size=16, guard=False)
  def run():
    jax.clear_caches()   # (else the second run reuses the first one's compiled step)
    return adaquant.optimize_layer(layer, lq, xs, ys, config, jax.random.key(0))
  fast, fast_report = run()
  monkeypatch.setattr(linear, 'has_canonical_grad', lambda geom: False)
  plain, plain_report = run()
  monkeypatch.undo()
  assert 'custom_vjp' in str(jax.make_jaxpr(lambda x, w: linear.apply_linear(
      layer.geometry, x, w))(xs[:2], lq.kernel))   # (the fast path was the one timed)
  assert float(jnp.max(jnp.abs(fast.kernel - lq.kernel))) > 1e-4   # the steps moved it
  for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(plain)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert fast_report['mse_after'] == pytest.approx(plain_report['mse_after'], rel=1e-4)


@pytest.mark.parametrize('steps_per_call', [1, 4])
def test_one_layers_step_compiles_once_across_iterations(steps_per_call):
  """A layer's step program is compiled once, whatever the iteration count: a step
  number or minibatch passed as a static (Python) value would compile one per call."""
  layer, lq, xs, ys = _conv_layer(channels=(3 + steps_per_call, 6))   # a fresh geometry
  runtime = ptq_jax.AdaQuantRuntime(steps_per_call=steps_per_call)
  before = adaquant.compiled_step_count()
  for iterations in (16, 32):   # (4 guard checks: calls of 4 steps only)
    adaquant.optimize_layer(layer, lq, xs, ys, ptq_jax.AdaQuantConfig(
        iterations=iterations, batch_size=16), jax.random.key(0), runtime=runtime)
  assert adaquant.compiled_step_count() - before == 1


def _depthwise_layer(channels=6, size=9):
  geom = LayerGeometry('conv', (1, 1), ((1, 1), (1, 1)), (1, 1), (1, 1), channels)
  return _case(LayerInfo('fast/dw', 'conv', (3, 3, 1, channels), channels,
                         (size, size, channels), (size, size, channels), 10 * channels,
                         size * size * 9 * channels, geom, activation='relu6'), seed=6)


@pytest.mark.parametrize('rounding', ['free', 'learned'])
def test_memory_scheduled_depthwise_steps_equal_the_default_schedules(monkeypatch, rounding):
  """A depthwise layer's step program is compiled with the memory-optimised schedule on
  CPU (and no other layer's), and gives the same layer as the default schedule: the
  option may reorder work, never change it."""
  from ptq_jax import xla_options
  layer, lq, xs, ys = _depthwise_layer()
  conv, *_ = _conv_layer()
  on_cpu = jax.default_backend() == 'cpu'
  assert xla_options.memory_schedule_pays(layer.geometry, xs.shape, lq.kernel.shape) == on_cpu
  assert not xla_options.memory_schedule_pays(conv.geometry, (64, 9, 9, 5), conv.kernel_shape)
  config = ptq_jax.AdaQuantConfig(iterations=12, batch_size=16, rounding=rounding)
  run = lambda: adaquant.optimize_layer(layer, lq, xs, ys, config, jax.random.key(0))[0]
  before = adaquant.compiled_step_count()
  scheduled = run()
  assert adaquant.compiled_step_count() == before + 1
  monkeypatch.setattr(xla_options, 'memory_schedule_pays', lambda *a: False)
  default = run()
  assert adaquant.compiled_step_count() == before + (2 if on_cpu else 1)   # another program
  for a, b in zip(jax.tree.leaves(scheduled), jax.tree.leaves(default)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
