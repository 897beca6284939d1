"""Shared fixtures: the real Fashion-MNIST splits, prepared once per test session.

The suite shares one fresh JAX persistent compilation cache, set through the environment
before JAX is imported so that the child processes (run.py, notebook kernels, multi-device
checks) use it too: many tests compile the same programs (ResNet-20's layer shapes at the
same bit widths), and on these 2-core machines compilation is most of their time. The
cache only skips recompiling identical programs; it changes no result.
"""

import os
import shutil
import tempfile

import pytest

_XLA_CACHE = tempfile.mkdtemp(prefix='ptq_jax_tests_xla_')
os.environ['JAX_COMPILATION_CACHE_DIR'] = _XLA_CACHE
os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'

import jax  # noqa: E402

from ptq_jax.data import loader  # noqa: E402

# (in case a plugin imported JAX before the environment was set)
jax.config.update('jax_compilation_cache_dir', _XLA_CACHE)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)


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


def pytest_unconfigure(config):
  shutil.rmtree(_XLA_CACHE, ignore_errors=True)
