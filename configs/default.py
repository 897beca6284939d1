"""Built-in default job (`python run.py`): the advanced pipeline on the bundled ResNet-20.

Command:
  python run.py
What it does, with 1000 unlabelled calibration images: baseline PTQ at W4A4 (first and
last layer 8-bit, min/max ranges), then parallel AdaQuant (300 iterations per layer),
BN tuning and bias tuning; then mixed precision at 13% of the FP32 weight size from the
same AdaQuant states (options W8A8 and W4A4), BN tuning and bias tuning. Prints the
table (FP32 and every stage: test top-1 on the 10,000 Fashion-MNIST test images, weight
size, seconds) and writes results.json, results.md, stages.png, layers.png and
quantized.msgpack to ./workdir/default. Expected: results/default_job.md (the table of
two runs on 2 CPU cores, `python benchmarks/default_job.py`). The full-size settings
(1000 iterations, six options) are in configs/pipeline.py and results/pipelines.md.
"""

import ml_collections

from configs import pipeline


def get_config() -> ml_collections.ConfigDict:
  config = pipeline.get_config()
  config.workdir = './workdir/default'
  config.pipelines = ('advanced', 'advanced@13')
  config.quant.options = ('W8A8', 'W4A4')
  config.quant.iterations = 300
  config.quant.bias_steps = 300
  config.quant.cache_dir = ''   # the default job always computes (and times) every stage
  return config
