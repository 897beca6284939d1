"""ptq_jax: accurate post-training quantization of Flax models with small calibration sets.

The public API is re-exported here; see README.md for the architecture.
"""

from ptq_jax.adaquant import AdaQuantConfig, run_adaquant
from ptq_jax.allocation import Allocation, InfeasibleBudgetError, allocate
from ptq_jax.api import QuantizedModel, assign_bits, quantize
from ptq_jax.distill import kd_tune, kl_to_teacher
from ptq_jax.bundled import bundled_checkpoints, model_card, resolve_checkpoint
from ptq_jax.compilation_cache import enable_compilation_cache
from ptq_jax.checkpoint import (CheckpointError, check_variables_match, load_checkpoint,
                                load_model, save_checkpoint)
from ptq_jax.data.loader import (ArraySplit, CalibrationSet, DatasetNotFoundError,
                                 ImageClassificationSource, calibration_set, load_split,
                                 preprocess)
from ptq_jax.evaluation import predict_logits, top1_accuracy_pct
from ptq_jax.importers import (LayoutRule, MappingError, UnsafeCheckpointError, from_flax_tree,
                               read_safetensors, read_torch_checkpoint, to_flax_tree)
from ptq_jax.importers.efficientnet import load_efficientnet_lite0
from ptq_jax.importers.minilm import load_minilm, tokenize
from ptq_jax.bn_tuning import bn_tune
from ptq_jax.mixed import MixedPrecision, mixed_precision
from ptq_jax.pipelines import PIPELINES, PipelineResult, run_pipeline
from ptq_jax.qat import qat_train
from ptq_jax.models import MODELS, create_model
from ptq_jax.quant.export import export_integer, integer_layer_output, load_integer
from ptq_jax.quant.quantizer import QuantizerState, fake_quant, init_range
from ptq_jax.sensitivity import SensitivityTable, sensitivity_table
from ptq_jax.trace import LayerInfo, totals, trace

__version__ = '0.1.0'

__all__ = [
    'Allocation', 'InfeasibleBudgetError', 'MixedPrecision', 'SensitivityTable', 'allocate',
    'mixed_precision', 'sensitivity_table', 'PIPELINES', 'PipelineResult', 'run_pipeline',
    'qat_train',
    'bn_tune',
    'AdaQuantConfig', 'QuantizedModel', 'QuantizerState', 'kd_tune', 'kl_to_teacher', 'run_adaquant', 'assign_bits', 'export_integer', 'fake_quant',
    'init_range', 'integer_layer_output', 'load_integer', 'quantize',
    'ArraySplit', 'CalibrationSet', 'CheckpointError', 'DatasetNotFoundError',
    'ImageClassificationSource', 'LayerInfo', 'MODELS', 'bundled_checkpoints',
    'calibration_set', 'check_variables_match', 'create_model', 'load_checkpoint',
    'load_model', 'load_split', 'model_card', 'predict_logits', 'preprocess',
    'resolve_checkpoint', 'save_checkpoint', 'top1_accuracy_pct', 'totals', 'trace',
    'LayoutRule', 'MappingError', 'UnsafeCheckpointError', 'from_flax_tree',
    'load_efficientnet_lite0', 'load_minilm', 'read_safetensors', 'read_torch_checkpoint',
    'to_flax_tree', 'tokenize', 'enable_compilation_cache',
]
