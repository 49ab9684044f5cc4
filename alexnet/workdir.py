"""One run per workdir: a lock file that names its holder.

Two runs resuming from one workdir (a job started twice, or requeued while
the old one still runs) would write and clean up the same checkpoints: the
second one dies in orbax, or worse, corrupts the first one's. So a run takes
the lock `<directory>.lock` (e.g. <workdir>/checkpoints.lock) before it
opens its checkpoints for writing, and a second run is refused with the
holder's host and process id. Evaluating (read-only) takes no lock.

A lock whose holder died (SIGKILL, a lost node) never blocks the next run:

* holder on this host: dead when its process is gone, a zombie, or its pid
  now belongs to another process (Linux: the process start time, with the
  boot id, differs from the one recorded);
* holder on another host: dead when its heartbeat is stale. The holder
  touches the lock file every `heartbeat_seconds`; one not touched for
  `stale_seconds` is dead. The file's modification time is compared with
  this host's clock, so clocks must agree to well within `stale_seconds`.

The lock file is created complete and atomically (written under a unique
name, then hard-linked to its final name, which fails if it exists), so a
reader never sees half a lock. A dead lock is renamed away first, then its
content checked to be the dead one, so that two runs breaking it at once
do not both go on.

With several processes, process 0 holds the lock for the whole run and
every process learns the verdict (`hold`).
"""

import json
import os
import socket
import threading
import time
from typing import Any
import uuid

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from alexnet import errors

HEARTBEAT_SECONDS = 20.0
STALE_SECONDS = 120.0
_ATTEMPTS = 5  # Create-or-break rounds, for runs starting at the same time.


def _boot_id() -> str:
  try:
    with open('/proc/sys/kernel/random/boot_id') as f:
      return f.read().strip()
  except OSError:
    return ''


def process_identity(pid: int) -> str | None:
  """What tells process `pid` apart from a later one with the same pid.

  Args:
    pid: a process id on this host.

  Returns:
    None if no such process runs (or it is a zombie). On Linux, the boot id
    and the process start time; elsewhere '' for any live process.
  """
  if not os.path.isdir('/proc/self'):  # No procfs: the pid alone.
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      return None
    except PermissionError:
      pass  # Alive, but another user's.
    return ''
  try:
    with open(f'/proc/{pid}/stat') as f:
      stat = f.read()
  except OSError:
    return None
  # Fields after the command name (which may hold spaces and parentheses):
  # state is field 3, starttime field 22.
  fields = stat[stat.rindex(')') + 2:].split()
  if fields[0] in ('Z', 'X'):  # Killed, not yet reaped by its parent.
    return None
  return f'{_boot_id()}/{fields[19]}'


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


class Lock:
  """The lock of one directory, held by one process at a time."""

  def __init__(self, directory: str, *,
               heartbeat_seconds: float = HEARTBEAT_SECONDS,
               stale_seconds: float = STALE_SECONDS):
    """Names the lock; `acquire` takes it.

    Args:
      directory: what the lock stands for, e.g. <workdir>/checkpoints; the
        lock file is its sibling `<directory>.lock`.
      heartbeat_seconds: how often the holder touches the lock file.
      stale_seconds: a holder on another host that has not touched it for
        this long is dead.
    """
    self.path = os.path.realpath(directory).rstrip('/') + '.lock'
    self._heartbeat_seconds = heartbeat_seconds
    self._stale_seconds = stale_seconds
    self._record = {'host': socket.gethostname(), 'pid': os.getpid(),
                    'identity': process_identity(os.getpid()),
                    'token': uuid.uuid4().hex, 'lock': self.path,
                    'since': time.strftime('%Y-%m-%d %H:%M:%S %Z')}
    self._stop = threading.Event()
    self._heartbeat: threading.Thread | None = None

  def acquire(self) -> None:
    """Takes the lock, first breaking it if its holder is dead.

    One run is one process: where this process holds the lock already, the
    lock is shared (and stays until its first taker releases it).

    Raises:
      errors.WorkdirError: a live run holds it (naming its host and pid),
        or the directory cannot be written.
    """
    ensure_directory(os.path.dirname(self.path))
    for _ in range(_ATTEMPTS):
      if self._create():
        self._heartbeat = threading.Thread(
            target=self._beat, name='workdir-lock-heartbeat', daemon=True)
        self._heartbeat.start()
        return
      found = self._read()
      if found is None:
        continue  # Released meanwhile: try again.
      holder, age = found
      if all(holder.get(key) == self._record[key]
             for key in ('host', 'pid', 'identity', 'lock')):
        return  # This process holds it already (another writer object).
      death = self._death(holder, age)
      if death is None:
        raise errors.WorkdirError(self._in_use(holder, age))
      self._break(holder, death)
    raise errors.WorkdirError(
        f'Could not take the lock {self.path}: other runs are starting on '
        'this workdir at the same time. Start one run per workdir.')

  def _create(self) -> bool:
    """Creates the lock file complete, unless one exists."""
    unique = f'{self.path}.{self._record["token"]}'
    try:
      with open(unique, 'w') as f:
        json.dump(self._record, f)
      os.link(unique, self.path)  # Atomic; fails if the lock exists.
      return True
    except FileExistsError:
      return False
    except OSError as error:
      raise errors.WorkdirError(
          f'Cannot write in the workdir {os.path.dirname(self.path)}: '
          f'{error.strerror}. Give a --workdir you can write.') from None
    finally:
      if os.path.exists(unique):
        os.remove(unique)

  def _read(self, path: str | None = None
            ) -> tuple[dict[str, Any], float] | None:
    """(holder, seconds since its heartbeat), or None if there is none."""
    try:
      with open(path or self.path) as f:
        age = time.time() - os.fstat(f.fileno()).st_mtime
        try:
          return json.load(f), age
        except ValueError:
          return {}, age  # Damaged: no live holder wrote this.
    except FileNotFoundError:
      return None

  def _death(self, holder: dict[str, Any], age: float) -> str | None:
    """Why the holder is dead, or None if it may be alive."""
    if not holder:
      return 'the lock file is unreadable'
    if holder['host'] == self._record['host']:
      if holder['lock'] != self.path:
        return 'the lock was copied from another directory'
      identity = process_identity(holder['pid'])
      if identity is None:
        return f'process {holder["pid"]} has ended'
      if identity != holder['identity']:
        return f'process id {holder["pid"]} now belongs to another process'
      return None
    if age > self._stale_seconds:
      return f'no heartbeat for {age:.0f} s'
    return None

  def _in_use(self, holder: dict[str, Any], age: float) -> str:
    where = f'process {holder["pid"]} on host {holder["host"]}'
    remote = holder['host'] != self._record['host']
    return (
        f'{os.path.dirname(self.path)} is in use by another run: {where}, '
        f'since {holder["since"]} (lock {self.path}'
        + (f'; its heartbeat is {age:.0f} s old, taken as dead after '
           f'{self._stale_seconds:.0f} s' if remote else '')
        + '). Wait for it to end or stop it, or use another --workdir.')

  def _break(self, holder: dict[str, Any], death: str) -> None:
    """Removes the lock of a dead holder, unless another start did."""
    aside = f'{self.path}.dead.{self._record["token"]}'
    try:
      os.rename(self.path, aside)
    except FileNotFoundError:
      return  # Another start broke it first.
    moved = self._read(aside)
    if moved is not None and moved[0].get('token') != holder.get('token'):
      # Another start broke the dead lock and took it between our reading
      # and renaming: the lock moved is live. Put it back.
      os.rename(aside, self.path)
      return
    os.remove(aside)
    logging.warning('Took over the lock %s of a dead run (process %s on '
                    'host %s): %s.', self.path, holder.get('pid', '?'),
                    holder.get('host', '?'), death)

  def _beat(self) -> None:
    while not self._stop.wait(self._heartbeat_seconds):
      try:
        os.utime(self.path)
      except OSError as error:
        logging.warning('Cannot refresh the lock %s (%s); another run may '
                        'take it.', self.path, error)

  def release(self) -> None:
    """Stops the heartbeat and removes the lock, if still this one's."""
    self._stop.set()
    if self._heartbeat is not None:
      self._heartbeat.join()
    found = self._read()
    if found is not None and found[0].get('token') == self._record['token']:
      os.remove(self.path)


def hold(directory: str, **timing: float) -> Lock | None:
  """Takes `directory`'s lock for the run: process 0 holds it for all.

  Called by all processes together (a collective when there are several).

  Args:
    directory: e.g. <workdir>/checkpoints.
    **timing: heartbeat_seconds and stale_seconds, see `Lock`.

  Returns:
    The lock on process 0 (release it at the end), None on the others.

  Raises:
    errors.WorkdirError: on every process, when a live run holds it or
      process 0 cannot write the workdir.
  """
  lock, refusal = None, None
  if jax.process_index() == 0:
    lock = Lock(directory, **timing)
    try:
      lock.acquire()
    except errors.UserError as error:
      lock, refusal = None, error
  if jax.process_count() > 1:
    refused = multihost_utils.broadcast_one_to_all(
        np.int32(refusal is not None))
    if int(refused) and refusal is None:
      refusal = errors.WorkdirError(
          f'{directory} cannot be used: process 0 could not take its lock '
          f'{directory.rstrip("/")}.lock (the reason is in its log).')
  if refusal is not None:
    raise refusal
  return lock
