"""The package's shape: no import cycle, no sys.path patch, installed so that
``import ptq_jax`` works from any directory, a curated API, docs in the repository."""

import ast
import os
import re
import subprocess
import sys

import ptq_jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, 'ptq_jax')
# Files outside the repository that docs once cited (spelled so this file is not one).
OUTSIDE = ('DESIGN' + '.md', '..' + '/shared')
# Modules that may be imported inside a function: they pull in a heavy optional
# dependency at import time, which ``import ptq_jax`` must not need (never a cycle).
LAZY = {'ptq_jax.data.fashion_mnist_builder': 'imports tensorflow_datasets',
        'ptq_jax.deploy.onnx_artifact': 'imports onnx and onnxruntime (the onnx extra)'}


def _modules():
  """{module name: file} for every module of the package."""
  found = {}
  for folder, _, files in os.walk(PACKAGE):
    for f in files:
      if f.endswith('.py'):
        rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].replace(os.sep, '.')
        found[rel[:-len('.__init__')] if rel.endswith('.__init__') else rel] = \
            os.path.join(folder, f)
  return found


def _imports(path, modules, package):
  """The package modules ``path`` imports (anywhere in the file), and the line numbers of
  those imported inside a function."""
  tree = ast.parse(open(path).read())
  edges, nested = set(), []
  parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
  for node in ast.walk(tree):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:  # relative import
        base = '.'.join(package.split('.')[:len(package.split('.')) - node.level + 1]
                        + ([base] if base else []))
      names = [f'{base}.{a.name}' if f'{base}.{a.name}' in modules else base
               for a in node.names]
    names = [n for n in names if n in modules]
    if not names:
      continue
    edges.update(names)
    up = parents.get(node)
    while up is not None and not isinstance(up, (ast.FunctionDef, ast.AsyncFunctionDef)):
      up = parents.get(up)
    if up is not None and not set(names) <= set(LAZY):
      nested.append(node.lineno)
  return edges, nested


def test_no_import_cycle_and_no_function_level_imports_inside_the_package():
  modules = _modules()
  graph, nested = {}, {}
  for name, path in modules.items():
    package = name if path.endswith('__init__.py') else name.rsplit('.', 1)[0]
    graph[name], lines = _imports(path, modules, package)
    if lines:
      nested[name] = lines
  assert not nested, f'imports of ptq_jax modules inside functions: {nested}'
  cycles = _cycles(graph)
  assert not cycles, f'import cycles: {cycles}'
  assert len(modules) > 40 and 'ptq_jax.stages.adaquant.driver' in graph  # the walk saw it all


def _folder(name, modules):
  """The node of ``name`` in the folder-level graph: a subpackage (``ptq_jax.quant``)
  for its modules, the module itself at the package's top level."""
  parts = name.split('.')
  return '.'.join(parts[:2]) if len(parts) > 2 or modules[name].endswith('__init__.py') else name


def _folder_cycles(modules):
  """Cycles of the module graph with every subpackage collapsed to one node."""
  graph = {}
  for name, path in modules.items():
    package = name if path.endswith('__init__.py') else name.rsplit('.', 1)[0]
    node = _folder(name, modules)
    for target in _imports(path, modules, package)[0]:
      if _folder(target, modules) != node:
        graph.setdefault(node, set()).add(_folder(target, modules))
  return _cycles(graph)


def _cycles(graph):
  """The cycles a depth-first walk of ``{node: {nodes it imports}}`` meets."""
  state, cycles = {}, []

  def visit(node, stack):
    state[node] = 'open'
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 'open':
        cycles.append(stack[stack.index(nxt):] + [nxt])
      elif nxt not in state:
        visit(nxt, stack + [nxt])
    state[node] = 'done'

  for node in sorted(graph):
    if node not in state:
      visit(node, [node])
  return cycles


def test_no_folder_imports_a_folder_that_imports_it_back():
  """Floors: a subpackage (quant/, stages/, models/, ...) never imports a module that
  imports back into it, directly or around a loop."""
  assert _folder_cycles(_modules()) == []


def test_the_folder_check_finds_a_loop_through_a_top_level_module(tmp_path):
  """The checker itself: pkg.sub.a -> pkg.top -> pkg.sub.b is a loop at folder level,
  though no module imports itself back."""
  (tmp_path / 'a.py').write_text('from pkg import top\n')
  (tmp_path / 'top.py').write_text('from pkg.sub import b\n')
  (tmp_path / 'b.py').write_text('x = 1\n')
  (tmp_path / 'init.py').write_text('')
  modules = {'pkg': str(tmp_path / 'init.py'), 'pkg.sub.a': str(tmp_path / 'a.py'),
             'pkg.top': str(tmp_path / 'top.py'), 'pkg.sub.b': str(tmp_path / 'b.py')}
  assert _folder_cycles(modules) == [['pkg.sub', 'pkg.top', 'pkg.sub']]


def test_the_cycle_check_finds_a_cycle(tmp_path):
  """The checker itself: two modules importing each other are a cycle."""
  (tmp_path / 'a.py').write_text('from pkg import b\n')
  (tmp_path / 'b.py').write_text('def f():\n  import pkg.a\n')
  modules = {'pkg.a': str(tmp_path / 'a.py'), 'pkg.b': str(tmp_path / 'b.py')}
  assert _imports(modules['pkg.a'], modules, 'pkg') == ({'pkg.b'}, [])
  assert _imports(modules['pkg.b'], modules, 'pkg') == ({'pkg.a'}, [2])


def test_no_file_patches_sys_path():
  offenders = []
  for folder, dirs, files in os.walk(ROOT):
    dirs[:] = [d for d in dirs if not d.startswith('.')]
    for f in files:
      if f.endswith(('.py', '.ipynb')):
        text = open(os.path.join(folder, f)).read()
        if re.search(r'sys\.path\.(insert|append)|sys\.path \+?=', text) and f != 'test_house.py':
          offenders.append(os.path.relpath(os.path.join(folder, f), ROOT))
  assert offenders == []


def test_import_works_from_any_directory():
  """scripts/setup.sh installs the project (editable), so the package imports outside
  the checkout too."""
  proc = subprocess.run([sys.executable, '-c', 'import ptq_jax; print(ptq_jax.__file__)'],
                        cwd='/', capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-1000:]
  assert os.path.realpath(proc.stdout.strip()) == os.path.realpath(
      os.path.join(PACKAGE, '__init__.py'))


def test_curated_api():
  assert len(ptq_jax.__all__) <= 30 and len(set(ptq_jax.__all__)) == len(ptq_jax.__all__)
  for name in ptq_jax.__all__:
    obj = getattr(ptq_jax, name)
    assert getattr(obj, '__doc__', None), f'ptq_jax.{name} has no docstring'


def test_docs_stay_inside_the_repository():
  """Docstrings and docs cite docs/method.md, never a file outside the repository."""
  assert os.path.isfile(os.path.join(ROOT, 'docs', 'method.md'))
  assert os.path.getsize(os.path.join(ROOT, 'README.md')) <= 16 * 1024
  for folder, dirs, files in os.walk(ROOT):
    dirs[:] = [d for d in dirs if not d.startswith('.')]
    for f in files:
      if f.endswith(('.py', '.md', '.ipynb', '.sh')):
        text = open(os.path.join(folder, f)).read()
        for outside in OUTSIDE:
          assert outside not in text, (f, outside)


BLOCKED = ('tensorflow_datasets', 'matplotlib', 'ml_collections', 'PIL', 'array_record',
           'importlib_resources')
LIBRARY_ONLY = '''
import sys
class Block:
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in %r:
      raise ImportError(f'{name} is blocked: the library must not need it')
sys.meta_path.insert(0, Block())
import flax.linen as nn, jax, numpy as np
import ptq_jax
class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.relu(nn.Conv(4, (3, 3))(x)).mean(axis=(1, 2)))
x = np.random.default_rng(0).normal(size=(16, 6, 6, 2)).astype(np.float32)
model = Net(); variables = model.init(jax.random.key(0), x)
qm = ptq_jax.quantize(model, variables, x, w_bits=4, a_bits=8, progress=False)
assert qm.predict(x).shape == (16, 3)
print('ok', sorted(m for m in sys.modules if m.split('.')[0] in %r))
''' % (BLOCKED, BLOCKED)


def test_the_library_runs_without_the_runners_and_datas_dependencies():
  """pyproject's core dependencies suffice for ``ptq_jax.quantize`` on a user's own model:
  with TFDS, matplotlib, ml_collections and Pillow unimportable, it still runs."""
  proc = subprocess.run([sys.executable, '-c', LIBRARY_ONLY], cwd='/', capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip() == 'ok []'


def test_the_core_dependencies_leave_out_the_runner_and_the_data():
  text = open(os.path.join(ROOT, 'pyproject.toml')).read()
  core = text[text.index('dependencies = ['):text.index(']', text.index('dependencies = ['))]
  for name in ('tensorflow-datasets', 'matplotlib', 'ml-collections', 'pillow'):
    assert name not in core, name
  assert not os.path.exists(os.path.join(ROOT, 'pytest.ini'))


def test_the_library_never_prints():
  """Progress goes through tqdm bars (``Prepared.progress``) and the 'ptq_jax' logger;
  only the runner (jobs/) prints."""
  offenders = []
  for folder, _, files in os.walk(PACKAGE):
    if os.path.basename(folder) == 'jobs':
      continue
    for f in files:
      if f.endswith('.py'):
        for node in ast.walk(ast.parse(open(os.path.join(folder, f)).read())):
          if isinstance(node, ast.Call) and getattr(node.func, 'id', None) == 'print':
            offenders.append(f'{f}:{node.lineno}')
  assert offenders == []


# Functions allowed past 60 lines or 8 parameters, and why. The three entry points take
# every setting as a keyword for users, each mapped onto one QuantSpec; the others are
# compiled programs whose static arguments jit caches on, or a signature fixed outside.
LONG_OR_WIDE = {
    'quantize.py:quantize': 'user-facing keywords, each a QuantSpec field',
    'pipelines.py:run_pipeline': 'user-facing keywords, each a QuantSpec field or a budget',
    'mixed_precision.py:mixed_precision': 'user-facing keywords, each a QuantSpec field',
    'stages/adaquant/layer.py:_fit_layer': 'jitted; static arguments key the compiled program',
    'stages/adaquant/layer.py:_steps': 'jitted; static arguments key the compiled program',
    'stages/adaquant/layer.py:optimize_layer': "one unit's inputs, settings, device, holdout",
    'stages/adaquant/rounding.py:_steps': 'jitted; static arguments key the compiled program',
    'stages/adaquant/shared.py:_shared_steps': 'jitted; static arguments key the program',
    'stages/adaquant/steps.py:run_loop': 'traced inside the jitted step programs above',
    'stages/adaquant/block.py:optimize_block': "one block's program, data, settings, holdout",
    'quant/attention.py:quantized_attention': "Flax's attention_fn signature",
    'deploy/integer.py:integer_attention': "Flax's attention_fn signature",
    'quant/interceptor.py:apply_quantized': 'the forward pass and its four optional hooks',
    'quant/interceptor.py:make_interceptor': 'the forward pass and its optional hooks',
    'quant/matmuls.py:apply_with_sites': 'the forward pass, how sites are named, its hooks',
}


def _function_sizes(root):
  """(module-relative 'path:name', lines, parameters) of every function under ``root``."""
  for folder, _, files in os.walk(root):
    for f in files:
      if not f.endswith('.py'):
        continue
      path = os.path.join(folder, f)
      for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
          a = node.args
          params = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
          count = len(params) - (params[:1] in (['self'], ['cls'])) + bool(a.vararg) \
              + bool(a.kwarg)
          yield (f'{os.path.relpath(path, root)}:{node.name}',
                 node.end_lineno - node.lineno + 1, count)


def test_no_library_function_is_long_or_wide_without_a_reason():
  """The library (not the runner in jobs/) keeps functions short and narrow; the few that
  are not are listed above with their reason, and the list holds nothing stale."""
  found = {name: (lines, params) for name, lines, params in _function_sizes(PACKAGE)
           if not name.startswith('jobs/') and (lines > 60 or params > 8)}
  assert sorted(set(found) - set(LONG_OR_WIDE)) == [], found
  assert sorted(set(LONG_OR_WIDE) - set(found)) == []
