"""ptq_jax: accurate post-training quantization of Flax models with small calibration sets.

The curated public API, grouped below; everything else is importable from its module
(README.md, "Architecture", lists them; docs/method.md describes the method).
"""

# Models, data and evaluation.
from ptq_jax.bundled import bundled_checkpoints
from ptq_jax.checkpoint import CheckpointError, load_model
from ptq_jax.data.loader import DatasetNotFoundError, calibration_set, load_split, preprocess
from ptq_jax.evaluation import predict_logits, top1_accuracy_pct
from ptq_jax.trace import trace
# Quantizing: one call, its settings and its result.
from ptq_jax.quantize import quantize
from ptq_jax.quantized_model import QuantizedModel
from ptq_jax.spec import QuantSpec
from ptq_jax.stages.adaquant import AdaQuantConfig, AdaQuantRuntime
from ptq_jax.stages.ranges import RangeConfig
# Stages (every constructor, from one place), recipes and the paper's pipelines.
from ptq_jax import recipes, stages
from ptq_jax.pipelines import run_pipeline
from ptq_jax.stages.bias_tuning import kd_tune
from ptq_jax.stages.bn_tuning import bn_tune
# Mixed precision.
from ptq_jax.mixed_precision import MixedPrecision, mixed_precision
from ptq_jax.stages.allocation import InfeasibleBudgetError
# Deployment: the whole network as an integer program.
from ptq_jax.deploy import export, load_exported
# Models trained elsewhere.
from ptq_jax.importers import read_safetensors, read_torch_checkpoint, to_flax_tree
# Runtime.
from ptq_jax.compilation_cache import enable_compilation_cache

__version__ = '0.3.0'

__all__ = [
    # Models, data and evaluation.
    'bundled_checkpoints', 'load_model', 'CheckpointError', 'calibration_set', 'load_split',
    'preprocess', 'DatasetNotFoundError', 'predict_logits', 'top1_accuracy_pct', 'trace',
    # Quantizing.
    'quantize', 'QuantizedModel', 'QuantSpec', 'RangeConfig', 'AdaQuantConfig',
    'AdaQuantRuntime',
    # Stages, recipes and pipelines.
    'stages', 'recipes', 'run_pipeline', 'bn_tune', 'kd_tune',
    # Mixed precision.
    'mixed_precision', 'MixedPrecision', 'InfeasibleBudgetError',
    # Deployment.
    'export', 'load_exported',
    # Models trained elsewhere.
    'read_torch_checkpoint', 'read_safetensors', 'to_flax_tree',
    # Runtime.
    'enable_compilation_cache',
]
