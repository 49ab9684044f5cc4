"""The repository's promises about itself."""

import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(path):
  with open(os.path.join(REPO, path)) as f:
    return f.read()


def test_ci_runs_exactly_the_readme_test_command():
  ci_command = _read('.ci/run').strip().splitlines()[-1]
  readme_commands = re.findall(r'```(?:sh|bash)\n(.*?)\n```', _read('README.md'),
                               re.S)
  assert ci_command in readme_commands


def test_requirements_are_pinned():
  lines = [line.split('#')[0].strip() for line in
           _read('requirements.txt').splitlines()]
  requirements = [line for line in lines if line]
  assert requirements
  assert all(re.fullmatch(r'[A-Za-z0-9_.\-\[\]]+==[\w.]+', line)
             for line in requirements), requirements
