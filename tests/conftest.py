"""Shared fixtures: the real Fashion-MNIST splits, prepared once per test session."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ptq_jax.data import loader  # noqa: E402


@pytest.fixture(scope='session')
def tfds_dir(tmp_path_factory):
  """A private TFDS data dir, so tests never touch the user's ~/tensorflow_datasets."""
  return str(tmp_path_factory.mktemp('tfds'))


@pytest.fixture(scope='session')
def fmnist_train(tfds_dir):
  return loader.load_split('fashion_mnist', 'train', data_dir=tfds_dir)


@pytest.fixture(scope='session')
def fmnist_test(tfds_dir):
  return loader.load_split('fashion_mnist', 'test', data_dir=tfds_dir)
