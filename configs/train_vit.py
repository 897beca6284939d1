"""Train the bundled ViT (Flax NNX) on Fashion-MNIST from scratch.

Command:
  python run.py --config=configs/train_vit.py --workdir=/tmp/train_vit
The model card it writes records the test top-1, seed and wall time; 12 epochs on a 2-core
CPU took about 20 minutes.
"""

import ml_collections

from configs import common


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.job = 'train'
  config.model = 'vit_fmnist'
  config.data = common.data_config()
  config.seed = 0
  config.batch_size = 128
  config.num_epochs = 12
  config.optimizer = 'adamw'
  config.learning_rate = 2e-3
  config.warmup_steps = 500
  config.momentum = 0.9      # (SGD only)
  config.weight_decay = 0.05
  config.label_smoothing = 0.1
  config.eval_every_epochs = 3
  config.train_limit = 0  # 0: the whole train split; N: its first N images.
  config.eval_limit = 0   # 0: the whole test split.
  config.augment = ml_collections.ConfigDict({'crop_pad': 2, 'flip': True})
  return config
