"""ImageNet top-1 and top-5 against human labels: torchvision's MobileNetV2 and
EfficientNet-Lite0 on the 1,000 labelled photos of ``imagenet_nips17``, quantized with
the paper's methods and the project's recipes, beside the published numbers (cited).

  python benchmarks/imagenet.py                       # every run, resumable
  python benchmarks/imagenet.py --runs=fp32,ptq --models=mobilenet_v2

Calibration never touches the evaluation photos: it uses ``--calib_size`` unlabelled
Debian photographs (``ptq_jax.data.photos``), each model's own preprocessing. A run
writes one row per stage (baseline PTQ, + AdaQuant, + BN tuning, + bias tuning) with
top-1/top-5 on the 1,000 photos, the difference from FP32 with a paired 95 % interval
(the same photos: mean of the per-photo difference in correctness, +- 1.96 standard
errors), the stage's seconds, the device and the command. Rows already in
``results/imagenet.json`` are kept and not rerun (``--redo`` reruns them).

Runs: ``fp32``; ``ptq`` (ranges only at W8A8, W4A8 and W4A4, first and last layer
8-bit); ``light`` (the paper's light pipeline at ``--light_bits``: ranges, then BN
tuning towards the FP32 network's statistics, kept only if it lowers the KL to FP32);
``mixed`` (light pipeline at 13 % of the FP32 size, options W8A8 / W4A4);
``parallel`` and ``sequential`` (the paper's layer-wise AdaQuant, the advanced pipeline
with BN and bias tuning, at W4A8 and W4A4; parallel computes AdaQuant at its bits and
8-bit only); ``advanced_mixed`` (the advanced pipeline at 13 % of the FP32 size from
the parallel W4A8 run's per-option states, W8A8 / W4A8); ``best`` (sequential,
block-wise, learned rounding, QDrop 0.5, stage guard, at W4A4). Bias tuning uses
``--bias_optimizer`` (default Adam). AdaQuant saves each finished layer or block in
``--cache_dir``, so a run killed part-way and started again resumes there. Each
reconstructing run also writes its layers' or blocks' errors before and after to
``results/imagenet_units.{json,md}``.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Dict, Iterator, List, Tuple

import jax
import numpy as np
from absl import app, flags

from common import concurrency_fields, describe_device, merge_records, read_results, write_results
import ptq_jax
from ptq_jax.data import loader, photos
from ptq_jax.evaluation import batched_predict
from ptq_jax.importers import efficientnet, torchvision_mobilenet
from ptq_jax.quant.quantizer import parse_option

flags.DEFINE_list('models', ['mobilenet_v2', 'efficientnet_lite0'], 'Models.')
flags.DEFINE_list('runs', ['fp32', 'ptq', 'light', 'mixed', 'parallel', 'advanced_mixed',
                           'sequential', 'best'],
                  'Runs.')
flags.DEFINE_list('bits', ['W8A8', 'W4A8', 'W4A4'], 'Fixed bit widths of the ptq run.')
flags.DEFINE_list('light_bits', ['W8A8'], 'Bit widths of the light run.')
flags.DEFINE_list('adaquant_bits', ['W4A8', 'W4A4'], 'Bit widths of the AdaQuant runs.')
flags.DEFINE_list('best_bits', ['W4A4'], 'Bit widths of the best-recipe run.')
flags.DEFINE_enum('act_ranges', 'minmax', ['minmax', 'mse'],
                  'Activation range initialisation of the ptq and AdaQuant runs (weights: '
                  'min/max).')
flags.DEFINE_integer('calib_size', 256, 'Unlabelled Debian photos for calibration.')
flags.DEFINE_integer('iterations', 1000, 'AdaQuant iterations per layer or block.')
flags.DEFINE_integer('batch_size', 32, 'AdaQuant batch size.')
flags.DEFINE_integer('bias_steps', 800, 'KD bias-tuning steps of the pipelines.')
flags.DEFINE_enum('bias_optimizer', 'adam', ['sgd', 'adam'],
                  "Bias tuning's optimiser ('sgd', the paper's lr 0.1, overshoots on these "
                  'networks: results/imagenet_ablation.md).')
flags.DEFINE_string('cache_dir', '~/.cache/ptq_jax/imagenet',
                    'Where AdaQuant saves each finished layer or block, so a killed run '
                    'resumes from there (empty: nothing saved).')
flags.DEFINE_bool('redo', False, 'Rerun rows already in the results file.')
flags.DEFINE_string('out', 'results', 'Directory for imagenet.json / imagenet.md.')
FLAGS = flags.FLAGS
NAME = 'imagenet'
COMMAND = ' '.join(['python benchmarks/imagenet.py'] + sys.argv[1:])
# AdaQuant rows are also keyed by their iterations (a longer run is a new row).
KEY = ('model', 'method', 'bits', 'stage', 'adaquant_iterations')
# The advanced mixed run's options: the parallel W4A8 run's states (its first and last
# layer at 8 bits), so the integer program picks 4- or 8-bit weights per layer.
MIXED_OPTIONS = ('W8A8', 'W4A8')

# Published full-validation-set numbers (50,000 images), cited (None: FP32 not cited).
CITED = [
    ('mobilenet_v2', 'AdaRound (MQBench reimplementation)', 'W4A4', 72.68, 65.74,
     'MQBench (Li et al., NeurIPS 2021 Datasets and Benchmarks)'),
    ('mobilenet_v2', 'BRECQ (MQBench reimplementation)', 'W4A4', 72.68, 67.23,
     'MQBench (Li et al., NeurIPS 2021 Datasets and Benchmarks)'),
    ('mobilenet_v2', 'QDrop (MQBench reimplementation)', 'W4A4', 72.68, 68.13,
     'MQBench (Li et al., NeurIPS 2021 Datasets and Benchmarks)'),
    ('mobilenet_v2', 'QDrop (its paper)', 'W4A4', None, 67.83, 'Wei et al., ICLR 2022'),
    ('mobilenet_v2', 'PD-Quant', 'W4A4', None, 68.33, 'Liu et al., CVPR 2023'),
    ('mobilenet_v2', 'MRECG', 'W4A4', None, 68.84, 'Ma et al., CVPR 2023'),
    ('efficientnet_lite0', 'TF Lite int8 post-training', 'W8A8', 75.1, 74.4,
     'TensorFlow Lite EfficientNet-Lite model card'),
]


def load_model(name: str) -> Tuple[Any, Any, Any]:
  """(model, variables, preprocess) of an imported ImageNet network."""
  if name == 'mobilenet_v2':
    return (*torchvision_mobilenet.load_mobilenet_v2(), torchvision_mobilenet.preprocess_images)
  if name == 'efficientnet_lite0':
    return (*efficientnet.load_efficientnet_lite0(), efficientnet.preprocess_images)
  raise ValueError(f'--models: {name!r} is not mobilenet_v2 or efficientnet_lite0.')


def scores(logits: np.ndarray, labels: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """Per-photo top-1 and top-5 correctness (0/1)."""
  top5 = np.argsort(-logits, axis=-1)[:, :5]
  return (top5[:, 0] == labels).astype(np.float64), (top5 == labels[:, None]).any(-1).astype(
      np.float64)


def paired_delta(correct: np.ndarray, fp32_correct: np.ndarray) -> Dict[str, float]:
  """Mean difference in correctness (pct points) and its paired 95 % interval."""
  d = 100 * (correct - fp32_correct)
  half = 1.96 * d.std(ddof=1) / np.sqrt(len(d))
  return {'delta_pct': round(float(d.mean()), 2),
          'delta_ci95_low_pct': round(float(d.mean() - half), 2),
          'delta_ci95_high_pct': round(float(d.mean() + half), 2)}


def pipelines(name: str, model, variables, calib) -> Iterator[Tuple[str, str, Any]]:
  """(method, bits, PipelineResult or QuantizedModel) of each requested run."""
  runs = FLAGS.runs
  states = {}   # the parallel runs' per-option AdaQuant states, reused by advanced_mixed
  ranges = ptq_jax.RangeConfig(method=FLAGS.act_ranges, weight_method='minmax')
  # Rows from non-default activation ranges name them (part of the row's key).
  named_ranges = ('' if FLAGS.act_ranges == 'minmax' else
                  f'{FLAGS.act_ranges.upper()} activation ranges')
  if 'ptq' in runs:
    for bits in FLAGS.bits:
      w, a = parse_option(bits)
      method = f'baseline PTQ ({named_ranges or "min/max"})'
      yield method, bits, lambda w=w, a=a: ptq_jax.quantize(
          model, variables, calib, w_bits=w, a_bits=a, first_last_bits=8, ranges=ranges,
          model_name=name, progress=False)
  if 'light' in runs:   # the paper's light pipeline at fixed bits: ranges, BN tuning
    for bits in FLAGS.light_bits:
      w, a = parse_option(bits)
      method = 'light: BN tuning to FP32, guard' + (named_ranges and f', {named_ranges}')
      yield method, bits, lambda w=w, a=a: ptq_jax.run_pipeline(
          model, variables, calib, 'light', w_bits=w, a_bits=a, first_last_bits=8,
          ranges=ranges, stage_guard=True, bn_target='fp', model_name=name, progress=False)
  if 'mixed' in runs:
    yield 'light, mixed precision', '13% size', lambda: ptq_jax.run_pipeline(
        model, variables, calib, 'light', size_pct=13, options=('W8A8', 'W4A4'),
        model_name=name, progress=False)
  config = lambda **kw: ptq_jax.AdaQuantConfig(iterations=FLAGS.iterations,
                                               batch_size=FLAGS.batch_size, **kw)
  for run, pipeline, bits_list, kwargs in (
      ('parallel', 'advanced', FLAGS.adaquant_bits, {}),
      ('sequential', 'sequential', FLAGS.adaquant_bits, {}),
      ('best', 'sequential', FLAGS.best_bits,
       dict(unit='block', rounding='learned', drop_prob=0.5))):
    if run not in runs:
      continue
    for bits in bits_list:
      w, a = parse_option(bits)
      label = {'parallel': 'AdaQuant parallel (paper), advanced',
               'sequential': 'AdaQuant sequential (paper), BN + bias tuning',
               'best': 'block-wise learned rounding, QDrop, guards'}[run]
      label += named_ranges and f', {named_ranges}'
      def fixed(w=w, a=a, bits=bits, run=run, pipeline=pipeline, kwargs=kwargs):
        # A parallel run whose bits an earlier one computed (its 8-bit first/last states:
        # W8A8) reuses those states: the same AdaQuant, not run twice.
        prior = next((m for m in states.values() if run == 'parallel'
                      and {(w, a), (8, 8)} <= set(m.option_states)), None)
        result = ptq_jax.run_pipeline(
            model, variables, calib, pipeline, w_bits=w, a_bits=a, first_last_bits=8,
            ranges=ranges, adaquant=config(**kwargs), stage_guard=run == 'best',
            bn_target='fp', bias_steps=FLAGS.bias_steps, bias_optimizer=FLAGS.bias_optimizer,
            model_name=name, progress=False, cache_dir=cache_dir(),
            options=(bits,), mixed=prior)   # parallel: AdaQuant at these bits (and 8) only
        if run == 'parallel' and prior is None:
          states[bits] = result.mixed
        return result
      yield label, bits, fixed
  if 'advanced_mixed' in runs:   # the paper's advanced pipeline at 13 % of the FP32 size
    yield (f'AdaQuant parallel (paper), advanced, mixed {"/".join(MIXED_OPTIONS)}'
           + (named_ranges and f', {named_ranges}'), '13% size',
           lambda: ptq_jax.run_pipeline(
               model, variables, calib, 'advanced', size_pct=13, options=MIXED_OPTIONS,
               mixed=states.get('W4A8'), ranges=ranges, adaquant=config(), bn_target='fp',
               bias_steps=FLAGS.bias_steps, bias_optimizer=FLAGS.bias_optimizer,
               model_name=name, progress=False, cache_dir=cache_dir()))


def cache_dir():
  return os.path.expanduser(FLAGS.cache_dir) if FLAGS.cache_dir else None


def stage_models(result: Any) -> List[Tuple[str, Any, float]]:
  """(stage, quantized model, seconds) of a pipeline result or a single model."""
  if isinstance(result, ptq_jax.QuantizedModel):
    return [('ranges', result, sum(result.timings.values()))]
  return [(s.name, s.model, s.seconds) for s in result.stages]


def row(name, method, bits, stage, logits, labels, fp32, seconds, calib_size) -> Dict[str, Any]:
  top1, top5 = scores(logits, labels)
  out = {'model': name, 'method': method, 'bits': bits, 'stage': stage,
         'calib_size': calib_size, 'calib_data': 'Debian photos (unlabelled)',
         'eval_data': 'imagenet_nips17 (1,000 labelled photos)',
         'top1_pct': round(100 * top1.mean(), 2), 'top5_pct': round(100 * top5.mean(), 2)}
  if fp32 is not None:
    out.update(paired_delta(top1, fp32))
  return dict(out, seconds=round(seconds, 1), device=describe_device(), command=COMMAND,
              **concurrency_fields())


def reconstructs(method: str) -> bool:
  return method.startswith(('AdaQuant', 'block-wise'))


def done(records: List[Dict[str, Any]], name: str, method: str, bits: str) -> bool:
  iterations = FLAGS.iterations if reconstructs(method) else None
  return not FLAGS.redo and any(r['model'] == name and r['method'] == method
                                and r['bits'] == bits
                                and r.get('adaquant_iterations') == iterations
                                for r in records)


def main(_):
  path = os.path.join(FLAGS.out, f'{NAME}.json')
  records = [r for r in (read_results(FLAGS.out, NAME) if os.path.exists(path) else [])
             if not str(r['method']).startswith('cited')]
  evaluation = loader.load_split('imagenet_nips17', 'test')
  calib_photos, _ = photos.photo_splits(FLAGS.calib_size, seed=0)
  for name in FLAGS.models:
    model, variables, preprocess = load_model(name)
    images, calib = preprocess(evaluation.images), preprocess(photos.load_photos(calib_photos))
    start = time.time()
    fp32_logits = np.asarray(batched_predict(jax.jit(lambda x: model.apply(variables, x)),
                                             images, 50))
    fp32_top1 = scores(fp32_logits, evaluation.labels)[0]
    new = []
    if 'fp32' in FLAGS.runs and not done(records, name, 'FP32', '32/32'):
      new.append(row(name, 'FP32', '32/32', 'float', fp32_logits, evaluation.labels, None,
                     time.time() - start, 0))
    for method, bits, run in pipelines(name, model, variables, calib):
      if done(records, name, method, bits):
        continue
      for stage, qm, seconds in stage_models(run()):
        if stage == 'adaquant' and qm.layer_reports:
          write_units(name, method, bits, qm.layer_reports)
        logits = np.asarray(qm.predict(images, batch_size=50))
        new.append(row(name, method, bits, stage, logits, evaluation.labels, fp32_top1,
                       seconds, FLAGS.calib_size))
        if reconstructs(method):
          new[-1].update(adaquant_iterations=FLAGS.iterations, bias_steps=FLAGS.bias_steps,
                         bias_optimizer=FLAGS.bias_optimizer)
        print({k: v for k, v in new[-1].items() if k not in ('command', 'device')}, flush=True)
      records = merge_records(FLAGS.out, NAME, records + new, KEY)
      write(records)
      new = []
    records = merge_records(FLAGS.out, NAME, records + new, KEY)
    write(records)


def write_units(name: str, method: str, bits: str, reports: List[Any]) -> None:
  """``results/imagenet_units.{json,md}``: each reconstructed layer's or block's error
  before and after AdaQuant (where a target is missed, which units keep the error)."""
  rows = [{'model': name, 'method': method, 'bits': bits, 'unit': r.unit, 'path': r.path,
           'w_bits': r.w_bits, 'a_bits': r.a_bits, 'calib_size': FLAGS.calib_size,
           'adaquant_iterations': FLAGS.iterations,
           'rel_error_before': float(f'{r.rel_error_before:.4g}'),
           'rel_error_after': float(f'{r.rel_error_after:.4g}'),
           'kept_iteration': r.kept_iteration, 'seconds': round(r.seconds, 1),
           'device': describe_device(), 'command': COMMAND} for r in reports]
  write_results(FLAGS.out, f'{NAME}_units', merge_records(
      FLAGS.out, f'{NAME}_units', rows,
      ('model', 'method', 'bits', 'path', 'w_bits', 'adaquant_iterations')),
      'ImageNet networks: reconstruction error of each layer or block',
      notes='Each layer (or block) AdaQuant optimised in a `benchmarks/imagenet.py` run: '
            'its relative reconstruction error (squared error over the float target\'s '
            'energy, on the calibration photos) before and after, and the iteration the '
            'guard kept (0: the start); the first and last layer at 8 bits. Made by '
            '`python benchmarks/imagenet.py`.')


def write(records: List[Dict[str, Any]]) -> None:
  cited = [{'model': m, 'method': f'cited: {method}', 'bits': bits, 'stage': 'published',
            'eval_data': 'ImageNet validation (50,000)', 'fp32_top1_pct': fp32,
            'top1_pct': top1, 'delta_pct': None if fp32 is None else round(top1 - fp32, 2),
            'source': source,
            'device': 'n/a (cited)', 'command': 'cited'} for m, method, bits, fp32, top1, source
           in CITED]
  measured = [r for r in records if not str(r['method']).startswith('cited')]
  write_results(FLAGS.out, NAME, measured + cited,
                'ImageNet top-1 against labels (1,000 photos of the NIPS 2017 dev set)',
                notes='Each measured row: top-1/top-5 of the quantized model after the stage '
                      'named, on the 1,000 labelled photos of `imagenet_nips17` (torchvision '
                      'view: short side 256, centre crop 224), calibrated on unlabelled Debian '
                      'photos that are not among them; delta: difference from FP32 on the '
                      'same photos with a paired 95 % interval. The photos are easier than '
                      'the ImageNet validation set (FP32 scores higher here), so compare '
                      'drops, not top-1, with the cited rows (ImageNet validation, 50,000 '
                      f'images, numbers as published). Made by `{COMMAND}`.')


if __name__ == '__main__':
  app.run(main)
