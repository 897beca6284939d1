"""Evaluate a checkpoint (default: the bundled ResNet-20) on the Fashion-MNIST test split.

Command:
  python run.py --config=configs/evaluate.py
  python run.py --config=configs/evaluate.py --config.checkpoint=mobilenet_v2_fmnist_fashion_mnist
Expected: the top-1 recorded in the checkpoint's model card (results/fp32.md),
written to ./workdir/evaluate/results.json in under a minute on 2 cores.
"""

import ml_collections

from configs import common


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.job = 'evaluate'
  config.workdir = './workdir/evaluate'
  # A bundled checkpoint name (see ptq_jax.bundled_checkpoints()) or a file path.
  config.checkpoint = 'resnet20_fashion_mnist'
  config.data = common.data_config()
  config.batch_size = 500
  config.eval_limit = 0  # 0: the whole test split.
  return config
