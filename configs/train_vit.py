"""Train the bundled ViT (Flax NNX) on Fashion-MNIST from scratch.

Command:
  python run.py --config=configs/train_vit.py --workdir=/tmp/train_vit
The model card it writes records the test top-1, seed and wall time (the bundled
checkpoint's card: ptq_jax/checkpoints/vit_fmnist_fashion_mnist.json).
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
  config.num_epochs = 30
  config.optimizer = 'adamw'
  config.learning_rate = 2e-3
  config.warmup_steps = 500
  config.momentum = 0.9      # (SGD only)
  config.weight_decay = 0.05
  config.label_smoothing = 0.1
  config.eval_every_epochs = 5
  config.train_limit = 0  # 0: the whole train split; N: its first N images.
  config.eval_limit = 0   # 0: the whole test split.
  config.augment = ml_collections.ConfigDict({'crop_pad': 2, 'flip': True})
  return config
