"""Pieces shared by the benchmark scripts: data, first/last policies, results files and
the device every row names. Benchmarks import the library and this module only; run
them from the repository root as ``python benchmarks/NAME.py`` (this directory is then
on the import path)."""

from __future__ import annotations

import os
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from ptq_jax.data import loader
from ptq_jax.jobs.results import describe_device, read_results, write_results

__all__ = ['POLICIES', 'concurrency_fields', 'describe_device', 'fashion_mnist', 'held_out',
           'length_buckets', 'merge_records', 'new_rows_from', 'read_results',
           'write_adaquant_speed', 'write_results']

# First/last-layer policies: the paper's 8-bit, or every layer alike.
POLICIES = {'first_last_8bit': 8, 'all_layers_alike': None}


def fashion_mnist(test_limit: int = 0) -> Tuple[loader.ArraySplit, loader.ArraySplit, np.ndarray]:
  """Train split, test split (its first ``test_limit`` images if set) and the
  preprocessed test images."""
  train = loader.load_split('fashion_mnist', 'train')
  test = loader.load_split('fashion_mnist', 'test')
  if test_limit:
    test = loader.ArraySplit(test.images[:test_limit], test.labels[:test_limit])
  return train, test, loader.preprocess('fashion_mnist', test.images)


def held_out(train: loader.ArraySplit, used: np.ndarray, size: int, seed: int
             ) -> Tuple[np.ndarray, np.ndarray]:
  """``size`` preprocessed train images (and labels) outside the indices ``used`` (the
  calibration set), drawn reproducibly from ``seed``: the validation split defaults are
  chosen on, never the test split."""
  rest = np.setdiff1d(np.arange(len(train)), used)
  index = np.random.default_rng(seed).choice(rest, size, replace=False)
  return loader.preprocess('fashion_mnist', train.images[index]), train.labels[index]


def merge_records(out: str, name: str, records: List[Dict[str, Any]],
                  key_fields: Sequence[str]) -> List[Dict[str, Any]]:
  """Earlier rows of ``results/NAME.json`` that this run did not redo, then this run's."""
  key = lambda r: tuple(r.get(k) for k in key_fields)
  latest = {key(r): r for r in records}          # a key measured twice: the last row
  records = [r for r in records if latest[key(r)] is r]
  if not os.path.exists(os.path.join(out, f'{name}.json')):
    return records
  return [r for r in read_results(out, name) if key(r) not in latest] + records


def new_rows_from(dirs: Sequence[str], out: str, name: str) -> List[Dict[str, Any]]:
  """Rows of ``DIR/NAME.json`` (for each of ``dirs``) that ``out/NAME.json`` lacks.

  Collects what several benchmark processes wrote to separate output directories (e.g.
  concurrent lanes on one GPU) so the benchmark can merge them into ``out`` by its key;
  their commands lose the lane's --out and --cache_dir.
  """
  import json
  key = lambda r: json.dumps(r, sort_keys=True)
  have = ({key(r) for r in read_results(out, name)}
          if os.path.exists(os.path.join(out, f'{name}.json')) else set())
  rows, seen = [], set(have)
  for d in dirs:
    if not os.path.exists(os.path.join(d, f'{name}.json')):
      continue
    for r in read_results(d, name):
      if key(r) not in seen:
        seen.add(key(r))
        rows.append(dict(r, command=_portable(r['command'])) if 'command' in r else r)
  return rows


def _portable(command: str) -> str:
  """``command`` without the flags that only said where a lane wrote its files
  (``--out=``, ``--cache_dir=``), so it reruns as is from the repository root."""
  return ' '.join(t for t in command.split()
                  if not t.startswith(('--out=', '--cache_dir=')))


def concurrency_fields() -> Dict[str, int]:
  """{'concurrent_processes': N} when $PTQ_JAX_CONCURRENT_PROCESSES says N > 1 benchmark
  processes shared the device (their seconds are then not solo timings), else {}."""
  n = int(os.environ.get('PTQ_JAX_CONCURRENT_PROCESSES', '1'))
  return {'concurrent_processes': n} if n > 1 else {}


def length_buckets(texts, tokenize, lengths=(32, 48, 80)):
  """[(indices, packed tokens)] with each sentence in the shortest bucket that holds it
  (padding tokens change nothing but cost: most sentences need < 32 of the 80)."""
  full = tokenize(texts, max(lengths))
  needed = full[:, 1].sum(axis=1)
  buckets, done = [], np.zeros(len(texts), bool)
  for length in sorted(lengths):
    index = np.nonzero(~done & (needed <= length))[0]
    if len(index):
      buckets.append((index, full[index][:, :, :length]))
      done[index] = True
  return buckets


def write_adaquant_speed(out: str, name: str, records: List[Dict[str, Any]]) -> None:
  """Render results/NAME.json/.md of the AdaQuant step speed (``adaquant_speed.py`` and
  ``reference_adaquant.py`` write rows into the same file)."""
  # Rows of earlier versions divided by a PyTorch figure copied from notes, not measured
  # beside them: that column and its quotient are dropped, never shown as a speed-up.
  records = [{k: (' '.join(t for t in v.split() if not t.startswith('--reference_ms='))
                  if k == 'command' else v) for k, v in r.items()
              if k not in ('reference_ms_per_iteration', 'speedup_vs_reference')}
             for r in records]
  # Rows from before micro-batches existed ran every minibatch at once.
  records = [{**r, 'micro_batch': r.get('micro_batch', 'off')} for r in records]
  write_results(out, name, records, 'AdaQuant per-layer step speed',
                columns=['model', 'driver', 'micro_batch', 'w_bits', 'a_bits', 'minibatch',
                         'iterations', 'layers', 'ms_per_iteration',
                         'calibtip_ms_per_iteration', 'speedup_over_calibtip',
                         'rel_error_before', 'rel_error_after', 'device', 'command'],
                notes='One AdaQuant step = minibatch sampling, forward/backward through the '
                      'fake-quantized layer and four Adam updates. Timed after compilation, '
                      'less the time of a 0-iteration call (the error measured before the '
                      'steps); the guard\'s four error passes between the steps are '
                      'included, so a fast step reads higher here than in '
                      '`results/roofline.md`, which differences two iteration counts. '
                      '`calibtip_ms_per_iteration`: the '
                      'reference PyTorch implementation (CalibTIP\'s own `adaquant()` on its '
                      '`QConv2d`, CPU) on the same layer and data, timed alternately with '
                      'ptq_jax in the same process, each side the time of 4 + N steps less that of 4 '
                      '(`benchmarks/reference_adaquant.py`); '
                      'only such rows carry a ratio. `dwconv` rows: a depthwise 3x3 conv as '
                      'in MobileNetV2. `(all N layers)` rows: one step of every AdaQuant '
                      'layer of a model at W4A4 (first and last layer 8-bit), summed: the '
                      'cost of one iteration of the whole model. `micro_batch`: examples per '
                      'gradient pass inside a step (AdaQuantRuntime.micro_batch; auto: its '
                      'default choice per layer; off: the whole minibatch at once).')
