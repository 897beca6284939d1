"""Built-in default job: evaluate the bundled ResNet-20 on the Fashion-MNIST test split.

Command:
  python run.py
Expected: the top-1 recorded in ptq_jax/checkpoints/resnet20_fashion_mnist.json
(>= 93.0%), written to ./workdir/default/results.json in about a minute on 2 cores.
"""

import ml_collections

from configs import common


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.job = 'evaluate'
  config.workdir = './workdir/default'
  # A bundled checkpoint name (see ptq_jax.bundled_checkpoints()) or a file path.
  config.checkpoint = 'resnet20_fashion_mnist'
  config.data = common.data_config()
  config.batch_size = 500
  config.eval_limit = 0  # 0: the whole test split.
  return config
