"""Smoothing activation outliers (RangeConfig(smooth_alpha)) on MiniLM-L6.

  python benchmarks/smoothing.py
  python benchmarks/smoothing.py --bits=W4A8,W4A4 --alphas=none,0.5,0.8
  python benchmarks/smoothing.py --bits=W4A8,W4A4 --alphas=none,0.85 --methods=adaquant,block
  python benchmarks/smoothing.py --bits=W4A8 --weight_ranges=mse   # MSE weight ranges

MiniLM's sentence embeddings after baseline PTQ (calibrated min/max ranges, every layer
at the bit width), with and without SmoothQuant-style smoothing of its dense layers;
with ``--methods``, also after reconstruction from those ranges: layer-wise AdaQuant
(``adaquant``) or block-wise (``block``: each attention and MLP half of a transformer
layer fitted jointly), both parallel with the guard; ``block_learned`` and
``block_learned_seq``: block-wise with learned rounding, parallel or sequential.
``val_mean_cosine``: cosine to the FP32 embeddings on the probe's training sentences other
than the calibration ones (what a choice of alpha would use); ``mean_cosine`` and
``probe_accuracy_pct``: the held-out test sentences, as in results/external_models.md.
``--act_ranges`` / ``--weight_ranges`` choose the range initialisation (RangeConfig).
Rows merge into results/smoothing.{json,md} by (model, method, bits, alpha, ranges,
iterations, device).
"""

from __future__ import annotations

import sys
import time

import numpy as np
from absl import app, flags

from common import concurrency_fields, describe_device, length_buckets, merge_records, write_results
import ptq_jax
from ptq_jax.quant.quantizer import parse_option

FLAGS = flags.FLAGS
flags.DEFINE_list('bits', ['W8A8', 'W4A8', 'W4A4'], 'Bit widths.')
flags.DEFINE_list('alphas', ['none', '0.5', '0.8'], 'smooth_alpha values ("none": off).')
flags.DEFINE_integer('calib_size', 128, 'Calibration sentences.')
flags.DEFINE_integer('probe_train_size', 2000, 'Sentences the probe is trained on.')
flags.DEFINE_integer('probe_test_size', 1000, 'Held-out sentences the probe is scored on.')
flags.DEFINE_integer('seq_length', 80, 'Tokens per calibration sentence.')
flags.DEFINE_integer('seed', 0, 'Data splits.')
flags.DEFINE_list('methods', ['ptq'], 'ptq (ranges only), adaquant (layer-wise), block, '
                  'block_learned (block-wise, learned rounding), block_learned_seq (the same, '
                  'sequential).')
flags.DEFINE_integer('iterations', 500, 'Reconstruction iterations per layer or block.')
flags.DEFINE_enum('act_ranges', 'minmax', ['minmax', 'mse', 'percentile'],
                  'Activation range initialisation (RangeConfig.method).')
flags.DEFINE_enum('weight_ranges', 'minmax', ['minmax', 'mse', 'percentile'],
                  'Weight range initialisation (RangeConfig.weight_method).')
flags.DEFINE_integer('batch', 8, 'Reconstruction minibatch, in sentences.')
flags.DEFINE_string('out', 'results', 'Output directory.')

NAME = 'smoothing'
KEY_FIELDS = ('model', 'method', 'w_bits', 'a_bits', 'smooth_alpha', 'act_ranges',
              'weight_ranges', 'iterations', 'device')
# method: (unit, rounding, mode), None: ranges only.
METHODS = {'ptq': None, 'adaquant': ('layer', 'free', 'parallel'),
           'block': ('block', 'free', 'parallel'),
           'block_learned': ('block', 'learned', 'parallel'),
           'block_learned_seq': ('block', 'learned', 'sequential')}


def main(_):
  from sklearn.linear_model import LogisticRegression
  from ptq_jax.data.sentences import sentence_splits
  from ptq_jax.importers.minilm import load_minilm, tokenize
  command = 'python benchmarks/smoothing.py ' + ' '.join(sys.argv[1:])
  unknown = set(FLAGS.methods) - set(METHODS)
  if unknown:
    raise app.UsageError(f'Unknown methods {sorted(unknown)}; choose from {list(METHODS)}.')
  alphas = [None if a == 'none' else float(a) for a in FLAGS.alphas]
  model, variables = load_minilm()
  calib_s, train_s, test_s = sentence_splits(FLAGS.calib_size, FLAGS.probe_train_size,
                                             FLAGS.seed)
  calib = tokenize(calib_s.texts, FLAGS.seq_length)
  test_s = test_s.take(np.arange(min(FLAGS.probe_test_size, len(test_s))))
  # The probe-train split starts with the calibration sentences: validation is the rest.
  val_s = train_s.take(np.arange(len(calib), len(train_s)))
  buckets = lambda texts: length_buckets(texts, tokenize)
  train_x, val_x, test_x = buckets(train_s.texts), buckets(val_s.texts), buckets(test_s.texts)

  def embed(predict, x):
    """Embeddings in the sentences' order, each length bucket run at its own length."""
    parts = [(index, np.asarray(predict(tokens))) for index, tokens in x]
    out = np.zeros((sum(len(i) for i, _ in parts), parts[0][1].shape[-1]), np.float32)
    for index, e in parts:
      out[index] = e
    return out

  fp = lambda x: embed(lambda b: ptq_jax.predict_logits(model, variables, b, batch_size=250), x)
  fp_val, fp_test = fp(val_x), fp(test_x)
  probe = LogisticRegression(C=10.0, max_iter=2000).fit(fp(train_x), train_s.labels)
  cosine = lambda a, b: round(float(np.mean(np.sum(a * b, axis=1))), 4)
  ranges = lambda alpha: ptq_jax.RangeConfig(FLAGS.act_ranges, weight_method=FLAGS.weight_ranges,
                                             smooth_alpha=alpha)
  records = []
  for bits in FLAGS.bits:
    w_bits, a_bits = parse_option(bits)
    for alpha, method in [(a, m) for a in alphas for m in FLAGS.methods]:
      setting = METHODS[method]
      unit = None if setting is None else setting[0]
      reconstruction = {} if setting is None else dict(
          method='adaquant', mode=setting[2], adaquant=ptq_jax.AdaQuantConfig(
              iterations=FLAGS.iterations, batch_size=FLAGS.batch, unit=unit,
              rounding=setting[1]))
      start = time.time()
      qm = ptq_jax.quantize(model, variables, calib, w_bits=w_bits, a_bits=a_bits,
                            first_last_bits=None, ranges=ranges(alpha),
                            model_name='minilm_l6', progress=False, **reconstruction)
      seconds = time.time() - start
      predict = lambda x: qm.predict(x, batch_size=250)
      val, test = embed(predict, val_x), embed(predict, test_x)
      records.append({
          'model': 'minilm_l6', 'method': f'ptq_{FLAGS.act_ranges}' if unit is None else method,
          'w_bits': w_bits, 'a_bits': a_bits,
          'smooth_alpha': 'none' if alpha is None else alpha,
          'act_ranges': FLAGS.act_ranges, 'weight_ranges': FLAGS.weight_ranges,
          'iterations': 0 if unit is None else FLAGS.iterations, 'calib_size': len(calib),
          'val_mean_cosine': cosine(val, fp_val), 'mean_cosine': cosine(test, fp_test),
          'probe_accuracy_pct': round(100 * float(probe.score(test, test_s.labels)), 2),
          'seconds': round(seconds, 1), **concurrency_fields(), 'device': describe_device(),
          'command': command})
      print(records[-1], flush=True)
      rows = merge_records(FLAGS.out, NAME, records, KEY_FIELDS)
      for row in rows:   # (rows from before --methods: ranges only; before --*_ranges: min/max)
        row.setdefault('iterations', 0)
        row.setdefault('act_ranges', 'minmax')
        row.setdefault('weight_ranges', 'minmax')
      write_results(FLAGS.out, NAME, rows,
                    'Smoothing activation outliers: MiniLM-L6',
                    columns=['model', 'method', 'w_bits', 'a_bits', 'smooth_alpha',
                             'act_ranges', 'weight_ranges', 'iterations', 'calib_size',
                             'val_mean_cosine', 'mean_cosine', 'probe_accuracy_pct', 'seconds', 'concurrent_processes', 'device',
                             'command'],
                    notes='Every dense layer at the bit width (no 8-bit first/last). '
                          '`val_mean_cosine`: cosine to FP32 on the probe\'s training '
                          'sentences other than the calibration ones; `mean_cosine`, '
                          '`probe_accuracy_pct`: held-out test sentences. `seconds`: '
                          'calibration, smoothing and reconstruction. `adaquant` / `block`: '
                          'layer-wise / block-wise reconstruction from the calibrated ranges '
                          '(parallel, guard, minibatch of `--batch` sentences); '
                          '`block_learned`: block-wise with learned rounding; `_seq`: '
                          'sequential. `act_ranges` / `weight_ranges`: the range '
                          'initialisation of activations and weights. '
                          '`concurrent_processes`: that many benchmark processes shared the '
                          'CPU (not a solo timing).')


if __name__ == '__main__':
  app.run(main)
