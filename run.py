"""ptq_jax command line: run the job a config file describes.

  python run.py                                    # built-in default (configs/default.py)
  python run.py --config=configs/train_resnet20.py --workdir=/tmp/r20
  python run.py --config=configs/default.py --config.checkpoint=PATH --workdir=DIR

Every config field can be overridden with --config.KEY=VALUE; an unknown key is an
error. This file stays thin: it parses flags and calls ptq_jax.jobs.registry.
"""

import logging as std_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from ptq_jax.jobs.checks import config_error_message
from ptq_jax.jobs.registry import run as run_job
from ptq_jax.compilation_cache import cache_setting, enable_compilation_cache

FLAGS = flags.FLAGS


def _config_path(argv):
  return next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)


def _config_error(error: BaseException, argv) -> None:
  """Exits with one line for an error of the config file or an override (re-raises it
  with --traceback)."""
  if '--traceback' in argv:
    raise error
  sys.exit(f'run.py: error: {config_error_message(error, _config_path(argv))}')


try:  # (ml_collections reads the config's overrides from sys.argv right here)
  config_flags.DEFINE_config_file(
      'config', os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs',
                             'default.py'),
      'Path to an ml_collections config file.', lock_config=True)
except Exception as e:  # pylint: disable=broad-except
  _config_error(e, sys.argv)
flags.DEFINE_string('workdir', None, 'Directory for results, logs and checkpoints '
                    '(default: the config\'s workdir field).')
flags.DEFINE_bool('traceback', False, 'Show the full traceback of an input error.')
flags.DEFINE_string('compilation_cache', 'auto', 'JAX persistent compilation cache: a '
                    'directory, "off", or "auto" (~/.cache/ptq_jax/xla on GPU/TPU, where '
                    'compilation is most of a cold run; off on CPU).')

# Errors that mean "bad input" (a bad value or file, an unwritable or full disk):
# reported as one line naming the problem and the fix; --traceback shows the stack.
INPUT_ERRORS = (OSError, KeyError, TypeError, ValueError)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not FLAGS['verbosity'].present:  # TFDS and JAX log a lot at INFO; --verbosity=0 shows it.
    logging.set_verbosity(logging.WARNING)
  _show_library_progress()
  try:
    config = FLAGS.config   # a config file that failed to load raises on first use:
    config.job              # here, before any work
  except Exception as e:  # pylint: disable=broad-except
    _config_error(e, sys.argv)
  try:
    cache_dir = cache_setting(FLAGS.compilation_cache)
    if cache_dir:
      print(f'run.py: compiled programs are cached in {enable_compilation_cache(cache_dir)}',
            file=sys.stderr)
    run_job(config, FLAGS.workdir)
  except INPUT_ERRORS as e:
    if FLAGS.traceback:
      raise
    message = e.args[0] if isinstance(e, KeyError) and e.args else e
    sys.exit(f'run.py: error: {_one_line(message)} (--traceback shows where it was raised)')


def _show_library_progress() -> None:
  """ptq_jax's own progress messages (the library logs them at INFO, never prints) go to
  stdout as plain lines, whatever the verbosity of TFDS and JAX."""
  handler = std_logging.StreamHandler(sys.stdout)
  handler.setFormatter(std_logging.Formatter('%(message)s'))
  library = std_logging.getLogger('ptq_jax')
  library.addHandler(handler)
  library.setLevel(std_logging.INFO)
  library.propagate = False


def _one_line(message) -> str:
  return ' '.join(str(message).split())


def parse_flags(argv):
  """absl's flag parsing, with every config-file error reported as one line."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    sys.exit(f'run.py: error: {_one_line(e)} (run.py --help lists the flags)')
  except Exception as e:  # pylint: disable=broad-except
    _config_error(e, argv)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
