"""Mixed precision by integer programming on the bundled ResNet-20.

Command:
  python run.py --config=configs/mixed_precision.py
  python run.py --config=configs/mixed_precision.py --config.mixed.method=ptq   # light, fast
  python run.py --config=configs/mixed_precision.py --config.budgets='("size_pct=16","bops_pct=2")'
Expected: see results/mixed_precision.md (same options and budgets). The per-option
parallel-AdaQuant states take ~30 minutes on 2 CPU cores (seconds on a GPU) and are
cached in config.mixed.cache_dir, so later budgets are solved at once.
"""

import ml_collections

from configs import common


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.job = 'mixed_precision'
  config.workdir = './workdir/mixed_precision'
  config.checkpoint = 'resnet20_fashion_mnist'
  config.data = common.data_config()
  config.calib_size = 1000
  config.seed = 0
  config.eval_limit = 0
  config.mixed = ml_collections.ConfigDict()
  config.mixed.options = ('W8A8', 'W6A6', 'W4A8', 'W4A4', 'W3A3', 'W2A4')
  config.mixed.method = 'adaquant'   # 'adaquant' (advanced) | 'ptq' (calibrated ranges: light)
  config.mixed.iterations = 1000     # AdaQuant iterations per layer and option
  config.mixed.cache_dir = './workdir/sensitivity_cache'   # (also AdaQuant's progress)
  # Each budget: comma-separated size_pct / bops_pct (of FP32) / loss (predicted KL).
  config.budgets = ('size_pct=13', 'size_pct=16', 'bops_pct=2')
  return config
