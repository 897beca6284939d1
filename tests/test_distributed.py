"""Several devices and several processes (ptq_jax.distributed), on CPU.

The multi-device checks run in a fresh process with 4 host devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=4`` must be set before JAX starts);
the multi-host check runs two processes joined by ``jax.distributed.initialize``.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import ptq_jax
from ptq_jax import distributed
from tests.test_quant import ToyNet, random_variables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_module(module, *args, env=None, timeout=600):
  return subprocess.Popen([sys.executable, '-m', module, *args], cwd=ROOT, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env={**os.environ, **(env or {})})


def last_json(proc, timeout=600):
  out, err = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, err[-3000:]
  return json.loads(out.strip().splitlines()[-1])


def test_one_and_four_devices_agree():
  """Layer-parallel AdaQuant (with separate programs, and with each layer as one
  program), data-parallel prediction and sensitivity table on 4 devices give what 1
  device gives (AdaQuant exactly: same keys and minibatches)."""
  result = last_json(run_module('tests.multi_device_check', env={
      'XLA_FLAGS': '--xla_force_host_platform_device_count=4'}))
  assert result['devices'] == 4
  assert result['layer_devices'] == ['cpu:0', 'cpu:1', 'cpu:2', 'cpu:3']  # layers spread
  assert result['rows'] == 37                     # padding to 4 devices removed again
  assert result['kernel_max_abs_diff'] < 1e-6
  # The same with each layer as one program (the GPU default).
  assert result['single_program_layer_devices'] == result['layer_devices']
  assert result['single_program_kernel_max_abs_diff'] < 1e-6
  assert result['logits_max_abs_diff'] < 1e-4
  assert result['fp_logits_max_abs_diff'] < 1e-4
  assert result['table_max_rel_diff'] < 1e-2


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def test_two_processes_share_the_layers_and_end_with_one_state():
  port = str(_free_port())
  procs = [run_module('tests.multi_process_check', str(i), port) for i in range(2)]
  results = [last_json(p) for p in procs]
  assert [r['process'] for r in results] == [0, 1]
  assert results[0]['owners'] == [0, 1, 0, 1, 0]          # layers dealt round-robin
  assert results[0]['kernels'] == results[1]['kernels']   # everyone has every layer
  # (reports travel as float32: JAX without x64)
  np.testing.assert_allclose(results[0]['mse_after'], results[1]['mse_after'], rtol=1e-6)
  # ... and it is what one process computes alone.
  model = ToyNet()
  x = np.asarray(jax.random.normal(jax.random.key(7), (24, 12, 12, 3)))
  qm = ptq_jax.quantize(model, random_variables(model, x), x, w_bits=4, a_bits=4,
                        first_last_bits=None, method='adaquant', mode='parallel',
                        adaquant=ptq_jax.AdaQuantConfig(iterations=15, batch_size=8),
                        key=jax.random.key(3), progress=False)
  for path, lq in qm.qstate.items():
    np.testing.assert_allclose(results[0]['kernels'][path], np.asarray(lq.kernel).ravel()[:8],
                               atol=1e-6)


def test_padded_batches_have_one_size_and_say_how_many_rows_are_real():
  x = np.arange(10 * 2, dtype=np.float64).reshape(10, 2)
  batches = list(distributed.padded_batches(x, 4, [jax.devices()[0]]))
  assert [b.shape for b, _ in batches] == [(4, 2)] * 3 and [n for _, n in batches] == [4, 4, 2]
  assert batches[0][0].dtype == np.float32 and np.all(batches[-1][0][2:] == 0)
  labels = list(distributed.padded_batches(np.arange(3), 8, [jax.devices()[0]], dtype=None))
  assert labels[0][0].dtype.kind == 'i' and labels[0][1] == 3


def test_single_process_helpers_and_errors():
  assert distributed.process_share(5) == [0, 1, 2, 3, 4]
  trees = [{'a': np.ones(2)}, {'a': np.zeros(2)}]
  assert distributed.allgather_owned(trees, [0, 0]) == trees
  with pytest.raises(ValueError, match='devices is empty'):
    distributed.local_devices([])
