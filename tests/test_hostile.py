"""Hostile and careless input, table-driven: the public API, the command line and every
file reader. Each case must end in a clear error (the library's own error type, or a
TypeError/ValueError whose message names the problem; on the command line a non-zero
exit with one line and no traceback) or in the correct result: never a silent wrong
result, never a raw error from deep inside, never a blow-up of memory for a small
file (those cases run in a child process under a memory limit).

``python -m tests.test_hostile`` (from the repository root) prints the outcome of every case and the counts by
outcome, without pytest (the closing note of the hardening issue quotes them).
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import json
import os
import struct
import subprocess
import sys
import tempfile
import textwrap
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ptq_jax
from ptq_jax.quant.export import export_integer, load_integer
from ptq_jax import checkpoint as ckpt
from ptq_jax.data.idx import read_idx
from ptq_jax.data.loader import sample_indices
from ptq_jax.evaluation import batched_predict
from ptq_jax.importers.mapping import LayoutRule
from ptq_jax.quant.quantizer import parse_option
from ptq_jax.stages import allocation as alloc
from ptq_jax.stages.bn_tuning import bn_tune
from ptq_jax.stages.sensitivity import SensitivityTable
from tests.test_quant import ToyNet, random_variables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED = os.path.join(ROOT, 'ptq_jax', 'checkpoints', 'resnet20_fashion_mnist.msgpack')
MEMORY_LIMIT_MB = 1500   # a child reading a small hostile file must stay below this


@dataclasses.dataclass
class Context:
  """What the cases work on, built once: a toy model, its calibration images, a
  quantized model saved to disk, a mixed-precision cache and a scratch directory."""
  model: Any
  variables: Any
  x: np.ndarray
  tmp: str
  qmodel_path: str
  cache_dir: str
  integer_path: str

  def file(self, name: str, data: bytes) -> str:
    path = os.path.join(self.tmp, name)
    with open(path, 'wb') as f:
      f.write(data)
    return path


def make_context(tmp: str) -> Context:
  model = ToyNet()
  x = jax.random.normal(jax.random.key(7), (16, 12, 12, 3))
  variables = random_variables(model, x)
  x = np.asarray(x)
  qm = ptq_jax.quantize(model, variables, x, w_bits=4, a_bits=8, first_last_bits=None,
                        progress=False)
  qmodel_path = os.path.join(tmp, 'q.msgpack')
  qm.save(qmodel_path)
  integer_path = os.path.join(tmp, 'int.msgpack')
  export_integer(qm, integer_path)
  cache_dir = os.path.join(tmp, 'cache')
  ptq_jax.mixed_precision(model, variables, x, options=('W8A8',), cache_dir=cache_dir,
                          progress=False)
  return Context(model, variables, x, tmp, qmodel_path, cache_dir, integer_path)


# --- outcomes ------------------------------------------------------------------------
CLEAR, CORRECT, RAW, SILENT, MEMORY = ('clear error', 'correct result', 'raw traceback',
                                       'silent wrong result', 'memory blow-up')


@dataclasses.dataclass
class Case:
  """``run(ctx)`` and what must happen: ``error`` (an exception type) with ``words`` in
  its message, ``warning`` likewise, or ``check(result)`` true for a correct result."""
  area: str
  name: str
  run: Callable[[Context], Any]
  error: Any = None
  words: str = ''
  warning: Any = None
  check: Callable[[Any], bool] = None


def outcome(case: Case, ctx: Context) -> Tuple[str, str]:
  """(outcome, detail) of one case."""
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    try:
      result = case.run(ctx)
    except MemoryError as e:
      return MEMORY, repr(e)
    except Exception as e:  # pylint: disable=broad-except
      if case.error is not None and isinstance(e, case.error) and case.words in str(e):
        return CLEAR, f'{type(e).__name__}: {str(e)[:160]}'
      return RAW, f'{type(e).__name__}: {str(e)[:300]}'
  if isinstance(result, tuple) and result and result[0] in (CLEAR, RAW, SILENT, MEMORY):
    return result   # a child process or the command line judged itself
  if case.warning is not None:
    hit = [w for w in caught if issubclass(w.category, case.warning)
           and case.words in str(w.message)]
    return (CLEAR, str(hit[0].message)[:160]) if hit else (SILENT, 'no warning')
  if case.error is not None:
    return SILENT, f'no error; returned {str(result)[:160]}'
  return (CORRECT, '') if case.check(result) else (SILENT, f'wrong result {str(result)[:160]}')


# --- helpers that damage files -------------------------------------------------------
def rewrite(path: str, out: str, change: Callable[[Dict, Dict], None]) -> str:
  """A copy of checkpoint ``path`` with ``change(tree, meta)`` applied, re-saved with a
  valid checksum: what a loader's own checks (not the checksum) must catch."""
  tree, meta = ckpt.load_checkpoint(path)
  tree = jax.tree.map(lambda a: a if isinstance(a, str) else np.array(a), tree)
  change(tree, meta)
  write_checkpoint(out, tree, meta)
  return out


def write_checkpoint(path: str, tree: Any, meta: Dict) -> None:
  """What save_checkpoint writes, with a valid checksum, but metadata that may hold
  NaN (which save_checkpoint itself refuses to write)."""
  import hashlib
  from flax import serialization
  body = serialization.msgpack_serialize({'metadata': json.dumps(meta), 'variables': tree})
  with open(path, 'wb') as f:
    f.write(serialization.msgpack_serialize(
        {'format': ckpt.FORMAT, 'version': ckpt.VERSION,
         'sha256': hashlib.sha256(body).hexdigest(), 'body': body}))


def flip_bit(ctx: Context, path: str, name: str, at: float = 0.6) -> str:
  data = bytearray(open(path, 'rb').read())
  data[int(len(data) * at)] ^= 0x10
  return ctx.file(name, bytes(data))


def raw_payload(ctx: Context, name: str, payload: Dict) -> str:
  from flax import serialization
  return ctx.file(name, serialization.msgpack_serialize(payload))


def v2_body(ctx: Context, name: str, body: Any) -> str:
  """A checkpoint whose checksum is right but whose body is ``body``."""
  import hashlib
  from flax import serialization
  data = body if isinstance(body, bytes) else serialization.msgpack_serialize(body)
  return raw_payload(ctx, name, {'format': ckpt.FORMAT, 'version': ckpt.VERSION,
                                 'sha256': hashlib.sha256(data).hexdigest(), 'body': data})


def bundled_with(ctx: Context, name: str, change) -> str:
  return rewrite(BUNDLED, os.path.join(ctx.tmp, name), change)


def qmodel_with(ctx: Context, name: str, change) -> str:
  return rewrite(ctx.qmodel_path, os.path.join(ctx.tmp, name), change)


def first_layer(tree):
  return tree['qstate'][sorted(tree['qstate'])[0]]


def set_bits(bits):
  def change(tree, meta):
    first = sorted(meta['bits'])[0]
    meta['bits'][first] = bits
  return change


def cache_file(ctx: Context) -> str:
  names = [n for n in os.listdir(ctx.cache_dir) if n.endswith('.msgpack')]
  return os.path.join(ctx.cache_dir, names[0])


def with_damaged_cache(ctx: Context, damage: Callable[[str], None]) -> Any:
  """Runs mixed_precision against a copy of the cache with one file damaged."""
  import shutil
  copy = tempfile.mkdtemp(dir=ctx.tmp)
  shutil.copytree(ctx.cache_dir, copy, dirs_exist_ok=True)
  damage(os.path.join(copy, os.path.basename(cache_file(ctx))))
  return ptq_jax.mixed_precision(ctx.model, ctx.variables, ctx.x, options=('W8A8',),
                                 cache_dir=copy, progress=False)


def flip_in_place(path: str) -> None:
  data = bytearray(open(path, 'rb').read())
  data[len(data) // 2] ^= 0x01
  open(path, 'wb').write(bytes(data))


def rewrite_in_place(change) -> Callable[[str], None]:
  return lambda path: rewrite(path, path, change)


def integer_with(ctx: Context, name: str, change) -> str:
  return rewrite(ctx.integer_path, os.path.join(ctx.tmp, name), change)


def first_record(tree):
  return tree[sorted(tree)[0]]


def idx_bytes(shape, dtype_code=0x08, payload=None) -> bytes:
  header = bytes([0, 0, dtype_code, len(shape)]) + b''.join(struct.pack('>I', d) for d in shape)
  return header + (payload if payload is not None else bytes(int(np.prod(shape))))


def safetensors_bytes(header: Any, data: bytes = b'', length: int = None) -> bytes:
  text = header if isinstance(header, bytes) else json.dumps(header).encode()
  return struct.pack('<Q', len(text) if length is None else length) + text + data


def in_child(code: str) -> Tuple[str, str]:
  """Runs ``code`` (which prints OK or REFUSED <message>) in a child process whose
  address space is capped: a blow-up shows as a MemoryError or a killed child."""
  prelude = textwrap.dedent(f'''
      import resource
      resource.setrlimit(resource.RLIMIT_AS, ({MEMORY_LIMIT_MB} * 2**20,) * 2)
      ''')
  proc = subprocess.run([sys.executable, '-c', prelude + textwrap.dedent(code)],
                        capture_output=True, text=True, timeout=300, cwd=ROOT)
  out = proc.stdout.strip().splitlines()
  if proc.returncode != 0 and 'MemoryError' in proc.stderr or proc.returncode < 0:
    return MEMORY, proc.stderr[-300:]
  if out and out[-1].startswith('REFUSED'):
    return CLEAR, out[-1]
  if out and out[-1].startswith('OK'):
    return SILENT, out[-1]
  return RAW, proc.stderr[-300:]


def idx_in_child(path: str) -> Tuple[str, str]:
  return in_child(f'''
      from ptq_jax.data.idx import read_idx, IdxFormatError
      try:
        a = read_idx({path!r})
        print('OK', a.shape)
      except IdxFormatError as e:
        print('REFUSED', e)
      ''')


def safetensors_in_child(path: str) -> Tuple[str, str]:
  return in_child(f'''
      from ptq_jax.importers.safetensors_reader import read_safetensors
      try:
        a = read_safetensors({path!r})
        print('OK', {{k: v.shape for k, v in a.items()}})
      except ValueError as e:
        print('REFUSED', e)
      ''')


def gzip_bomb(ctx: Context) -> str:
  """A 2 MB .gz IDX file of 16 images that inflates to 2 GiB (gzip members of zeros,
  concatenated): read whole, it would not fit the child's memory limit."""
  path = os.path.join(ctx.tmp, 'bomb-idx.gz')
  zeros = gzip.compress(bytes(16 * 2**20), compresslevel=9)
  with open(path, 'wb') as f:
    f.write(gzip.compress(idx_bytes((16, 28, 28))))
    for _ in range(128):
      f.write(zeros)
  return path


TABLE = SensitivityTable(('a', 'b'), ((8, 8), (4, 4)), np.ones((2, 2)), np.ones((2, 2)), 0.0,
                         (100, 10), (1000, 50))
CE = ckpt.CheckpointError


def api(name, run, error=None, words='', **kw) -> Case:
  return Case('API', name, run, error, words, **kw)


def files(name, run, error=None, words='', **kw) -> Case:
  return Case('files', name, run, error, words, **kw)


def q(c: Context, **kw):
  return ptq_jax.quantize(c.model, c.variables, c.x, progress=False, **kw)


def nan_x(c: Context) -> np.ndarray:
  x = c.x.copy()
  x[3, 0, 0, 0] = np.nan
  return x


CASES: List[Case] = [
    # Arguments of the public API.
    api('overrides not a dict of dicts', lambda c: q(c, overrides={'Conv_0': 4}), TypeError,
        "overrides['Conv_0']"),
    api('overrides a list', lambda c: q(c, overrides=[1]), TypeError, 'overrides must be a dict'),
    api('overrides an unknown layer', lambda c: q(c, overrides={'Nope_9': {'w_bits': 4}}),
        ValueError, 'Nope_9'),
    api('key an int', lambda c: q(c, key=0), TypeError, 'jax.random.key'),
    api('key a raw uint32 key', lambda c: q(c, key=jax.random.PRNGKey(0)), TypeError,
        'jax.random.key'),
    api('w_bits 16', lambda c: q(c, w_bits=16), ValueError, 'w_bits'),
    api('w_bits 1', lambda c: q(c, w_bits=1), ValueError, 'w_bits'),
    api('w_bits a string', lambda c: q(c, w_bits='4'), ValueError, 'w_bits'),
    api('a_bits a float', lambda c: q(c, a_bits=4.0), ValueError, 'a_bits'),
    api('first_last_bits 99', lambda c: q(c, first_last_bits=99), ValueError, 'first_last_bits'),
    api('method unknown', lambda c: q(c, method='magic'), ValueError, 'magic'),
    api('mode unknown', lambda c: q(c, method='adaquant', mode='diagonal'), ValueError,
        'diagonal'),
    api('range method unknown', lambda c: ptq_jax.RangeConfig('median'), ValueError, 'median'),
    api('calibration set empty', lambda c: q(c, calib=None) if False else ptq_jax.quantize(
        c.model, c.variables, c.x[:0], progress=False), ValueError, 'empty'),
    api('calibration images uint8', lambda c: ptq_jax.quantize(
        c.model, c.variables, (c.x * 50).astype(np.uint8), progress=False), ValueError,
        'preprocessed floats'),
    api('calibration image NaN', lambda c: ptq_jax.quantize(
        c.model, c.variables, nan_x(c), progress=False), ValueError, 'NaN or Inf'),
    api('calibration images of the wrong shape', lambda c: ptq_jax.quantize(
        c.model, c.variables, c.x[:, :, :, :2], progress=False), ValueError, 'shape'),
    api('calibration one image without batch axis', lambda c: ptq_jax.quantize(
        c.model, c.variables, c.x[0], progress=False), ValueError, 'shape'),
    api('variables of another model', lambda c: ptq_jax.quantize(
        c.model, {'params': {}}, c.x, progress=False), ValueError, 'variables'),
    api('pipeline key an int', lambda c: ptq_jax.run_pipeline(
        c.model, c.variables, c.x, 'light', key=0), TypeError, 'jax.random.key'),
    api('pipeline unknown', lambda c: ptq_jax.run_pipeline(
        c.model, c.variables, c.x, 'turbo'), ValueError, 'turbo'),
    api('pipeline size_pct negative', lambda c: ptq_jax.run_pipeline(
        c.model, c.variables, c.x, 'light', size_pct=-5), ValueError, 'size_pct'),
    api('bias_steps a float', lambda c: ptq_jax.run_pipeline(
        c.model, c.variables, c.x, bias_steps=2.5), TypeError, 'bias_steps'),
    api('option a bare int', lambda c: parse_option(4), ValueError, '(w_bits, a_bits) pair'),
    api('option of one', lambda c: parse_option((4,)), ValueError, '(w_bits, a_bits) pair'),
    api('option W9A9', lambda c: parse_option('W9A9'), ValueError, 'w_bits=9'),
    api('option name garbage', lambda c: parse_option('four bits'), ValueError, 'four bits'),
    api('mixed options empty', lambda c: ptq_jax.mixed_precision(
        c.model, c.variables, c.x, options=(), progress=False), ValueError, 'at least one'),
    api('mixed method unknown', lambda c: ptq_jax.mixed_precision(
        c.model, c.variables, c.x, method='exhaustive', progress=False), ValueError,
        'exhaustive'),
    api('size_pct a string', lambda c: alloc.budgets_from_pct(TABLE, size_pct='13'), TypeError,
        'size_pct'),
    api('size_pct NaN', lambda c: alloc.budgets_from_pct(TABLE, size_pct=float('nan')),
        ValueError, 'size_pct'),
    api('budget negative', lambda c: alloc.allocate(TABLE, size_bits=-1), ValueError,
        'size_bits'),
    api('budget below every option', lambda c: alloc.allocate(TABLE, size_bits=10),
        ptq_jax.InfeasibleBudgetError, 'smallest feasible'),
    api('seed negative', lambda c: sample_indices(100, 10, -1), ValueError, 'seed'),
    api('calibration size a float', lambda c: sample_indices(100, 10.5, 0), TypeError,
        'calibration set size'),
    api('calibration size zero', lambda c: sample_indices(100, 0, 0), ValueError,
        'at least one'),
    api('calibration larger than the split', lambda c: sample_indices(100, 101, 0), ValueError,
        'Cannot draw'),
    api('calibration from the test split', lambda c: ptq_jax.calibration_set(
        'fashion_mnist', 10, split='test'), ValueError, 'train split'),
    api('labels out of range', lambda c: ptq_jax.mixed_precision(
        c.model, c.variables, c.x, options=('W8A8',), labels=np.full(len(c.x), 99),
        progress=False), ValueError, 'class 99'),
    api('labels negative', lambda c: ptq_jax.mixed_precision(
        c.model, c.variables, c.x, options=('W8A8',), labels=np.full(len(c.x), -1),
        progress=False), ValueError, '>= 0'),
    api('labels as floats', lambda c: ptq_jax.mixed_precision(
        c.model, c.variables, c.x, options=('W8A8',), labels=np.zeros(len(c.x)),
        progress=False), ValueError, 'integer class indices'),
    api('labels too few', lambda c: ptq_jax.mixed_precision(
        c.model, c.variables, c.x, options=('W8A8',), labels=np.zeros(3, np.int32),
        progress=False), ValueError, 'one per'),
    api('AdaQuant rate NaN', lambda c: ptq_jax.AdaQuantConfig(lr_kernel=float('nan')),
        ValueError, 'lr_kernel'),
    api('AdaQuant rate infinite', lambda c: ptq_jax.AdaQuantConfig(lr_a_quant=float('inf')),
        ValueError, 'lr_a_quant'),
    api('AdaQuant batch 0', lambda c: ptq_jax.AdaQuantConfig(batch_size=0), ValueError,
        'batch_size'),
    api('AdaQuant iterations negative', lambda c: ptq_jax.AdaQuantConfig(iterations=-1),
        ValueError, 'iterations'),
    api('AdaQuant iterations a float', lambda c: ptq_jax.AdaQuantConfig(iterations=1.5),
        ValueError, 'iterations must be an integer'),
    api('predict on no images', lambda c: batched_predict(lambda x: x, c.x[:0]), ValueError,
        'empty'),
    api('layout rule unknown', lambda c: LayoutRule('nchw_upside_down'), ValueError,
        'nchw_upside_down'),
    api('BN tuning on 4 images warns', lambda c: bn_tune(
        ptq_jax.stages.prepare(c.model, c.variables, c.x[:4], progress=False),
        _layers_and_state(c)[1]),
        warning=UserWarning, words='BN tuning on 4 calibration image'),
    # Files the project writes and reads back.
    files('checkpoint missing', lambda c: ckpt.load_model(os.path.join(c.tmp, 'none.msgpack')),
          CE, 'does not exist'),
    files('checkpoint path a directory', lambda c: ckpt.load_model(c.tmp), CE, 'does not exist'),
    files('checkpoint path not a path', lambda c: ckpt.load_checkpoint(123), TypeError, 'path'),
    files('checkpoint empty', lambda c: ckpt.load_model(c.file('empty.msgpack', b'')), CE,
          'corrupt'),
    files('checkpoint garbage', lambda c: ckpt.load_model(c.file('g.msgpack', b'\xc1' * 99)), CE,
          'corrupt'),
    files('checkpoint truncated', lambda c: ckpt.load_model(
        c.file('t.msgpack', open(BUNDLED, 'rb').read()[:5000])), CE, 'corrupt'),
    files('checkpoint one bit flipped', lambda c: ckpt.load_model(
        flip_bit(c, BUNDLED, 'flip.msgpack')), CE, 'checksum'),
    files('checkpoint another msgpack', lambda c: ckpt.load_model(
        raw_payload(c, 'foreign.msgpack', {'params': {'w': np.zeros(3)}})), CE,
          'not a ptq_jax checkpoint'),
    files('checkpoint version 99', lambda c: ckpt.load_model(raw_payload(
        c, 'v99.msgpack', {'format': ckpt.FORMAT, 'version': 99})), CE, 'version 99'),
    files('checkpoint version 1 (no checksum)', lambda c: ckpt.load_model(raw_payload(
        c, 'v1.msgpack', {'format': ckpt.FORMAT, 'version': 1, 'metadata': '{}',
                          'variables': {}})), CE, 'upgrade_checkpoint'),
    files('checkpoint checksum field missing', lambda c: ckpt.load_model(raw_payload(
        c, 'nosum.msgpack', {'format': ckpt.FORMAT, 'version': ckpt.VERSION, 'body': b'x'})),
          CE, 'checksum'),
    files('checkpoint body not msgpack', lambda c: ckpt.load_model(
        v2_body(c, 'body.msgpack', b'\xc1\xc1')), CE, 'corrupt'),
    files('checkpoint metadata not JSON', lambda c: ckpt.load_model(v2_body(
        c, 'meta.msgpack', {'metadata': '{oops', 'variables': {}})), CE, 'malformed'),
    files('checkpoint metadata a list', lambda c: ckpt.load_model(v2_body(
        c, 'metalist.msgpack', {'metadata': '[1, 2]', 'variables': {}})), CE, 'malformed'),
    files('checkpoint without variables', lambda c: ckpt.load_model(v2_body(
        c, 'novars.msgpack', {'metadata': '{}'})), CE, 'malformed'),
    files('checkpoint model name an int', lambda c: ckpt.load_model(v2_body(
        c, 'name.msgpack', {'metadata': '{"model": 5}', 'variables': {}})), CE, 'must be a name'),
    files('checkpoint model_kwargs a list', lambda c: ckpt.load_model(bundled_with(
        c, 'kw.msgpack', lambda t, m: m.update(model_kwargs=[1]))), CE, 'model_kwargs'),
    files('checkpoint model_kwargs unknown', lambda c: ckpt.load_model(bundled_with(
        c, 'kw2.msgpack', lambda t, m: m.update(model_kwargs={'depth': 'deep'}))), CE,
          'cannot be built'),
    files('checkpoint unknown model', lambda c: ckpt.load_model(bundled_with(
        c, 'vgg.msgpack', lambda t, m: m.update(model='vgg99'))), CE, 'Unknown model'),
    files('checkpoint names no model', lambda c: ckpt.load_model(bundled_with(
        c, 'anon.msgpack', lambda t, m: m.pop('model'))), CE, 'does not name its model'),
    files('checkpoint kernel NaN', lambda c: ckpt.load_model(bundled_with(
        c, 'nan.msgpack', lambda t, m: t['params']['head']['kernel'].__setitem__(
            (0, 0), np.nan))), CE, 'NaN'),
    files('checkpoint kernel int8', lambda c: ckpt.load_model(bundled_with(
        c, 'int8.msgpack', lambda t, m: t['params']['head'].__setitem__(
            'kernel', t['params']['head']['kernel'].astype(np.int8)))), CE, 'dtype int8'),
    files('checkpoint kernel bool', lambda c: ckpt.load_model(bundled_with(
        c, 'bool.msgpack', lambda t, m: t['params']['head'].__setitem__(
            'kernel', t['params']['head']['kernel'] > 0))), CE, 'dtype bool'),
    files('checkpoint BN variance negative', lambda c: ckpt.load_model(bundled_with(
        c, 'var.msgpack', lambda t, m: t['batch_stats']['bn_init']['var'].__setitem__(
            0, -1.0))), CE, 'variance'),
    files('checkpoint kernel of the wrong shape', lambda c: ckpt.load_model(bundled_with(
        c, 'shape.msgpack', lambda t, m: t['params']['head'].__setitem__(
            'kernel', np.zeros((64, 7), np.float32)))), CE, 'head/kernel has shape'),
    files('checkpoint leaf missing', lambda c: ckpt.load_model(bundled_with(
        c, 'leaf.msgpack', lambda t, m: t['params']['head'].pop('bias'))), CE, 'missing'),
    files('checkpoint round trip', lambda c: _round_trip(c), check=bool),
    files('quantized model saved to a directory', lambda c: q(c, w_bits=8, a_bits=8).save(c.tmp),
          ValueError, 'is a directory'),
    files('quantized model saved under a file', lambda c: q(c, w_bits=8, a_bits=8).save(
        os.path.join(c.file('plain.txt', b'x'), 'q.msgpack')), ValueError, 'which is a file'),
    files('mixed-precision cache dir is a file', lambda c: ptq_jax.mixed_precision(
        c.model, c.variables, c.x, options=('W8A8',), cache_dir=c.file('cache_is_a_file', b'x'),
        progress=False), ValueError, 'is a file, not a directory'),
    files('quantized model one bit flipped', lambda c: ptq_jax.QuantizedModel.load(
        flip_bit(c, c.qmodel_path, 'qflip.msgpack'), c.model), CE, 'checksum'),
    files('quantized model is a float checkpoint', lambda c: ptq_jax.QuantizedModel.load(
        BUNDLED, c.model), CE, 'not a quantized model'),
    files('quantized model bits 0', lambda c: ptq_jax.QuantizedModel.load(qmodel_with(
        c, 'b0.msgpack', set_bits([0, 8])), c.model), CE, 'w_bits=0'),
    files('quantized model bits 1', lambda c: ptq_jax.QuantizedModel.load(qmodel_with(
        c, 'b1.msgpack', set_bits([4, 1])), c.model), CE, 'a_bits=1'),
    files('quantized model bits 16', lambda c: ptq_jax.QuantizedModel.load(qmodel_with(
        c, 'b16.msgpack', set_bits([16, 8])), c.model), CE, 'w_bits=16'),
    files('quantized model bits a string', lambda c: ptq_jax.QuantizedModel.load(qmodel_with(
        c, 'bs.msgpack', set_bits('48')), c.model), CE, 'not supported'),
    files('quantized model bits a triple', lambda c: ptq_jax.QuantizedModel.load(qmodel_with(
        c, 'b3.msgpack', set_bits([4, 4, 4])), c.model), CE, 'pair'),
    files('quantized model kernel of the wrong shape', lambda c: ptq_jax.QuantizedModel.load(
        qmodel_with(c, 'ks.msgpack', lambda t, m: first_layer(t).__setitem__(
            'kernel', np.zeros((1, 1, 1, 1), np.float32))), c.model), CE, 'kernel is float32'),
    files('quantized model range NaN', lambda c: ptq_jax.QuantizedModel.load(qmodel_with(
        c, 'rn.msgpack', lambda t, m: first_layer(t)['w_quant']['range'].__setitem__(
            0, np.nan)), c.model), CE, 'NaN'),
    files('quantized model range negative', lambda c: ptq_jax.QuantizedModel.load(qmodel_with(
        c, 'rneg.msgpack', lambda t, m: first_layer(t)['a_quant'].__setitem__(
            'range', np.float32(-2))), c.model), CE, 'negative'),
    files('quantized model weight quantizer missing', lambda c: ptq_jax.QuantizedModel.load(
        qmodel_with(c, 'wq.msgpack', lambda t, m: first_layer(t).pop('w_quant')), c.model), CE,
          'w_quant is missing'),
    files('quantized model kernel int', lambda c: ptq_jax.QuantizedModel.load(qmodel_with(
        c, 'kint.msgpack', lambda t, m: first_layer(t).__setitem__(
            'kernel', first_layer(t)['kernel'].astype(np.int32))), c.model), CE, 'kernel is int32'),
    files('quantized model layer missing', lambda c: ptq_jax.QuantizedModel.load(qmodel_with(
        c, 'lm.msgpack', lambda t, m: t['qstate'].pop(sorted(t['qstate'])[0])), c.model), CE,
          'do not match'),
    files('quantized model input_shape negative', lambda c: ptq_jax.QuantizedModel.load(
        qmodel_with(c, 'is.msgpack', lambda t, m: m.update(input_shape=[-1, 12, 3])), c.model),
          CE, 'malformed'),
    files('quantized model for another module', lambda c: ptq_jax.QuantizedModel.load(
        c.qmodel_path, ptq_jax.load_model(BUNDLED)[0]), CE, 'another model'),
    files('quantized model round trip', lambda c: _quantized_round_trip(c), check=bool),
    files('mixed cache one bit flipped', lambda c: with_damaged_cache(c, flip_in_place), CE,
          'checksum'),
    files('mixed cache table NaN', lambda c: with_damaged_cache(c, rewrite_in_place(
        lambda t, m: m['table']['delta'][0].__setitem__(0, float('nan')))), CE, 'non-finite'),
    files('mixed cache state NaN', lambda c: with_damaged_cache(c, rewrite_in_place(
        lambda t, m: t['W8A8'][sorted(t['W8A8'])[0]]['kernel'].__setitem__(
            (0, 0, 0, 0), np.inf))), CE, 'NaN or infinite'),
    files('mixed cache for other options', lambda c: with_damaged_cache(c, rewrite_in_place(
        lambda t, m: t.__setitem__('W4A4', t.pop('W8A8')))), CE, 'not a mixed-precision cache'),
    files('mixed cache table without delta', lambda c: with_damaged_cache(c, rewrite_in_place(
        lambda t, m: m['table'].pop('delta'))), CE, 'malformed sensitivity table'),
    files('mixed cache hit is exact', lambda c: _cache_hit(c), check=bool),
    files('mixed cache misses when the code changes', lambda c: _cache_follows_code(c),
          check=bool),
    files('integer export w_bits 9', lambda c: load_integer(integer_with(
        c, 'i9.msgpack', lambda t, m: first_record(t).__setitem__('w_bits', np.int64(9)))), CE,
          'w_bits=9'),
    files('integer export codes short', lambda c: load_integer(integer_with(
        c, 'ic.msgpack', lambda t, m: first_record(t).__setitem__(
            'w_codes', first_record(t)['w_codes'][:3]))), CE, 'w_codes'),
    files('integer export scale 0', lambda c: load_integer(integer_with(
        c, 'is0.msgpack', lambda t, m: first_record(t)['w_scale'].__setitem__(0, 0.0))), CE,
          'positive'),
    files('integer export kind unknown', lambda c: load_integer(integer_with(
        c, 'ik.msgpack', lambda t, m: first_record(t).__setitem__('kind', 'lstm'))), CE,
          'lstm'),
    files('integer export field missing', lambda c: load_integer(integer_with(
        c, 'if.msgpack', lambda t, m: first_record(t).pop('a_scale'))), CE, 'fields'),
    files('integer export a float checkpoint', lambda c: load_integer(BUNDLED), CE,
          'not an integer export'),
    files('IDX bad magic', lambda c: read_idx(c.file('m.idx', b'\x01\x02\x03\x04' * 4)),
          ValueError, 'magic'),
    files('IDX empty', lambda c: read_idx(c.file('e.idx', b'')), ValueError, 'magic'),
    files('IDX truncated header', lambda c: read_idx(c.file('h.idx', idx_bytes((2, 3))[:7])),
          ValueError, 'truncated'),
    files('IDX data too long', lambda c: read_idx(c.file('long.idx', idx_bytes((2, 3)) + b'x')),
          ValueError, 'more than'),
    files('IDX round trip', lambda c: read_idx(c.file('ok.idx', idx_bytes(
        (2, 3), payload=bytes(range(6))))).tolist() == [[0, 1, 2], [3, 4, 5]], check=bool),
    files('IDX size mismatch', lambda c: read_idx(c.file('s.idx', idx_bytes((2, 3))[:-1])),
          ValueError, 'corrupt'),
    files('IDX gzip garbage', lambda c: read_idx(c.file('g.idx.gz', b'\x1f\x8b garbage')),
          ValueError, 'Cannot read'),
    files('IDX gzip inflating to 2 GiB', lambda c: idx_in_child(gzip_bomb(c))),
    files('IDX header declaring 4 GiB, tiny file', lambda c: idx_in_child(
        c.file('huge.idx', idx_bytes((65536, 256, 256), payload=b'')))),
    files('safetensors empty', lambda c: ptq_jax.read_safetensors(c.file('e.st', b'')),
          ValueError, 'not a valid safetensors'),
    files('safetensors header not JSON', lambda c: ptq_jax.read_safetensors(
        c.file('j.st', safetensors_bytes(b'{oops'))), ValueError, 'not a valid safetensors'),
    files('safetensors offsets past the end', lambda c: ptq_jax.read_safetensors(c.file(
        'o.st', safetensors_bytes({'w': {'dtype': 'F32', 'shape': [4], 'data_offsets': [0, 16]}},
                                  bytes(4)))), ValueError, 'not a valid safetensors'),
    files('safetensors dtype unknown', lambda c: ptq_jax.read_safetensors(c.file(
        'd.st', safetensors_bytes({'w': {'dtype': 'Q7', 'shape': [1], 'data_offsets': [0, 4]}},
                                  bytes(4)))), ValueError, 'not a valid safetensors'),
    files('safetensors header length 2^60', lambda c: safetensors_in_child(c.file(
        'l.st', safetensors_bytes({}, length=2**60)))),
    files('safetensors shape 2^20 x 2^20 on 4 bytes', lambda c: safetensors_in_child(c.file(
        'big.st', safetensors_bytes({'w': {'dtype': 'F32', 'shape': [2**20, 2**20],
                                           'data_offsets': [0, 4]}}, bytes(4))))),
    files('torch file empty', lambda c: ptq_jax.read_torch_checkpoint(c.file('e.pt', b'')),
          ValueError, ''),
    files('torch file a zip without data.pkl', lambda c: ptq_jax.read_torch_checkpoint(
        _zip(c, 'nopkl.pt', {'archive/version': b'3'})), ValueError, 'data.pkl'),
    files('torch pickle calling os.system', lambda c: _torch_pickle_runs_nothing(c),
          ValueError, 'refusing to load'),
    files('torch pickle calling builtins.eval', lambda c: ptq_jax.read_torch_checkpoint(
        _zip(c, 'eval.pt', {'archive/data.pkl': b"cbuiltins\neval\n(S'1+1'\ntR."})), ValueError,
          'refusing to load'),
]


def _zip(c: Context, name: str, members: Dict[str, bytes]) -> str:
  path = os.path.join(c.tmp, name)
  with zipfile.ZipFile(path, 'w') as z:
    for member, data in members.items():
      z.writestr(member, data)
  return path


def _torch_pickle_runs_nothing(c: Context) -> Any:
  marker = os.path.join(c.tmp, 'pwned')
  pickle = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()
  try:
    return ptq_jax.read_torch_checkpoint(_zip(c, 'sys.pt', {'archive/data.pkl': pickle}))
  finally:
    assert not os.path.exists(marker), 'the pickle ran code'


def _layers_and_state(c: Context):
  qm = ptq_jax.quantize(c.model, c.variables, c.x, w_bits=8, a_bits=8, first_last_bits=None,
                        progress=False)
  return qm.layers, qm.qstate


def _round_trip(c: Context) -> bool:
  model, variables, _ = ckpt.load_model(BUNDLED)
  path = os.path.join(c.tmp, 'rt.msgpack')
  ckpt.save_checkpoint(path, variables, {'model': 'resnet20'})
  _, again, _ = ckpt.load_model(path)
  return all(jax.tree.leaves(jax.tree.map(np.array_equal, variables, again)))


def _quantized_round_trip(c: Context) -> bool:
  qm = ptq_jax.QuantizedModel.load(c.qmodel_path, c.model)
  fresh = q(c, w_bits=4, a_bits=8, first_last_bits=None)
  return bool(np.array_equal(qm.apply(c.x), fresh.apply(c.x)))


def _cache_hit(c: Context) -> bool:
  mp = ptq_jax.mixed_precision(c.model, c.variables, c.x, options=('W8A8',),
                               cache_dir=c.cache_dir, progress=False)
  return mp.from_cache


class _ToyNetSwish(ToyNet):
  """ToyNet with the same weights but another activation in its code path."""

  def __call__(self, x, train: bool = False):
    return super().__call__(jnp.tanh(x), train)


def _cache_follows_code(c: Context) -> bool:
  mp = ptq_jax.mixed_precision(_ToyNetSwish(), c.variables, c.x, options=('W8A8',),
                               cache_dir=c.cache_dir, progress=False)
  return not mp.from_cache


# --- the command line ----------------------------------------------------------------
def _write(path: str, text: str) -> str:
  with open(path, 'w') as f:
    f.write(text)
  return path


CLI_CASES = [  # (name, flags given a scratch dir, what the one line must say)
    ('unknown config key', lambda t: ['--config.no_such_key=1'], "names 'no_such_key'"),
    ('unknown nested key', lambda t: ['--config.data.no_key=3'], "names 'no_key'"),
    ('config file missing', lambda t: [f'--config={t}/missing.py'],
     'could not be read (No such file'),
    ('config file a directory', lambda t: [f'--config={t}'], 'could not be read (Is a directory'),
    ('config file syntax error', lambda t: [f'--config={_write(t + "/syntax.py", "def get_config(:")}'],
     'syntax error'),
    ('config file without get_config', lambda t: [f'--config={_write(t + "/empty.py", "x = 1")}'],
     'no get_config() function'),
    ('get_config raises', lambda t: [
        f'--config={_write(t + "/raises.py", "def get_config():  raise RuntimeError(1)")}'],
     'RuntimeError'),
    ('override not a number', lambda t: ['--config.quant.w_bits=abc'], 'invalid literal'),
    ('unknown flag', lambda t: ['--no_such_flag'], "Unknown command line flag 'no_such_flag'"),
    ('workdir a file', lambda t: [f'--workdir={_write(t + "/a_file", "")}'],
     'is a file, not a directory'),
    ('workdir under a file', lambda t: [f'--workdir={_write(t + "/b_file", "")}/sub'],
     'which is a file'),
    ('cache dir a file', lambda t: [f'--config.quant.cache_dir={_write(t + "/c_file", "")}'],
     'config.quant.cache_dir'),
    ('eval_limit negative', lambda t: ['--config.eval_limit=-5'], 'eval_limit'),
    ('config seed negative', lambda t: ['--config.seed=-1'], 'seed'),
    ('calib_size zero', lambda t: ['--config.calib_size=0'], 'calib'),
    ('config w_bits 16', lambda t: ['--config.quant.w_bits=16'], 'w_bits'),
    ('checkpoint a directory', lambda t: [f'--config.checkpoint={t}'], 'checkpoint'),
    ('dataset unknown', lambda t: ['--config.data.dataset=cifar99'], 'cifar99'),
    ('config pipeline unknown', lambda t: ['--config.pipelines=("turbo",)'], 'turbo'),
    ('config AdaQuant unit unknown', lambda t: ['--config.quant.unit=blocks'], "'blocks'"),
    ('config bias optimizer unknown', lambda t: ['--config.quant.bias_optimizer=adamw'],
     "config.quant.bias_optimizer='adamw' is not one of"),
    ('job unknown', lambda t: ['--config.job=fly'], 'fly'),
]


def run_cli(args: List[str], timeout: float = 600) -> Any:
  """The finished process, or None if it was still running after ``timeout`` seconds
  (it took the input and started the work instead of refusing it)."""
  try:
    return subprocess.run([sys.executable, os.path.join(ROOT, 'run.py'), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=timeout)
  except subprocess.TimeoutExpired:
    return None


def cli_outcome(proc: Any, words: str, workdir: str) -> Tuple[str, str]:
  if proc is None:
    return SILENT, 'still working: the input was taken'
  lines = proc.stderr.strip().splitlines()
  if proc.returncode == 0:
    return SILENT, 'exit status 0'
  if 'Traceback' in proc.stderr or len(lines) != 1:
    return RAW, proc.stderr[-600:]
  if not (lines[0].startswith('run.py: error: ') and words in lines[0]):
    return RAW, lines[0]
  if os.path.exists(workdir) and os.listdir(workdir):
    return SILENT, f'wrote {os.listdir(workdir)} before failing'
  return CLEAR, lines[0]


def run_cli_cases(tmp: str, timeout: float = 600) -> Dict[str, Tuple[str, str]]:
  """Every command-line case, two at a time (each is a fresh interpreter)."""
  def one(case):
    name, args, words = case
    scratch = tempfile.mkdtemp(dir=tmp)
    argv = args(scratch)
    workdir = os.path.join(scratch, 'w')
    if not any(a.startswith('--workdir=') for a in argv):
      argv.append(f'--workdir={workdir}')
    return name, cli_outcome(run_cli(argv, timeout), words, workdir)
  with ThreadPoolExecutor(max_workers=2) as pool:
    return dict(pool.map(one, CLI_CASES))


# --- pytest ----------------------------------------------------------------------------
@pytest.fixture(scope='module')
def ctx(tmp_path_factory):
  return make_context(str(tmp_path_factory.mktemp('hostile')))


@pytest.fixture(scope='module')
def cli_results(tmp_path_factory):
  return run_cli_cases(str(tmp_path_factory.mktemp('cli')))


def test_there_are_at_least_a_hundred_cases():
  assert len(CASES) + len(CLI_CASES) >= 100
  names = [c.name for c in CASES] + [c[0] for c in CLI_CASES]
  assert len(names) == len(set(names))


@pytest.mark.parametrize('case', CASES, ids=[c.name for c in CASES])
def test_case(ctx, case):
  result, detail = outcome(case, ctx)
  assert result in (CLEAR, CORRECT), f'{result}: {detail}'


@pytest.mark.parametrize('name', [c[0] for c in CLI_CASES])
def test_command_line_case(cli_results, name):
  result, detail = cli_results[name]
  assert result == CLEAR, f'{result}: {detail}'


def main() -> None:
  """Every case's outcome and the counts by area and outcome (a command line still
  running after 60 s took its bad input: counted as silent)."""
  with tempfile.TemporaryDirectory() as tmp:
    c = make_context(tmp)
    rows = [(case.area, case.name, *outcome(case, c)) for case in CASES]
    rows += [('command line', name, *result)
             for name, result in run_cli_cases(tmp, timeout=60).items()]
  for area, name, result, detail in rows:
    print(f'{area:13s} {name:48s} {result:20s} {detail[:100]}')
  counts = collections.Counter((area, result) for area, _, result, _ in rows)
  print(json.dumps({f'{a} / {r}': n for (a, r), n in sorted(counts.items())}, indent=1))
  print(json.dumps(collections.Counter(r for _, _, r, _ in rows), indent=1))


if __name__ == '__main__':
  main()
