"""Run by tests/test_distributed.py in a fresh process with 4 CPU host devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=4``): the same work on 1 and on
4 devices must agree. Prints one JSON line with what the test asserts on."""

import json
import sys

import flax.linen as nn
import jax
import numpy as np

import ptq_jax
from ptq_jax.stages.sensitivity import sensitivity_table


class MLP(nn.Module):
  """Five Dense layers of one geometry: on 4 host devices every program compiles once per
  device it runs on, so one geometry keeps this check quick."""

  @nn.compact
  def __call__(self, x):
    for _ in range(4):
      x = nn.relu(nn.Dense(16)(x))
    return nn.Dense(16)(x)


def main():
  devices = jax.devices()
  one = devices[:1]
  model = MLP()
  x = np.asarray(jax.random.normal(jax.random.key(7), (37, 16)))  # 37: padding
  variables = model.init(jax.random.key(0), x)
  config = ptq_jax.AdaQuantConfig(iterations=15, batch_size=8, guard=False)  # (small programs)
  runs = {}
  for name, devs in (('one', one), ('all', devices)):
    qm = ptq_jax.quantize(model, variables, x, w_bits=4, a_bits=4, first_last_bits=None,
                          method='adaquant', mode='parallel', adaquant=config,
                          key=jax.random.key(3), progress=False, devices=devs)
    prepared = ptq_jax.stages.prepare(model, variables, x, progress=False)
    table = sensitivity_table(prepared, {(4, 4): qm.qstate}, batch_size=10, devices=devs)
    runs[name] = dict(qm=qm, table=table, logits=qm.predict(x, batch_size=10, devices=devs),
                      fp=ptq_jax.predict_logits(model, variables, x, batch_size=10,
                                                devices=devs))
  a, b = runs['one'], runs['all']
  kernel_diff = lambda s, t: max(float(np.max(np.abs(np.asarray(s[p].kernel)
                                                     - np.asarray(t[p].kernel)))) for p in s)
  # The GPU default path (each layer one program: batched passes, every step in one call).
  single = ptq_jax.AdaQuantConfig(iterations=15, batch_size=8, guard=False)
  runtime = ptq_jax.AdaQuantRuntime(steps_per_call=15, eval_batch_size=8)
  assert runtime.single_program(len(x), single)
  one_program = {name: ptq_jax.quantize(model, variables, x, w_bits=4, a_bits=4,
                                        first_last_bits=None, method='adaquant',
                                        mode='parallel', adaquant=single, runtime=runtime,
                                        key=jax.random.key(3),
                                        progress=False, devices=devs)
                 for name, devs in (('one', one), ('all', devices))}
  print(json.dumps({
      'devices': len(devices),
      'layer_devices': sorted({r.get('device', '') for r in b['qm'].layer_reports}),
      'kernel_max_abs_diff': kernel_diff(a['qm'].qstate, b['qm'].qstate),
      'single_program_kernel_max_abs_diff': kernel_diff(one_program['one'].qstate,
                                                        one_program['all'].qstate),
      'single_program_layer_devices': sorted({r.get('device', '') for r in
                                              one_program['all'].layer_reports}),
      'logits_max_abs_diff': float(np.max(np.abs(a['logits'] - b['logits']))),
      'fp_logits_max_abs_diff': float(np.max(np.abs(a['fp'] - b['fp']))),
      'table_max_rel_diff': float(np.max(np.abs(a['table'].raw_delta - b['table'].raw_delta)
                                         / np.maximum(np.abs(a['table'].raw_delta), 1e-12))),
      'rows': int(a['logits'].shape[0]),
  }))


if __name__ == '__main__':
  sys.exit(main())
