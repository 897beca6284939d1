"""Safe weight import: PyTorch checkpoints (zip and legacy) without running pickled code,
safetensors, name/layout mapping, and FP32 parity of the two imported models."""

import os
import pickle
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ptq_jax.importers import (LayoutRule, MappingError, UnsafeCheckpointError, from_flax_tree,
                               read_safetensors, read_torch_checkpoint, to_flax_tree)

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures')


@pytest.mark.parametrize('name', ['torch_zip.pt', 'torch_legacy.pt'])
def test_torch_checkpoints_read_exactly_what_torch_saved(name):
  expected = np.load(os.path.join(FIXTURES, 'torch_tensors.npz'))
  arrays = read_torch_checkpoint(os.path.join(FIXTURES, name))
  assert sorted(arrays) == sorted(expected.files)
  for key in expected.files:
    assert arrays[key].dtype == expected[key].dtype, key
    np.testing.assert_array_equal(arrays[key], expected[key], err_msg=key)
  # The non-contiguous view came back with its strides applied, not the raw storage.
  np.testing.assert_array_equal(arrays['transposed'], np.arange(12.0).reshape(3, 4).T)


class _Payload:
  """Pickles as a call to ``fn(arg)``: what a malicious checkpoint does."""

  def __init__(self, fn, arg):
    self.fn, self.arg = fn, arg

  def __reduce__(self):
    return self.fn, (self.arg,)


def _zip_checkpoint(path, obj):
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr('archive/data.pkl', pickle.dumps(obj, protocol=2))


def _legacy_checkpoint(path, obj):
  with open(path, 'wb') as f:
    for header in (0x1950a86a20f9469cfc6c, 1001, {'little_endian': True}):
      pickle.dump(header, f, protocol=2)
    pickle.dump(obj, f, protocol=2)
    pickle.dump([], f, protocol=2)


@pytest.mark.parametrize('writer', [_zip_checkpoint, _legacy_checkpoint])
def test_malicious_pickle_is_refused_without_running(tmp_path, writer):
  marker = tmp_path / 'pwned'
  path = str(tmp_path / 'evil.pt')
  writer(path, {'weight': _Payload(os.system, f'touch {marker}')})
  with pytest.raises(UnsafeCheckpointError, match='posix.system|os.system'):
    read_torch_checkpoint(path)
  assert not marker.exists()
  # Any other callable is refused the same way, e.g. builtins.exec / eval.
  writer(path, {'weight': _Payload(eval, '1 + 1')})
  with pytest.raises(UnsafeCheckpointError, match='builtin(s|__).eval'):
    read_torch_checkpoint(path)


def test_corrupt_and_foreign_files_are_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError):
    read_torch_checkpoint(str(tmp_path / 'missing.pt'))
  (tmp_path / 'text.pt').write_bytes(b'not a checkpoint at all')
  with pytest.raises(UnsafeCheckpointError, match='not a PyTorch checkpoint'):
    read_torch_checkpoint(str(tmp_path / 'text.pt'))
  data = open(os.path.join(FIXTURES, 'torch_legacy.pt'), 'rb').read()
  (tmp_path / 'cut.pt').write_bytes(data[:-40])
  with pytest.raises(UnsafeCheckpointError, match='truncated'):
    read_torch_checkpoint(str(tmp_path / 'cut.pt'))


def test_safetensors_round_trip(tmp_path):
  from safetensors.numpy import save_file
  arrays = {'a.weight': np.arange(6, dtype=np.float32).reshape(2, 3),
            'b': np.array([1, 2], np.int64)}
  save_file(arrays, str(tmp_path / 'x.safetensors'))
  back = read_safetensors(str(tmp_path / 'x.safetensors'))
  for k, v in arrays.items():
    np.testing.assert_array_equal(back[k], v)
  (tmp_path / 'bad.safetensors').write_bytes(b'\xff' * 16)
  with pytest.raises(ValueError, match='not a valid safetensors'):
    read_safetensors(str(tmp_path / 'bad.safetensors'))


def test_layout_mapping_round_trips_and_checks_shapes():
  rng = np.random.default_rng(0)
  source = {'conv.weight': rng.normal(size=(8, 3, 3, 5)).astype(np.float32),
            'dw.weight': rng.normal(size=(8, 1, 3, 3)).astype(np.float32),
            'fc.weight': rng.normal(size=(4, 8)).astype(np.float32),
            'fc.bias': rng.normal(size=(4,)).astype(np.float32)}
  mapping = {('params', 'conv', 'kernel'): ('conv.weight', LayoutRule.CONV),
             ('params', 'dw', 'kernel'): ('dw.weight', LayoutRule.CONV),
             ('params', 'fc', 'kernel'): ('fc.weight', LayoutRule.DENSE),
             ('params', 'fc', 'bias'): ('fc.bias', LayoutRule.COPY)}
  template = {'params': {'conv': {'kernel': np.zeros((3, 5, 3, 8))},
                         'dw': {'kernel': np.zeros((3, 3, 1, 8))},
                         'fc': {'kernel': np.zeros((8, 4)), 'bias': np.zeros(4)}}}
  tree = to_flax_tree(source, mapping, template)
  # conv (O, I, kh, kw) -> (kh, kw, I, O): element [o, i, y, x] lands at [y, x, i, o].
  assert tree['params']['conv']['kernel'][2, 4, 1, 7] == source['conv.weight'][7, 1, 2, 4]
  back = from_flax_tree(tree, mapping)
  for k in source:
    np.testing.assert_array_equal(back[k], source[k])
  with pytest.raises(MappingError, match='not used'):
    to_flax_tree(dict(source, extra=np.zeros(1)), mapping, template)
  bad = dict(template, params=dict(template['params'], fc={'kernel': np.zeros((4, 8)),
                                                           'bias': np.zeros(4)}))
  with pytest.raises(MappingError, match='needs'):
    to_flax_tree(source, mapping, bad)


def test_efficientnet_lite0_calls_the_coffee_photo_espresso():
  import skimage.data
  from ptq_jax.data.loader import resize_center_crop
  from ptq_jax.data.photos import imagenet_class_names
  from ptq_jax.importers.efficientnet import load_efficientnet_lite0, preprocess_images
  model, variables = load_efficientnet_lite0()
  image = resize_center_crop(skimage.data.coffee(), 224)
  probs = jax.nn.softmax(model.apply(variables, preprocess_images(image[None])))[0]
  top = int(jnp.argmax(probs))
  assert imagenet_class_names()[top] == 'espresso'
  assert float(probs[top]) > 0.5
  assert sum(int(np.size(x)) for x in jax.tree.leaves(variables['params'])) == 4_652_008


def test_minilm_matches_sentence_transformers_reference():
  from ptq_jax.importers.minilm import load_minilm, tokenize
  reference = np.load(os.path.join(FIXTURES, 'minilm_reference.npz'))
  sentences = [str(s) for s in reference['sentences']]
  tokens = tokenize(sentences, 40)
  ids = reference['token_ids']
  np.testing.assert_array_equal(tokens[:, 0, :ids.shape[1]].astype(np.int32), ids)
  model, variables = load_minilm()
  ours = np.asarray(model.apply(variables, tokens))
  theirs = reference['embeddings'] / np.linalg.norm(reference['embeddings'], axis=1,
                                                    keepdims=True)
  cosine = np.sum(ours * theirs, axis=1)
  assert cosine.min() > 0.9999, cosine
  # Padding does not change a sentence's embedding.
  np.testing.assert_allclose(np.asarray(model.apply(variables, tokenize(sentences, 64))), ours,
                             atol=2e-6)


def _lite_variant(stages, seed=0):
  """A random EfficientNet-Lite of the given stage table, saved under the PyTorch port's
  names (what a Lite1-4 checkpoint holds)."""
  from ptq_jax.importers import efficientnet
  from ptq_jax.models.efficientnet_lite import efficientnet_lite0
  model = efficientnet_lite0(num_classes=7, stages=stages)
  shapes = jax.eval_shape(model.init, jax.random.key(seed), jnp.zeros((1, 32, 32, 3)))
  rng = np.random.default_rng(seed)
  variables = jax.tree.map(lambda a: (0.5 + rng.random(a.shape) if len(a.shape) == 1 else
                                      rng.normal(size=a.shape) * 0.1).astype(np.float32), shapes)
  return model, variables, from_flax_tree(variables, efficientnet.torch_name_mapping(variables))


def test_an_efficientnet_lite_variant_is_read_and_a_foreign_file_described():
  """Catches a Lite variant (other widths and repeats, the same family) refused, or a
  file of another structure failing with a bare 'tensors not used' instead of what it
  holds against what the loader builds."""
  from ptq_jax.importers.efficientnet import efficientnet_from_arrays
  from ptq_jax.models.efficientnet_lite import LITE0_STAGES
  wider = tuple((k, s, e, c + 8, n + (i in (2, 3))) for i, (k, s, e, c, n)
                in enumerate(LITE0_STAGES))
  model, variables, arrays = _lite_variant(wider)
  loaded, loaded_vars = efficientnet_from_arrays(arrays)
  assert loaded.stages == wider
  x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  np.testing.assert_allclose(loaded.apply(loaded_vars, x), model.apply(variables, x),
                             rtol=1e-5, atol=1e-5)
  _, _, foreign = _lite_variant(LITE0_STAGES[:5])
  with pytest.raises(MappingError, match=r'holds 11 blocks in the stages .* seven stages'):
    efficientnet_from_arrays(foreign)
