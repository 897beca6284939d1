"""Built-in default job (`python run.py`): baseline PTQ of the bundled ResNet-20 at W4A4.

Command:
  python run.py
Expected: FP32 and W4A4 (first/last layer 8-bit, min/max ranges, 1000 calibration
images) test top-1 on the 10,000 Fashion-MNIST test images, as in
results/baseline_ptq.md, in about a minute on 2 CPU cores; outputs in ./workdir/default.
"""

import ml_collections

from configs import ptq_baseline


def get_config() -> ml_collections.ConfigDict:
  config = ptq_baseline.get_config()
  config.workdir = './workdir/default'
  return config
