"""The repository's promises about itself."""

import ast
import os
import re
import subprocess

MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60
# The commented config: one long list of fields, each with its comment.
LONG_BY_DESIGN = {('configs/alexnet.py', 'get_config'),
                  ('configs/alexnet.py', 'paper_config')}
# Library code: what `main.py` runs (not tests, not bench scripts).
LIBRARY = ('main.py', 'train.py', 'input_pipeline.py', 'alexnet/', 'configs/')
# A path to a Python or Markdown file, e.g. alexnet/model.py, docs/X.md.
CITED_PATH = re.compile(r'(?<![\w./-])((?:\.\./|[\w-]+/)*[\w-]+\.(?:py|md))\b')
# Project notes live in docs/; citing them anywhere else (or outside the
# repository) leaves a reader of a clone with a dead reference.
NOTES = ('REFERENCE.md', 'ENGINEERING.md', 'DESIGN.md')
# The applications built on the library: alexnet/ must never import them.
APPLICATIONS = ('main', 'train', 'input_pipeline', 'features', 'experiments',
                'bench')


def _read(repo, path):
  with open(os.path.join(repo, path)) as f:
    return f.read()


def _tracked(repo, suffix):
  """Files git tracks (or would: not ignored) under the repository."""
  listed = subprocess.run(
      ['git', 'ls-files', '--cached', '--others', '--exclude-standard'],
      cwd=repo, capture_output=True, text=True, check=True).stdout.split()
  return sorted(path for path in listed if path.endswith(suffix)
                and os.path.exists(os.path.join(repo, path)))


def test_ci_runs_exactly_the_readme_test_command(repo):
  ci_command = _read(repo, '.ci/run').strip().splitlines()[-1]
  readme_commands = re.findall(r'```(?:sh|bash)\n(.*?)\n```',
                               _read(repo, 'README.md'), re.S)
  assert ci_command in readme_commands


def test_requirements_are_pinned(repo):
  files = sorted(name for name in os.listdir(repo)
                 if re.fullmatch(r'requirements(-\w+)?\.txt', name))
  assert {'requirements.txt', 'requirements-gpu.txt', 'requirements-tpu.txt',
          'requirements-test.txt'} <= set(files), files
  for name in files:
    lines = [line.split('#')[0].strip()
             for line in _read(repo, name).splitlines()]
    requirements = [line for line in lines if line]
    assert requirements, name
    # Each file pins every package it adds; the others start from the CPU
    # set (`-r requirements.txt`), as the README's install lines expect.
    included = [line for line in requirements if line.startswith('-r ')]
    assert included == ([] if name == 'requirements.txt'
                        else ['-r requirements.txt']), name
    unpinned = [line for line in requirements if line not in included
                and not re.fullmatch(r'[A-Za-z0-9_.\-\[\]]+==[\w.]+', line)]
    assert not unpinned, (name, unpinned)


def test_the_cpu_set_needs_no_accelerator_package(repo):
  """A CPU-only user installs requirements.txt alone: no libtpu, no CUDA."""
  names = [line.split('==')[0].lower() for line in
           _read(repo, 'requirements.txt').splitlines()
           if '==' in line.split('#')[0]]
  assert not [name for name in names
              if 'tpu' in name or 'cuda' in name or 'pytest' in name], names


def test_every_file_the_code_cites_exists(repo):
  dead, misplaced = [], []
  this_file = os.path.relpath(__file__, repo)  # It names NOTES to refuse.
  for path in sorted(set(_tracked(repo, '.py')) - {this_file}):
    for number, line in enumerate(_read(repo, path).splitlines(), 1):
      for cited in CITED_PATH.findall(line):
        where = f'{path}:{number}: {cited}'
        if cited.startswith('../') or (
            os.path.basename(cited) in NOTES and not cited.startswith('docs/')):
          misplaced.append(where)
        elif not any(os.path.exists(os.path.join(base, cited)) for base in
                     (repo, os.path.join(repo, os.path.dirname(path)))):
          dead.append(where)
  assert not misplaced, ('cite docs/REFERENCE.md (in the repository), not '
                         f'notes outside docs/: {misplaced}')
  assert not dead, f'cited files that do not exist: {dead}'


def _function_lengths(tree):
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      yield node.name, node.end_lineno - node.lineno + 1


def test_modules_and_library_functions_are_short(repo):
  long_modules, long_functions = [], []
  for path in _tracked(repo, '.py'):
    source = _read(repo, path)
    if len(source.splitlines()) > MAX_MODULE_LINES:
      long_modules.append(f'{path}: {len(source.splitlines())} lines')
    if not path.startswith(LIBRARY):
      continue
    for name, length in _function_lengths(ast.parse(source, path)):
      if length > MAX_FUNCTION_LINES and (path, name) not in LONG_BY_DESIGN:
        long_functions.append(f'{path}: {name}, {length} lines')
  assert not long_modules + long_functions, long_modules + long_functions


def _imported_names(tree):
  """Every absolute module name `tree` imports, wherever the import sits.

  `import a.b`, `from a.b import c` (in functions too) and
  `importlib.import_module('a.b')` / `__import__('a.b')` with a literal name.
  """
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      yield from (alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.level == 0:
      yield node.module
    elif (isinstance(node, ast.Call) and node.args
          and isinstance(node.args[0], ast.Constant)
          and isinstance(node.args[0].value, str)
          and ast.unparse(node.func) in ('importlib.import_module',
                                         '__import__')):
      yield node.args[0].value


def _library_imports_of_applications(root):
  """'path:line' of each import of an application under root/alexnet/."""
  found = []
  for folder, _, files in os.walk(os.path.join(root, 'alexnet')):
    for name in sorted(f for f in files if f.endswith('.py')):
      path = os.path.join(folder, name)
      for module in _imported_names(ast.parse(_read(root, path), path)):
        if module.split('.')[0] in APPLICATIONS:
          found.append(f'{os.path.relpath(path, root)}: {module}')
  return found


def test_the_library_never_imports_the_applications(repo):
  assert not _library_imports_of_applications(repo), (
      'alexnet/ must not import main, train, input_pipeline, experiments or '
      f'bench: {_library_imports_of_applications(repo)}')


def test_the_import_check_finds_every_form_of_import(tmp_path):
  planted = {
      'alexnet/clean.py': 'import jax\nfrom alexnet import model\n'
                          'from . import steps\nimport trainer\n',
      'alexnet/a.py': 'import main\n',
      'alexnet/b.py': 'def f():\n  from train import x\n  return x\n',
      'alexnet/data/c.py': 'import experiments.figure1 as f\n',
      'alexnet/d.py': 'import importlib\n'
                      "m = importlib.import_module('input_pipeline')\n",
      'alexnet/e.py': 'from bench.resume import run\n',
  }
  for path, source in planted.items():
    os.makedirs(tmp_path / os.path.dirname(path), exist_ok=True)
    (tmp_path / path).write_text(source)
  assert sorted(_library_imports_of_applications(str(tmp_path))) == [
      'alexnet/a.py: main', 'alexnet/b.py: train',
      'alexnet/d.py: input_pipeline', 'alexnet/data/c.py: experiments.figure1',
      'alexnet/e.py: bench.resume']
