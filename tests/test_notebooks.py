"""Every notebook under notebooks/ runs top to bottom.

Each notebook keeps its settings in one cell tagged ``parameters`` (the papermill
convention); the test runs it as written except for a cell injected after that one
which shrinks the settings, so the suite stays fast while every cell still executes.
"""

import glob
import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, 'notebooks', '*.ipynb')))

# Smaller settings per notebook: names must exist in its parameters cell.
SMALL = {
    '01_quickstart.ipynb': dict(CALIB_SIZE=64, TEST_LIMIT=300, ADAQUANT_ITERATIONS=5,
                                BIAS_STEPS=10, BIT_WIDTHS=[(4, 4)]),
    '02_mixed_precision.ipynb': dict(CALIB_SIZE=64, TEST_LIMIT=300, OPTIONS=('W8A8', 'W4A4')),
}


def test_there_are_notebooks():
  assert NOTEBOOKS
  assert set(SMALL) == {os.path.basename(p) for p in NOTEBOOKS}  # a new notebook needs SMALL


def with_small_settings(nb, settings):
  """The notebook with a cell setting ``settings`` right after its parameters cell."""
  tagged = [i for i, c in enumerate(nb.cells) if 'parameters' in c.metadata.get('tags', [])]
  assert len(tagged) == 1, 'tag exactly one cell "parameters"'
  source = nb.cells[tagged[0]].source
  for name in settings:
    assert f'\n{name} = ' in f'\n{source}', f'{name} is not set in the parameters cell'
  override = nbformat.v4.new_code_cell(
      '\n'.join(f'{name} = {value!r}' for name, value in settings.items()))
  nb.cells.insert(tagged[0] + 1, override)
  return nb


@pytest.mark.parametrize('path', NOTEBOOKS, ids=os.path.basename)
def test_notebook_executes(path, tfds_dir, monkeypatch):
  # The kernel inherits the environment: it reads the suite's private TFDS data dir
  # (prepared by earlier tests, or by the kernel when run alone), never the user's
  # ~/tensorflow_datasets.
  monkeypatch.setenv('TFDS_DATA_DIR', tfds_dir)
  nb = with_small_settings(nbformat.read(path, as_version=4), SMALL[os.path.basename(path)])
  NotebookClient(nb, timeout=600, startup_timeout=300, kernel_name='python3',
                 resources={'metadata': {'path': os.path.dirname(path)}}).execute()
  errors = [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', [])
            if o.get('output_type') == 'error']
  assert not errors
