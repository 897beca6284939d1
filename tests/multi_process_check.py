"""Run by tests/test_distributed.py as two processes on this machine (multi-host
parallel AdaQuant through ``jax.distributed``): process ``argv[1]`` of 2, coordinator
at ``localhost:argv[2]``. Each process optimises half of the layers; both must end with
the same state as a single-process run. Prints one JSON line."""

import json
import sys

import jax

jax.config.update('jax_cpu_collectives_implementation', 'gloo')
jax.distributed.initialize(f'localhost:{sys.argv[2]}', num_processes=2,
                           process_id=int(sys.argv[1]))

import numpy as np  # noqa: E402

import ptq_jax  # noqa: E402
from tests.test_quant import ToyNet, random_variables  # noqa: E402


def main():
  model = ToyNet()
  x = np.asarray(jax.random.normal(jax.random.key(7), (24, 12, 12, 3)))
  variables = random_variables(model, x)
  config = ptq_jax.AdaQuantConfig(iterations=15, batch_size=8)
  qm = ptq_jax.quantize(model, variables, x, w_bits=4, a_bits=4, first_last_bits=None,
                        method='adaquant', mode='parallel', adaquant=config,
                        key=jax.random.key(3), progress=False, devices=jax.local_devices())
  print(json.dumps({
      'process': jax.process_index(), 'processes': jax.process_count(),
      'owners': [r.get('process', jax.process_index()) for r in qm.layer_reports],
      'kernels': {p: np.asarray(lq.kernel).ravel()[:8].tolist() for p, lq in qm.qstate.items()},
      'mse_after': [r['mse_after'] for r in qm.layer_reports]}))


if __name__ == '__main__':
  sys.exit(main())
