"""Baseline PTQ of the bundled ResNet-20: calibrated ranges, no AdaQuant.

Command:
  python run.py --config=configs/ptq_baseline.py --workdir=/tmp/ptq
  python run.py --config=configs/ptq_baseline.py --config.quant.w_bits=8 --config.quant.a_bits=8
Expected: see results/baseline_ptq.md for the same settings (W4A4 min/max, first
and last layer 8-bit, 1000 calibration images).
"""

import ml_collections

from configs import common


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.job = 'quantize'
  config.workdir = './workdir/ptq_baseline'
  config.checkpoint = 'resnet20_fashion_mnist'
  config.data = common.data_config()
  config.calib_size = 1000
  config.seed = 0
  config.eval_limit = 0
  config.export = 'jax'   # artifacts: 'jax' (quantized.jaxexport), 'onnx', 'jax,onnx', ''
  config.quant = ml_collections.ConfigDict()
  config.quant.w_bits = 4          # 2..8; 0 keeps weights in float
  config.quant.a_bits = 4          # 2..8; 0 keeps layer inputs in float
  config.quant.first_last_bits = 8  # 0: first and last layers like the others
  config.quant.range_method = 'minmax'  # 'minmax' | 'mse' | 'percentile'
  config.quant.symmetric = False
  return config
