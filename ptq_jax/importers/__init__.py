"""Reading weights trained elsewhere (PyTorch checkpoints, safetensors) into Flax trees."""

from ptq_jax.importers.mapping import (LayoutRule, MappingError, from_flax_tree, from_nchw,
                                       to_flax_tree)
from ptq_jax.importers.safetensors_reader import read_safetensors
from ptq_jax.importers.torch_checkpoint import UnsafeCheckpointError, read_torch_checkpoint

__all__ = ['LayoutRule', 'MappingError', 'from_nchw', 'UnsafeCheckpointError', 'read_safetensors',
           'from_flax_tree', 'read_torch_checkpoint', 'to_flax_tree']
