"""A run's workdir: refused if it cannot be one, created if missing.

One run at a time writes a workdir; its lock is alexnet/workdir_lock.py.
"""

import os

from alexnet import errors


def check_path(path: str) -> None:
  """Refuses a workdir that is a file (or lies under one).

  Args:
    path: the workdir, which need not exist yet.

  Raises:
    errors.WorkdirError: `path`, or a directory above it, is a file.
  """
  above = os.path.abspath(path)
  while not os.path.exists(above):
    above = os.path.dirname(above)
  if not os.path.isdir(above):
    raise errors.WorkdirError(
        f'--workdir {path}: {above} is a file, not a directory. Give a '
        'directory (it is created if missing).')


def ensure_directory(path: str) -> None:
  """Creates directory `path` if missing.

  Args:
    path: the directory.

  Raises:
    errors.WorkdirError: `path` (or a parent) is a file, or cannot be
      created.
  """
  check_path(path)
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as error:
    raise errors.WorkdirError(
        f'Cannot create the workdir {path}: {error.strerror} '
        f'({error.filename}). Give a --workdir you can write.') from None
