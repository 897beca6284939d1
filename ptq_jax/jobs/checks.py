"""What run.py checks before any work starts, and how it words a bad config.

* :func:`config_error_message`: one line for an error raised while the config file is
  loaded or overridden (missing file, syntax error, no ``get_config``, an unknown key,
  ``get_config`` raising), naming the file or key and the fix.
Output locations (the work dir, a cache dir) are checked by the library's
:func:`ptq_jax.io.check_output_dir`, the check every writer uses.
"""

from __future__ import annotations

import re
from typing import Optional


def config_error_message(error: BaseException, config_path: Optional[str] = None) -> str:
  """One line naming what is wrong with the config and how to fix it."""
  where = f'config file {config_path}' if config_path else 'the config file'
  text = str(error).replace('Configuration is not available because of an earlier failure to '
                            'load: ', '')
  if isinstance(error, SyntaxError):
    return (f'{where}: syntax error at {error.filename or "?"} line {error.lineno}: '
            f'{error.msg}. Fix the file (see configs/default.py for the form).')
  if '[Errno' in text or 'Failed loading config file' in text:
    reason = re.search(r'\[Errno \d+\] ([^:\n]+)', text)
    return (f'{where} could not be read ({reason.group(1) if reason else _first_line(text)}).'
            ' Pass an existing config file, e.g. --config=configs/default.py.')
  if isinstance(error, AttributeError) and 'get_config' in text:
    return (f'{where} has no get_config() function: define `def get_config():` returning '
            'an ml_collections.ConfigDict (see configs/default.py).')
  if isinstance(error, (AttributeError, KeyError)):
    key = re.sub(r'^["\']+|["\']+$', '', _first_line(text))
    return (f'--config override names {key!r}, which the config does not have: check the '
            'spelling against the fields of the config file.')
  return (f'loading {where} failed: {type(error).__name__}: {_first_line(text)} '
          '(--traceback shows where).')


def _first_line(text: str) -> str:
  return text.strip().splitlines()[0] if text.strip() else ''
