"""The deployable JAX artifact of each bundled model: size, agreement with the simulation
it came from, accuracy and latency beside FP32, all measured in one run.

  python benchmarks/export.py          # writes results/export.json and results/export.md
  python benchmarks/export.py --models=resnet20_fashion_mnist,mobilenet_v2_fmnist_fashion_mnist,\
vit_fmnist_fashion_mnist,efficientnet_lite0,minilm_l6     # with the models trained elsewhere
  python benchmarks/export.py --format=onnx --out_name=export_onnx --models=...   # ONNX

For each bundled model (ResNet-20, MobileNetV2, the NNX ViT with its attention matmuls
quantized) at W8A8, W4A8, W4A4 (first and last layer 8-bit) and mixed precision at 13 %
of the FP32 weight size (light: calibrated ranges, options W8A8 / W4A4): the program
``ptq_jax.export`` writes, its bytes against the FP32 parameters', top-1 agreement and
the largest logit difference with the simulation (``QuantizedModel.apply``) on the
10,000 test images, and the milliseconds per batch of 1 and 64 of three jitted
programs on the same runtime, timed in turn: JAX FP32, the simulation, the artifact.
The models not trained here: EfficientNet-Lite0 (ImageNet weights; calibrated on 64
photos, compared on the other photos) and MiniLM-L6 (calibrated on 256 sentences,
compared on 1,000 others by the cosine of the artifact's and the simulation's
embeddings), at W8A8 and W4A8.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import jax
import numpy as np
import onnxruntime as ort
from absl import app, flags

from common import describe_device, write_results
import ptq_jax
from ptq_jax.deploy.onnx_artifact import float_onnx_model
from ptq_jax.evaluation import batched_predict, top1_accuracy_pct
from ptq_jax.data import loader

flags.DEFINE_string('out', 'results', 'Directory for export.json / export.md.')
flags.DEFINE_list('models', ['resnet20_fashion_mnist', 'mobilenet_v2_fmnist_fashion_mnist',
                             'vit_fmnist_fashion_mnist'], 'Bundled checkpoints.')
flags.DEFINE_integer('calib_size', 1000, 'Calibration images (train split).')
flags.DEFINE_integer('repeats', 20, 'Timed calls per program and batch (median kept).')
flags.DEFINE_string('out_name', 'export', 'Results file name (NAME.json / NAME.md).')
flags.DEFINE_enum('format', 'jax', ['jax', 'onnx'], 'Which artifact: the jax.export program '
                  '(timed beside JAX FP32 and the simulation) or the ONNX QDQ model (timed '
                  'in ONNX Runtime beside the FP32 model written the same way).')
FLAGS = flags.FLAGS
COMMAND = ' '.join(['python benchmarks/export.py'] + sys.argv[1:])
RUNS = (('W8A8', dict(w_bits=8, a_bits=8)), ('W4A8', dict(w_bits=4, a_bits=8)),
        ('W4A4', dict(w_bits=4, a_bits=4)), ('mixed 13%', None))


def median_ms(fn, x, repeats: int) -> float:
  jax.block_until_ready(fn(x))   # compiled and warm
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(x))
    times.append(time.perf_counter() - start)
  return 1000 * float(np.median(times))


def quantized_models(model, variables, calib, name: str, runs):
  attention = name.startswith('vit')   # (MiniLM computes attention with its own einsums)
  # ONNX: symmetric weights, the scheme ONNX Runtime's int8 kernels take.
  ranges = ptq_jax.RangeConfig(weight_symmetric=FLAGS.format == 'onnx')
  for label, bits in runs:
    if bits is None:
      if attention:   # mixed precision does not budget attention matmuls
        continue
      mp = ptq_jax.mixed_precision(model, variables, calib, options=('W8A8', 'W4A4'),
                                   ranges=ranges, model_name=name, progress=False)
      yield label, mp.quantize(size_pct=13)[0]
    else:
      yield label, ptq_jax.quantize(model, variables, calib, first_last_bits=8,
                                    quantize_matmuls=attention, model_name=name,
                                    ranges=ranges, progress=False, **bits)


def fashion_mnist_task(checkpoint: str):
  """(name, model, variables, calib, eval inputs, labels, runs) of a bundled model."""
  test = loader.load_split('fashion_mnist', 'test')
  calib = ptq_jax.calibration_set('fashion_mnist', n=FLAGS.calib_size, seed=0)
  model, variables, meta = ptq_jax.load_model(ptq_jax.bundled_checkpoints()[checkpoint])
  return (meta['model'], model, variables, calib, loader.preprocess('fashion_mnist', test.images),
          test.labels, RUNS)


def efficientnet_task():
  from ptq_jax.data import photos
  from ptq_jax.importers.efficientnet import load_efficientnet_lite0, preprocess_images
  model, variables = load_efficientnet_lite0()
  calib_photos, eval_photos = photos.photo_splits(64, 0)
  return ('efficientnet_lite0', model, variables,
          preprocess_images(photos.load_photos(calib_photos)),
          preprocess_images(photos.load_photos(eval_photos)), None, RUNS[:2])


def minilm_task():
  from ptq_jax.data.sentences import sentence_splits
  from ptq_jax.importers.minilm import load_minilm, tokenize
  model, variables = load_minilm()
  calib_s, _, test_s = sentence_splits(256, 1000, 0)
  return ('minilm_l6', model, variables, tokenize(calib_s.texts, 64),
          tokenize(test_s.texts[:1000], 64), None, RUNS[:2])


TASKS = {'efficientnet_lite0': efficientnet_task, 'minilm_l6': minilm_task}


def agreement(sim: np.ndarray, out: np.ndarray, fp32: np.ndarray, name: str) -> dict:
  """Top-1 agreement (classifiers) or mean cosine (the sentence encoder) of the artifact
  with the simulation, of each with FP32, and the largest output difference."""
  row = {'max_abs_output_delta': float(np.abs(sim - out).max())}
  if name.startswith('minilm'):
    cos = lambda a, b: round(float(np.mean(np.sum(a * b, -1) / (
        np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)))), 6)
    return dict(row, mean_cosine_with_simulation=cos(sim, out),
                simulation_mean_cosine_with_fp32=cos(sim, fp32),
                artifact_mean_cosine_with_fp32=cos(out, fp32))
  agree = lambda a, b: round(100 * float(np.mean(a.argmax(-1) == b.argmax(-1))), 3)
  return dict(row, top1_agreement_with_simulation_pct=agree(sim, out),
              simulation_top1_agreement_with_fp32_pct=agree(sim, fp32),
              artifact_top1_agreement_with_fp32_pct=agree(out, fp32))


def measure(name, model, variables, qm, label, images, labels, tmp) -> dict:
  start = time.time()
  report = ptq_jax.export(qm, os.path.join(tmp, f'{name}_{label}.jaxexport'))
  export_seconds = time.time() - start
  artifact = jax.jit(ptq_jax.load_exported(report.path).exported.call)
  fp32 = jax.jit(lambda x: model.apply(variables, x))
  sim = np.asarray(qm.predict(images, batch_size=100))
  out = np.asarray(batched_predict(artifact, images, 100))
  fp32_out = np.asarray(batched_predict(fp32, images, 100))
  row = {'model': name, 'method': 'jax artifact', 'bits': label,
         'w_bits': qm.settings['w_bits'] or 'mixed', 'a_bits': qm.settings['a_bits'] or 'mixed',
         'calib_size': qm.settings['calib_size'],
         'quantize_matmuls': bool(qm.matmul_bits()), 'artifact_bytes': report.bytes,
         'fp32_param_bytes': report.fp32_param_bytes,
         'size_ratio_to_fp32': round(report.size_ratio, 4),
         'integer_layers': len(report.integer_layers), 'float_layers': len(report.float_layers),
         'integer_attention_sites': len(report.integer_attention),
         **agreement(sim, out, fp32_out, name), 'eval_inputs': len(images),
         'export_seconds': round(export_seconds, 1)}
  if labels is not None:
    row.update(top1_pct=round(top1_accuracy_pct(out, labels), 2),
               simulation_top1_pct=round(top1_accuracy_pct(sim, labels), 2),
               fp32_top1_pct=round(top1_accuracy_pct(fp32_out, labels), 2))
  for batch in (1, 64):
    x = np.resize(images, (batch,) + images.shape[1:])
    times = {'fp32': median_ms(fp32, x, FLAGS.repeats),
             'simulation': median_ms(qm.apply, x, FLAGS.repeats),
             'artifact': median_ms(artifact, x, FLAGS.repeats)}
    row.update({f'{k}_ms_batch{batch}': round(v, 3) for k, v in times.items()})
    row[f'artifact_speedup_over_fp32_batch{batch}'] = round(times['fp32'] / times['artifact'], 2)
    row[f'artifact_speedup_over_simulation_batch{batch}'] = round(
        times['simulation'] / times['artifact'], 2)
  return dict(row, device=describe_device(), command=COMMAND)


def median_ort_ms(session, x, repeats: int) -> float:
  run = lambda: session.run(None, {'input': x})
  run()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return 1000 * float(np.median(times))


def measure_onnx(name, model, variables, qm, label, images, labels, tmp, fp32_session) -> dict:
  """The ONNX QDQ row: size, the operators ONNX Runtime runs, agreement with the
  simulation, and ONNX Runtime latency beside the FP32 model written the same way."""
  float_bias_sim = np.asarray(qm.predict(images, batch_size=100))
  qm = qm.with_integer_biases()   # what the integer kernels hold (README, "Deploy")
  start = time.time()
  report = ptq_jax.export(qm, os.path.join(tmp, f'{name}_{label}.onnx'), format='onnx')
  export_seconds = time.time() - start
  artifact = ptq_jax.load_exported(report.path)
  meta = artifact.meta
  sim = np.asarray(qm.predict(images, batch_size=100))
  run = lambda session: (lambda x: session.run(None, {'input': np.asarray(x)})[0])
  out = np.asarray(batched_predict(run(artifact.session), images, 100))
  fp32_out = np.asarray(batched_predict(run(fp32_session), images, 100))
  row = {'model': name, 'method': 'onnx qdq', 'runtime': f'onnxruntime {ort.__version__} CPU',
         'weights': 'symmetric' if qm.settings.get('weight_symmetric') else 'asymmetric',
         'bits': label, 'w_bits': qm.settings['w_bits'] or 'mixed',
         'a_bits': qm.settings['a_bits'] or 'mixed', 'calib_size': qm.settings['calib_size'],
         'quantize_matmuls': bool(qm.matmul_bits()), 'artifact_bytes': report.bytes,
         'fp32_param_bytes': report.fp32_param_bytes,
         'size_ratio_to_fp32': round(report.size_ratio, 4),
         'onnxruntime_integer_ops': ' '.join(f'{k}:{v}' for k, v in
                                             meta['onnxruntime_integer_ops'].items()),
         'onnxruntime_float_ops': ' '.join(f'{k}:{v}' for k, v in
                                           meta['onnxruntime_float_ops'].items()),
         **agreement(sim, out, fp32_out, name), 'eval_inputs': len(images),
         'export_seconds': round(export_seconds, 1)}
  if labels is not None:
    row.update(top1_pct=round(top1_accuracy_pct(out, labels), 2),
               simulation_top1_pct=round(top1_accuracy_pct(sim, labels), 2),
               float_bias_simulation_top1_pct=round(top1_accuracy_pct(float_bias_sim, labels), 2),
               fp32_top1_pct=round(top1_accuracy_pct(fp32_out, labels), 2))
  for batch in (1, 64):
    x = np.ascontiguousarray(np.resize(images, (batch,) + images.shape[1:]), np.float32)
    fp32_ms, qdq_ms = [], []
    for _ in range(3):   # alternated, the medians of each kept
      fp32_ms.append(median_ort_ms(fp32_session, x, FLAGS.repeats))
      qdq_ms.append(median_ort_ms(artifact.session, x, FLAGS.repeats))
    row[f'onnxruntime_fp32_ms_batch{batch}'] = round(float(np.median(fp32_ms)), 3)
    row[f'onnxruntime_qdq_ms_batch{batch}'] = round(float(np.median(qdq_ms)), 3)
    row[f'qdq_speedup_over_fp32_batch{batch}'] = round(
        float(np.median(fp32_ms)) / float(np.median(qdq_ms)), 2)
  return dict(row, device=describe_device(), command=COMMAND)


def fp32_onnx_session(model, variables, input_shape, tmp: str):
  path = os.path.join(tmp, 'fp32.onnx')
  with open(path, 'wb') as f:
    f.write(float_onnx_model(model, variables, input_shape).SerializeToString())
  return ort.InferenceSession(path, providers=['CPUExecutionProvider'])


def main(_):
  records, tmp = [], tempfile.mkdtemp()
  for entry in FLAGS.models:
    task = TASKS[entry]() if entry in TASKS else fashion_mnist_task(entry)
    name, model, variables, calib, images, labels, runs = task
    fp32_session = None
    for label, qm in quantized_models(model, variables, calib, name, runs):
      if FLAGS.format == 'onnx':
        fp32_session = fp32_session or fp32_onnx_session(model, variables, qm.input_shape, tmp)
        records.append(measure_onnx(name, model, variables, qm, label, images, labels, tmp,
                                    fp32_session))
      else:
        records.append(measure(name, model, variables, qm, label, images, labels, tmp))
      print({k: v for k, v in records[-1].items() if k not in ('device', 'command')},
            flush=True)
      write(records)   # (after every row: a later failure keeps what was measured)


def write(records) -> None:
  if FLAGS.format == 'onnx':
    write_results(FLAGS.out, FLAGS.out_name, records,
                  'Deployable ONNX QDQ models (ptq_jax.export, format="onnx")',
                  notes='One row per model and bits, quantized as in `results/export.md` but '
                        'with symmetric weights (`RangeConfig(weight_symmetric=True)`: ONNX '
                        'Runtime runs 8-bit weights with zero points on a path many times '
                        'slower), then `ptq_jax.export(qm, path, format="onnx")`. Operators: '
                        'what ONNX Runtime\'s CPU graph optimisation left in the model '
                        '(integer kernels vs float convolutions/matmuls). The model is '
                        'exported with its biases on the int32 grid the integer kernels use '
                        '(`qm.with_integer_biases()`); '
                        'simulation_top1_pct is that model\'s, float_bias_simulation_top1_pct '
                        'the model\'s before. Agreement and max |output delta|: '
                        'the ONNX model in ONNX Runtime against that simulation '
                        '(`QuantizedModel.apply`) on the evaluation inputs. Latency: median '
                        'ms per call in ONNX Runtime (CPU execution provider, default '
                        'threads) of the FP32 model written by the same converter and of '
                        'the QDQ model, alternated three times in this one run on the device '
                        f'named. Made by `{COMMAND}`.')
    return
  write_results(FLAGS.out, FLAGS.out_name, records, 'Deployable JAX artifacts (ptq_jax.export)',
                notes='One row per bundled model and bits: calibrated ranges (baseline PTQ; '
                      'mixed 13%: light, options W8A8/W4A4), then `ptq_jax.export`. Agreement '
                      'and max |logit delta|: the artifact against the simulation '
                      '(`QuantizedModel.apply`) on the 10,000 Fashion-MNIST test images. '
                      'Latency: median ms per call of jitted JAX FP32 (the model\'s own Flax '
                      'code), the simulation and the artifact (`jax.export` program), timed '
                      'in turn in this one run on the device named; speed-up = that ms / the '
                      'artifact\'s on the same runtime. On CPU the simulation and the artifact '
                      'compute depthwise convolutions with ptq_jax\'s own formulation '
                      '(`ptq_jax.linear`), which XLA runs far faster than the grouped '
                      'convolution of the FP32 Flax code: compare MobileNetV2 against the '
                      'simulation column. '
                      f'Made by `{COMMAND}`.')


if __name__ == '__main__':
  app.run(main)
