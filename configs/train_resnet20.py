"""Train the bundled ResNet-20 on Fashion-MNIST from scratch.

Command:
  python run.py --config=configs/train_resnet20.py --workdir=/tmp/train_resnet20
Expected: >= 93.0% test top-1 (the bundled checkpoint's model card records the exact
figure, seed and wall time; about 45 minutes on a 2-core CPU).
"""

import ml_collections

from configs import common


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.job = 'train'
  config.model = 'resnet20'
  config.data = common.data_config()
  config.seed = 0
  config.batch_size = 128
  config.num_epochs = 12
  config.learning_rate = 0.1
  config.warmup_steps = 200
  config.momentum = 0.9
  config.weight_decay = 5e-4
  config.label_smoothing = 0.0
  config.eval_every_epochs = 3
  config.train_limit = 0  # 0: the whole train split; N: its first N images.
  config.eval_limit = 0   # 0: the whole test split.
  config.augment = ml_collections.ConfigDict({'crop_pad': 2, 'flip': True})
  return config
