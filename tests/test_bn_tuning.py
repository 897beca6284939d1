"""BN re-estimation: exact statistics, refolding, a functional state update."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ptq_jax
from ptq_jax.stages.bn_tuning import bn_tune, refold
from ptq_jax.stages.prepare import prepare
from ptq_jax.quant.interceptor import LayerQuant, apply_quantized, quantized_weight
from ptq_jax.quant.quantizer import init_range


class ConvBnNet(nn.Module):
  """Every BatchNorm follows a conv, so train-mode BN over one batch *is* exact BN
  re-estimation layer by layer in order."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    norm = lambda: nn.BatchNorm(use_running_average=not train, epsilon=1e-3)
    x = nn.relu(norm()(nn.Conv(6, (3, 3), strides=2)(x)))
    y = nn.Conv(6, (3, 3), feature_group_count=6)(x)          # depthwise
    x = nn.relu(norm()(y)) + x
    x = norm()(nn.Conv(8, (1, 1), use_bias=False)(x))
    return nn.Dense(4)(jnp.mean(x, axis=(1, 2)))


@pytest.fixture(scope='module')
def net():
  model = ConvBnNet()
  x = jax.random.normal(jax.random.key(3), (64, 10, 10, 3)) * 2 + 0.5
  variables = model.init(jax.random.key(0), x)
  keys = iter(jax.random.split(jax.random.key(1), 100))
  # Stale statistics and non-trivial gamma/beta (negative gammas included).
  stats = jax.tree.map(lambda a: a + jax.random.uniform(next(keys), a.shape) * 0.8,
                       variables['batch_stats'])
  params = jax.tree.map(lambda a: a + 0.7 * jax.random.normal(next(keys), a.shape),
                        variables['params'])
  return model, {'params': params, 'batch_stats': stats}, np.asarray(x)


def test_float_bn_tuning_equals_exact_batch_statistics(net):
  model, variables, x = net
  fp = ptq_jax.quantize(model, variables, x, w_bits=None, a_bits=None, first_last_bits=None,
                        progress=False)
  state, reports = bn_tune(prepare(model, variables, x, progress=False), fp.qstate, batch_size=24)
  assert len(reports) == 3 and state is not fp.qstate
  tuned = apply_quantized(model, variables, state, fp.folded_bns, jnp.asarray(x))
  exact, _ = model.apply(variables, jnp.asarray(x), train=True, mutable=['batch_stats'])
  np.testing.assert_allclose(tuned, exact, rtol=2e-4, atol=2e-4)
  stale = fp.apply(x)
  assert np.abs(np.asarray(stale) - np.asarray(exact)).max() > 100 * 2e-4  # it did change


def test_quantized_outputs_get_the_bn_statistics(net):
  model, variables, x = net
  qm = ptq_jax.quantize(model, variables, x, w_bits=4, a_bits=4, first_last_bits=None,
                        progress=False)
  state, _ = bn_tune(prepare(model, variables, x, progress=False), qm.qstate)
  outputs = {}

  def layer_output(path, module, inputs, site):
    from ptq_jax.quant.interceptor import quantized_layer_output
    y = quantized_layer_output(module, state[path].for_site(site), inputs)
    outputs[path] = y
    return y
  apply_quantized(model, variables, state, qm.folded_bns, jnp.asarray(x),
                  layer_output=layer_output)
  for layer in qm.layers:
    if not layer.bn_path:
      continue
    from ptq_jax.quant.folding import get_path
    bn = get_path(variables['params'], layer.bn_path)
    y = np.asarray(outputs[layer.path]).reshape(-1, layer.output_shape[-1])
    np.testing.assert_allclose(y.mean(0), bn['bias'], atol=2e-3)
    # Untouched: the weight bits, the layers without a BN, the original input.
    assert state[layer.path].w_quant.bits == 4
  head = [l.path for l in qm.layers if not l.bn_path][0]
  assert state[head] is qm.qstate[head]


def test_refold_keeps_the_quantization_grid():
  kernel = jax.random.normal(jax.random.key(0), (3, 3, 4, 5))
  lq = LayerQuant(kernel, jnp.ones(5), init_range(kernel, 3, 'minmax', channel_axis=-1))
  a = jnp.asarray([0.5, 2.0, 1.0, -1.5, 3.0])
  c = jnp.arange(5.0)
  new = refold(lq, a, c)
  np.testing.assert_allclose(quantized_weight(new), a * quantized_weight(lq), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(new.bias, a * 1.0 + c)


def test_empty_calibration_set(net):
  model, variables, x = net
  qm = ptq_jax.quantize(model, variables, x, progress=False)
  with pytest.raises(ValueError, match='empty'):
    bn_tune(prepare(model, variables, x[:0], progress=False), qm.qstate)


def test_fp_target_matches_the_float_networks_statistics(net):
  model, variables, x = net
  fp = ptq_jax.quantize(model, variables, x, w_bits=None, a_bits=None, first_last_bits=None,
                        progress=False)
  # On the float network there is nothing to correct, whatever the data.
  state, _ = bn_tune(prepare(model, variables, x, progress=False), fp.qstate, 'fp')
  np.testing.assert_allclose(apply_quantized(model, variables, state, fp.folded_bns, x),
                             fp.apply(x), rtol=1e-4, atol=1e-4)
  qm = ptq_jax.quantize(model, variables, x, w_bits=3, a_bits=3, first_last_bits=None,
                        progress=False)
  state, _ = bn_tune(prepare(model, variables, x, progress=False), qm.qstate, 'fp')

  def outputs_of(qstate, quantized):
    from ptq_jax.quant.interceptor import layer_forward, quantized_layer_output
    found = {}

    def layer_output(path, module, inputs, site):
      lq = qstate[path].for_site(site)
      y = (quantized_layer_output(module, lq, inputs) if quantized
           else layer_forward(module, inputs, lq.kernel, lq.bias))
      found[path] = np.asarray(y).reshape(-1, y.shape[-1])
      return y
    apply_quantized(model, variables, qstate, qm.folded_bns, jnp.asarray(x),
                    layer_output=layer_output)
    return found
  tuned, float_out = outputs_of(state, True), outputs_of(fp.qstate, False)
  for layer in qm.layers:
    if layer.bn_path:
      np.testing.assert_allclose(tuned[layer.path].mean(0), float_out[layer.path].mean(0),
                                 atol=2e-3)
      np.testing.assert_allclose(tuned[layer.path].std(0), float_out[layer.path].std(0),
                                 rtol=2e-3)
  with pytest.raises(ValueError, match='target'):
    bn_tune(prepare(model, variables, x, progress=False), qm.qstate, 'ema')
