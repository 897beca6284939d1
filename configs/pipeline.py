"""The paper's pipelines, stage by stage, on the bundled ResNet-20.

Command:
  python run.py --config=configs/pipeline.py
  python run.py --config=configs/pipeline.py --config.pipelines='("advanced", "advanced@13")'
  python run.py --config=configs/pipeline.py --config.checkpoint=mobilenet_v2_fmnist_fashion_mnist
Expected: see results/pipelines.md for the same settings: FP32, then the sequential
pipeline at W4A4 (first/last 8-bit) stage by stage (baseline PTQ, + AdaQuant, + BN
tuning, + bias tuning) and the light pipeline at 13% of the FP32 weight size
(`NAME@SIZE`: mixed precision at SIZE % of the FP32 weight size; a bare light or
advanced runs at the fixed bit widths).
About 10 minutes on 2 CPU cores.
"""

import ml_collections

from configs import common


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.job = 'pipeline'
  config.workdir = './workdir/pipeline'
  config.checkpoint = 'resnet20_fashion_mnist'
  config.data = common.data_config()
  config.calib_size = 1000
  config.seed = 0
  config.eval_limit = 0
  # Runs in order: 'sequential', 'light', 'advanced' (fixed bits) or 'light@13', 'advanced@13'.
  config.pipelines = ('sequential', 'light@13')
  config.quant = ml_collections.ConfigDict()
  config.quant.w_bits = 4            # fixed-bit runs
  config.quant.a_bits = 4
  config.quant.first_last_bits = 8   # 0: first and last layers like the others
  config.quant.range_method = 'minmax'  # range initialisation: 'minmax' | 'mse' | 'percentile'
  # The options mixed-precision runs choose from (a fixed-bit advanced run computes them
  # too, when they include its bit widths, so a following mixed run reuses them).
  config.quant.options = ('W8A8', 'W6A6', 'W4A8', 'W4A4', 'W3A3', 'W2A4')
  config.quant.iterations = 1000     # AdaQuant iterations per layer (or block)
  # AdaQuant's unit: 'layer' (the paper's) or 'block' (each residual block of the traced
  # graph fitted jointly); its weight updates: 'free' (the paper's) or 'learned' rounding.
  config.quant.unit = 'layer'
  config.quant.rounding = 'free'
  config.quant.drop_prob = 0.0       # QDrop: probability an input element skips quantization
  # Fraction of the calibration images held out of AdaQuant for its guard (0: none).
  config.quant.guard_holdout = 0.0
  config.quant.bias_steps = 800      # KD bias-tuning steps
  # Bias tuning's optimiser: 'sgd' (lr 0.1, the paper's) or 'adam' (lr 1e-3; ImageNet-size
  # networks, where SGD's steps overshoot and the KD loss rises).
  config.quant.bias_optimizer = 'sgd'
  # BN tuning: 'data' re-estimates the statistics on the calibration images (the paper's);
  # 'fp' matches the FP network's statistics on them (calibration data unlike training data).
  config.quant.bn_target = 'data'
  # True: AdaQuant, BN tuning and bias tuning are kept only if they lower the KL of the
  # outputs to FP32 on the calibration images (else the run goes on from the state before).
  config.quant.stage_guard = False
  # The mixed-precision states and AdaQuant's finished layers (a killed run resumes);
  # '' keeps nothing.
  config.quant.cache_dir = './workdir/sensitivity_cache'
  # Deployable artifacts of the last run's model: 'jax' (a jax.export program with integer
  # weights, quantized.jaxexport), 'onnx' (an ONNX QDQ model, quantized.onnx), 'jax,onnx'
  # or '' (none).
  config.export = 'jax'
  return config
