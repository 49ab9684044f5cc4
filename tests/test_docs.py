"""Every documented command parses: its flags and config fields exist.

The fenced `sh` blocks of README.md and docs/*.md are what users paste. Each
command in them that runs `main.py`, a script under `experiments/` or one
under `bench/` is parsed here by that script's own parser, built from its
own source: absl flag definitions (with config files and their
`--config.FIELD` overrides, through ml_collections) or argparse arguments.
Nothing is trained or compiled, and the scripts are not imported (some set
XLA_FLAGS or JAX options when imported); only the names their parser
definitions use are.
"""

import argparse
import ast
import glob
import os
import re
import shlex

from absl import flags
import pytest

# A command runs one of these as `python PATH` or `python -m MODULE`.
SCRIPT = re.compile(r'(?:^|/)(main\.py|(?:experiments|bench)/\w+\.py)$')
MODULE = re.compile(r'^(?:experiments|bench)\.\w+$')
# absl calls that define a flag or a rule of the flags.
ABSL_CALLS = ('DEFINE', 'mark_flag', 'register_validator',
              'register_multi_flags_validator')
# Shell operators between commands.
OPERATORS = {'&&', '||', ';', '|', '&'}


def _documents(repo):
  """README.md and the pages of docs/."""
  return [os.path.join(repo, 'README.md')] + sorted(
      glob.glob(os.path.join(repo, 'docs', '*.md')))


def _shell_blocks(text):
  """The fenced ```sh blocks of a Markdown text, continuations joined."""
  return [block.replace('\\\n', ' ')
          for block in re.findall(r'^```sh\n(.*?)^```', text, re.S | re.M)]


def _script_commands(shell):
  """(script path, arguments) of each script command in shell text.

  Args:
    shell: lines of shell, possibly with `&&`, comments, environment
      assignments or a launcher (`srun ...`) before the script, and quoted
      commands passed to another program (`gcloud ... --command="..."`).

  Returns:
    The commands that run main.py, experiments/ or bench/.
  """
  found = []
  for line in shell.splitlines():
    lexer = shlex.shlex(line, posix=True, punctuation_chars=';&|')
    lexer.whitespace_split = True
    lexer.commenters = '#'
    words = list(lexer)
    command = []
    for word in words + [';']:
      if word not in OPERATORS:
        command.append(word)
        continue
      found += _script_in(command)
      command = []
    for word in words:  # A command quoted for another program.
      quoted = word.split('=', 1)[-1]
      if ' ' in quoted and re.search(r'main\.py|experiments|bench', quoted):
        found += _script_commands(quoted)
  return found


def _script_in(words):
  """[(script path, its arguments)] if `words` run a script, else []."""
  for i, word in enumerate(words):
    if SCRIPT.search(word) and i and 'python' in words[i - 1]:
      return [(SCRIPT.search(word)[1], words[i + 1:])]
    if word == '-m' and i + 1 < len(words) and MODULE.match(words[i + 1]):
      return [(words[i + 1].replace('.', '/') + '.py', words[i + 2:])]
  return []


class _Namespace(dict):
  """A script's module-level names, defined on first use from its source."""

  def __init__(self, tree, path):
    super().__init__(__doc__=ast.get_docstring(tree, clean=False),
                     __name__='documented_script', __file__=path)
    self._tree, self._path = tree, path

  def define(self, name):
    """Runs the module-level statement that binds `name` (an import, ...)."""
    for node in self._tree.body:
      if name in _bound_names(node):
        self.run([node])
        return
    raise NameError(f'{self._path} does not define {name!r}')

  def run(self, statements):
    """Runs statements here, defining the names each needs as it fails.

    A statement that fails for want of a name has not run its call yet (its
    arguments are evaluated first), so it is run again once it is defined.
    """
    for statement in statements:
      code = compile(ast.Module([statement], []), self._path, 'exec')
      while True:
        try:
          exec(code, self)  # pylint: disable=exec-used
          break
        except NameError as error:
          if error.name in self:
            raise
          self.define(error.name)


def _bound_names(node):
  """The names a module-level statement binds."""
  if isinstance(node, (ast.Import, ast.ImportFrom)):
    return {(alias.asname or alias.name).split('.')[0]
            for alias in node.names}
  if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
    return {node.name}
  if isinstance(node, (ast.Assign, ast.AnnAssign)):
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    return {target.id for target in targets if isinstance(target, ast.Name)}
  return set()


def _calls(tree, names):
  """Module-level calls of functions whose names start with one of `names`.

  Also those under a module-level `if`, such as `if __name__ == '__main__'`.
  """
  statements = []
  for node in tree.body:
    body = node.body if isinstance(node, ast.If) else [node]
    for statement in body:
      if isinstance(statement, (ast.Expr, ast.Assign)) and isinstance(
          statement.value, ast.Call) and isinstance(
              statement.value.func, ast.Attribute) and (
                  statement.value.func.attr.startswith(names)):
        statements.append(statement)
  return statements


def _parse_absl(tree, path, argv):
  """Parses argv with the script's absl flags, defined on fresh FlagValues."""
  flag_values = flags.FlagValues()
  namespace = _Namespace(tree, path)
  namespace['_doc_flag_values'], namespace['_doc_argv'] = flag_values, argv
  statements = _calls(tree, ABSL_CALLS)
  for statement in statements:
    call = statement.value
    call.keywords.append(ast.keyword(
        'flag_values', ast.Name('_doc_flag_values', ast.Load())))
    if call.func.attr.startswith('DEFINE_config'):
      # Overrides are read from this argv, not from sys.argv.
      call.keywords.append(ast.keyword(
          'sys_argv', ast.Name('_doc_argv', ast.Load())))
  namespace.run([ast.fix_missing_locations(s) for s in statements])
  left = flag_values(argv)
  if 'config' in flag_values:
    flag_values.config.keys()  # As main.py: a config file that fails, fails.
  if left[1:]:
    raise ValueError(f'arguments that are not flags: {left[1:]}')


def _parse_argparse(tree, path, argv):
  """Parses argv with the parser the script builds before parse_args."""
  for function in ast.walk(tree):
    if not isinstance(function, ast.FunctionDef):
      continue
    body = []
    for statement in function.body:
      if 'parse_args' in ast.unparse(statement):
        break
      body.append(statement)
    if any('ArgumentParser(' in ast.unparse(s) for s in body):
      namespace = _Namespace(tree, path)
      namespace.run(body)
      parser = next(v for v in namespace.values()
                    if isinstance(v, argparse.ArgumentParser))
      try:
        parser.parse_args(argv[1:])
      except SystemExit as error:  # argparse exits on a bad argument.
        raise ValueError(f'{path} refuses {argv[1:]}') from error
      return
  if argv[1:]:  # A script without a parser takes no arguments.
    raise ValueError(f'{path} takes no arguments: {argv[1:]}')


def _parse(repo, script, arguments):
  """Raises if the script's own parser refuses the arguments."""
  path = os.path.join(repo, script)
  with open(path) as f:
    source = f.read()
  tree = ast.parse(source, path)
  argv = [script] + arguments
  if 'argparse' in source:
    _parse_argparse(tree, path, argv)
  else:
    _parse_absl(tree, path, argv)


def _documented_commands(repo):
  """A test parameter (script, arguments) per documented script command."""
  commands = []
  for document in _documents(repo):
    with open(document) as f:
      for block in _shell_blocks(f.read()):
        for script, arguments in _script_commands(block):
          name = os.path.relpath(document, repo)
          commands.append(pytest.param(script, arguments,
                                       id=f'{name}: {script}'))
  return commands


_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_documents_have_commands(repo):
  scripts = {param.values[0] for param in _documented_commands(repo)}
  assert {'main.py', 'experiments/figure4.py', 'bench/train_step.py'} <= (
      scripts), scripts


@pytest.mark.parametrize('script,arguments', _documented_commands(_REPO))
def test_every_documented_command_parses(repo, monkeypatch, script,
                                         arguments):
  monkeypatch.chdir(repo)  # Config files are named from the root.
  _parse(repo, script, arguments)


@pytest.mark.parametrize('command', [
    'python main.py --config=configs/alexnet.py:digits --workdir=w '
    '--config.batch_sise=64',
    'python main.py --config=configs/alexnet.py:digits --workdir=w '
    '--config.lrn.kk=1',
    'python main.py --config=configs/alexnet.py:digits --workdir=w '
    '--config.seed=one',
    'python main.py --config=configs/alexnet.py:digitz --workdir=w',
    'python main.py --config=configs/alexnet.py --mode=prepare --data_dir=d',
    'python -m experiments.figure4 --config=configs/alexnet.py:fashion_mnist '
    '--workdir=w [--database=10000]',
    'python -m experiments.figure1 --config=configs/figure1.py --workdir=w '
    "--config.seedz='(2,)'",
    'python -m experiments.transfer --workdir=w --seedz=0',
    'python bench/train_step.py --variant=fashion_mnist --stepz=8',
    'python bench/resume.py --examples=10 extra',
])
def test_a_wrong_command_is_refused(repo, monkeypatch, command):
  monkeypatch.chdir(repo)
  [(script, arguments)] = _script_commands(command)
  with pytest.raises(Exception):  # Each parser raises its own kind.
    _parse(repo, script, arguments)


def _anchors(text):
  """GitHub's anchors of a Markdown text's headings."""
  text = re.sub(r'^```.*?^```', '', text, flags=re.S | re.M)
  return {re.sub(r'[^\w\- ]', '', title.strip().lower()).replace(' ', '-')
          for title in re.findall(r'^#+ (.*)$', text, re.M)}


def test_every_link_to_a_section_finds_it(repo):
  """Links such as docs/results.md#summary, within README.md and docs/."""
  dead = []
  for document in _documents(repo):
    with open(document) as f:
      text = f.read()
    for target, anchor in re.findall(r'\]\(([^)#\s]*)#([^)\s]+)\)', text):
      path = os.path.normpath(os.path.join(os.path.dirname(document),
                                           target)) if target else document
      if not os.path.exists(path):  # Pages of other changes; not anchors.
        continue
      with open(path) as f:
        if anchor not in _anchors(f.read()):
          dead.append(f'{os.path.relpath(document, repo)}: {target}#{anchor}')
  assert not dead, dead


def test_commands_are_found_where_users_write_them():
  shell = ('python3 -m venv .venv && .venv/bin/pip install -r r.txt && '
           '.venv/bin/python main.py --config=c  # a comment\n'
           'JAX_PROCESS_ID=0 srun -n 2 python -m bench.ablations --seeds=1\n'
           'gcloud x ssh N --command="cd a && .venv/bin/python main.py '
           '--mode=eval"\n'
           'python -m pytest -q tests\n')
  assert _script_commands(shell) == [
      ('main.py', ['--config=c']), ('bench/ablations.py', ['--seeds=1']),
      ('main.py', ['--mode=eval'])]
