"""Rotten Tomatoes sentences with human sentiment scores, from vaderSentiment's sources.

The source distribution of PyPI ``vaderSentiment`` (3.3.2) ships
``additional_resources/hutto_ICWSM_2014.tar.gz``, whose
``movieReviewSnippets_GroundTruth.txt`` holds 10,605 movie-review sentences with
the mean of 20 human ratings (-4..4). Only the sdist has it, not the wheel, so
the set-up fetches the sdist file (``pip download``) into ``.external/``; it is
read in place from the archive, never downloaded at run time.
"""

from __future__ import annotations

import dataclasses
import io
import os
import tarfile
from typing import List, Optional, Tuple

import numpy as np

from ptq_jax.data.loader import DatasetNotFoundError

SDIST_NAME = 'vaderSentiment-3.3.2.tar.gz'
ENV_VAR = 'PTQ_JAX_VADER_SDIST'
_INNER = 'vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz'
_MEMBER = 'hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt'
_REPO_EXTERNAL = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), '.external')


@dataclasses.dataclass(frozen=True)
class Sentences:
  """Sentences with their mean human sentiment score and binary label (score > 0)."""

  texts: List[str]
  scores: np.ndarray

  @property
  def labels(self) -> np.ndarray:
    return (self.scores > 0).astype(np.int32)

  def take(self, index: np.ndarray) -> 'Sentences':
    return Sentences([self.texts[i] for i in index], self.scores[index])

  def __len__(self) -> int:
    return len(self.texts)


def find_sdist(path: Optional[str] = None) -> str:
  """The vaderSentiment sdist: ``path``, ``$PTQ_JAX_VADER_SDIST`` or ``.external/``."""
  candidates = [path, os.environ.get(ENV_VAR), os.path.join(_REPO_EXTERNAL, SDIST_NAME)]
  for candidate in candidates:
    if candidate and os.path.isfile(candidate):
      return candidate
  raise DatasetNotFoundError(
      f'The Rotten Tomatoes sentences come from the vaderSentiment source distribution, not '
      f'found (looked at {[c for c in candidates if c]}). Run ./scripts/setup.sh, or: pip '
      f'download --no-deps --no-binary :all: vaderSentiment==3.3.2 -d .external '
      f'(or set {ENV_VAR} to the .tar.gz).')


def movie_review_sentences(sdist: Optional[str] = None) -> Sentences:
  """All 10,605 sentences, in the file's order, neutral ones (score 0) left out."""
  path = find_sdist(sdist)
  try:
    with tarfile.open(path) as outer:
      inner = outer.extractfile(_INNER).read()
    with tarfile.open(fileobj=io.BytesIO(inner)) as archive:
      raw = archive.extractfile(_MEMBER).read()
  except (tarfile.TarError, KeyError, AttributeError, OSError) as e:
    raise DatasetNotFoundError(f'{path} is not the vaderSentiment 3.3.2 sdist or is corrupt '
                               f'({type(e).__name__}: {e}); download it again.') from e
  texts, scores = [], []
  for line in raw.decode('latin-1').splitlines():
    fields = line.split('\t')
    if len(fields) != 3:
      continue
    score = float(fields[1])
    if score != 0.0:
      texts.append(fields[2].strip())
      scores.append(score)
  return Sentences(texts, np.array(scores, np.float32))


def sentence_splits(calibration_size: int = 256, train_size: int = 4000, seed: int = 0,
                    sentences: Optional[Sentences] = None
                    ) -> Tuple[Sentences, Sentences, Sentences]:
  """Seeded (calibration, probe-train, probe-test) splits; test is disjoint from both."""
  sentences = sentences or movie_review_sentences()
  if calibration_size < 1 or train_size < calibration_size or train_size >= len(sentences):
    raise ValueError(f'Need 1 <= calibration_size ({calibration_size}) <= train_size '
                     f'({train_size}) < {len(sentences)} sentences.')
  order = np.random.default_rng(seed).permutation(len(sentences))
  train, test = order[:train_size], order[train_size:]
  return sentences.take(train[:calibration_size]), sentences.take(train), sentences.take(test)
