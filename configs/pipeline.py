"""The paper's pipelines, stage by stage, on the bundled ResNet-20.

Command:
  python run.py --config=configs/pipeline.py
  python run.py --config=configs/pipeline.py --config.pipelines='("light",)'
  python run.py --config=configs/pipeline.py --config.checkpoint=mobilenet_v2_fmnist_fashion_mnist
Expected: see results/pipelines.md for the same settings: FP32, then the sequential
pipeline at W4A4 (first/last 8-bit) stage by stage (baseline PTQ, + AdaQuant, + BN
tuning, + bias tuning) and the light pipeline at 13% of the FP32 weight size.
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
  config.pipelines = ('sequential', 'light')   # any of 'sequential', 'light', 'advanced'
  config.quant = ml_collections.ConfigDict()
  config.quant.w_bits = 4            # sequential pipeline
  config.quant.a_bits = 4
  config.quant.first_last_bits = 8   # 0: first and last layers like the others
  config.quant.size_pct = 13.0       # light / advanced: weight-size budget, % of FP32
  config.quant.iterations = 1000     # AdaQuant iterations per layer
  config.quant.bias_steps = 800      # KD bias-tuning steps
  config.quant.cache_dir = './workdir/sensitivity_cache'
  return config
