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
  lines = [line.split('#')[0].strip() for line in
           _read(repo, 'requirements.txt').splitlines()]
  requirements = [line for line in lines if line]
  assert requirements
  assert all(re.fullmatch(r'[A-Za-z0-9_.\-\[\]]+==[\w.]+', line)
             for line in requirements), requirements


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
