"""Transformers as people write them: activation matmuls quantized anywhere.

* MiniLM-L6 (the real ``all-MiniLM-L6-v2`` weights): its attention is its own two
  ``jnp.einsum`` per layer (12 matmul sites). Baseline PTQ (min/max ranges on
  ``--calib_size`` calibration sentences) at W8A8 and W4A8, with and without
  ``quantize_matmuls``; mean cosine of the sentence embeddings to FP32 on
  ``--eval_size`` held-out sentences (disjoint from calibration).
* The bundled NNX ViT (``nnx.MultiHeadAttention``: attention sites) beside the same
  weights computing attention with their own einsums (matmul sites): top-1 on the
  Fashion-MNIST test split (``--vit_eval_size`` images), W8A8 and W4A4 (first and last
  layer 8-bit) with ``quantize_matmuls``.

  python benchmarks/transformers.py
"""

from __future__ import annotations

import sys
import time
from typing import Any, Dict, List

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from common import concurrency_fields, describe_device, merge_records, write_results
import ptq_jax
from ptq_jax.bundled import resolve_checkpoint
from ptq_jax.evaluation import batched_predict
from ptq_jax.nnx_bridge import to_nnx
from ptq_jax.quant.attention import AttentionQuant

flags.DEFINE_list('models', ['minilm_l6', 'vit'], 'Which rows to (re)measure.')
flags.DEFINE_integer('calib_size', 128, 'MiniLM calibration sentences.')
flags.DEFINE_integer('eval_size', 1000, 'MiniLM held-out sentences.')
flags.DEFINE_integer('seq_length', 64, 'MiniLM tokens per sentence.')
flags.DEFINE_integer('vit_calib_size', 512, 'ViT calibration images (train split).')
flags.DEFINE_integer('vit_eval_size', 10000, 'ViT test images.')
flags.DEFINE_string('out', 'results', 'Output directory.')
FLAGS = flags.FLAGS
NAME = 'transformers'
COMMAND = ' '.join(['python benchmarks/transformers.py'] + sys.argv[1:])


class EinsumAttention(nnx.Module):
  """An ``nnx.MultiHeadAttention``'s projections with the attention written out as
  public code writes it: two einsums and a softmax, no attention module."""

  def __init__(self, attention: nnx.MultiHeadAttention):
    self.query, self.key, self.value = attention.query, attention.key, attention.value
    self.out = attention.out

  def __call__(self, x):
    q, k, v = self.query(x), self.key(x), self.value(x)        # (batch, length, heads, d)
    scores = jnp.einsum('bqhd,bkhd->bhqk', q / jnp.sqrt(q.shape[-1]).astype(q.dtype), k)
    mixed = jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(scores, axis=-1), v)
    return self.out(mixed)


def minilm_rows() -> List[Dict[str, Any]]:
  from ptq_jax.data.sentences import sentence_splits
  from ptq_jax.importers.minilm import load_minilm, tokenize
  model, variables = load_minilm()
  calib_s, _, test_s = sentence_splits(FLAGS.calib_size, FLAGS.calib_size, seed=0)
  calib = tokenize(calib_s.texts, FLAGS.seq_length)
  test = tokenize(test_s.texts[:FLAGS.eval_size], FLAGS.seq_length)
  fp32 = np.asarray(ptq_jax.predict_logits(model, variables, test, batch_size=100))
  rows = []
  for w_bits, a_bits in ((8, 8), (4, 8)):
    for matmuls in (False, True):
      start = time.time()
      qm = ptq_jax.quantize(model, variables, calib, w_bits=w_bits, a_bits=a_bits,
                            first_last_bits=None, quantize_matmuls=matmuls,
                            model_name='minilm_l6', progress=False)
      embeddings = np.asarray(qm.predict(test, batch_size=100))
      rows.append({'model': 'minilm_l6', 'attention': 'own einsums',
                   'method': 'baseline PTQ (min/max)', 'w_bits': w_bits, 'a_bits': a_bits,
                   'quantize_matmuls': matmuls, 'matmuls_quantized': matmuls_quantized(qm),
                   'calib_size': len(calib), 'eval_size': len(test),
                   'mean_cosine': round(float(np.mean(np.sum(embeddings * fp32, axis=1))), 4),
                   'seconds': round(time.time() - start, 1)})
      print(rows[-1], flush=True)
  return rows


def vit_rows() -> List[Dict[str, Any]]:
  model, variables, _ = ptq_jax.load_model(resolve_checkpoint('vit_fmnist_fashion_mnist'))
  calib = ptq_jax.calibration_set('fashion_mnist', n=FLAGS.vit_calib_size, seed=0)
  test = ptq_jax.load_split('fashion_mnist', 'test')
  images = ptq_jax.preprocess('fashion_mnist', test.images[:FLAGS.vit_eval_size])
  labels = test.labels[:FLAGS.vit_eval_size]
  rows = []
  for style in ('nnx.MultiHeadAttention', 'own einsums'):
    module = to_nnx(model, variables)
    if style == 'own einsums':
      for block in module.blocks:
        block.attn = EinsumAttention(block.attn)
    forward = nnx.jit(lambda m, x: m(x))
    fp32 = ptq_jax.top1_accuracy_pct(
        batched_predict(lambda x, m=module: forward(m, x), images, 500), labels)
    rows.append(_vit_row(style, 'FP32', 32, 32, 0, fp32, len(calib), len(images), 0.0))
    for w_bits, a_bits in ((8, 8), (4, 4)):
      start = time.time()
      qm = ptq_jax.quantize(module, calib=calib, w_bits=w_bits, a_bits=a_bits,
                            first_last_bits=8, quantize_matmuls=True, progress=False)
      top1 = ptq_jax.top1_accuracy_pct(qm.predict(images), labels)
      rows.append(_vit_row(style, 'baseline PTQ (min/max)', w_bits, a_bits,
                           matmuls_quantized(qm), top1, len(calib), len(images),
                           time.time() - start))
  return rows


def matmuls_quantized(qm) -> int:
  """Activation x activation matmuls computed quantized: two per attention site, one
  per matmul site."""
  return sum(2 if isinstance(q, AttentionQuant) else 1 for q in
             (qm.qstate[p] for p in qm.matmul_bits()))


def _vit_row(style, method, w_bits, a_bits, matmuls, top1, calib_size, eval_size, seconds):
  row = {'model': 'vit_fmnist', 'attention': style, 'method': method, 'w_bits': w_bits,
         'a_bits': a_bits, 'quantize_matmuls': method != 'FP32', 'matmuls_quantized': matmuls,
         'calib_size': calib_size, 'eval_size': eval_size, 'top1_pct': round(top1, 2),
         'seconds': round(seconds, 1)}
  print(row, flush=True)
  return row


def main(_):
  rows = []
  if 'minilm_l6' in FLAGS.models:
    rows += minilm_rows()
  if 'vit' in FLAGS.models:
    rows += vit_rows()
  fields = {'device': describe_device(), 'command': COMMAND, **concurrency_fields()}
  rows = [{**r, **fields} for r in rows]
  records = merge_records(FLAGS.out, NAME, rows, ('model', 'attention', 'method', 'w_bits',
                                                  'a_bits', 'quantize_matmuls', 'device'))
  write_results(FLAGS.out, NAME, records, 'Transformers as people write them',
                columns=['model', 'attention', 'method', 'w_bits', 'a_bits',
                         'quantize_matmuls', 'matmuls_quantized', 'calib_size', 'eval_size',
                         'mean_cosine', 'top1_pct', 'seconds', 'device', 'command'],
                notes='`matmuls_quantized`: activation x activation matmuls computed '
                      'quantized (two per `nnx.MultiHeadAttention` site; one per matmul site '
                      'found in the traced program). MiniLM-L6: the real all-MiniLM-L6-v2 '
                      'weights, every layer and (with `quantize_matmuls`) both attention '
                      'einsums of every layer quantized, no first/last exception; '
                      '`mean_cosine` of the embeddings to FP32 on held-out sentences. ViT: '
                      'the bundled NNX ViT, and the same weights with attention written as '
                      'two einsums; Fashion-MNIST test top-1, first and last layer 8-bit.')


if __name__ == '__main__':
  app.run(main)
