"""One run per workdir: a lock file that names its holder.

Two runs resuming from one workdir (a job started twice, or requeued while
the old one still runs) would write and clean up the same checkpoints: the
second one dies in orbax, or worse, corrupts the first one's. So a run takes
the lock `<directory>.lock` (e.g. <workdir>/checkpoints.lock) before it
opens its checkpoints for writing, and a second run is refused with the
holder's host and process id. Evaluating (read-only) takes no lock.

A lock whose holder died (SIGKILL, a lost node) never blocks the next run:

* holder on this machine and in this pid namespace (the same boot id and
  /proc/self/ns/pid, not merely the same hostname, which containers share;
  see alexnet/liveness.py): dead when its process is gone, a zombie, or
  its pid now belongs to another process (the process start time differs
  from the one recorded);
* any other holder (another host, or another container of this one): dead
  when its heartbeat is stale. The holder touches the lock file every
  `HEARTBEAT_SECONDS`; one not touched for `STALE_SECONDS` is dead. The
  file's modification time is compared with this host's clock, so clocks
  must agree to well within `STALE_SECONDS`.

A holder paused past the staleness limit (SIGSTOP, a VM pause, a network
partition of NFS) may so lose its lock to a new run. It checks at every
heartbeat and before every save that the lock is still its own; once it is
not, it saves nothing more and stops with one line naming the new holder
(`Lock.check`), so that the workdir never has two writers for longer than
a training step.

The lock file is created complete and atomically: written under a unique
name, then hard-linked to its final name, which fails if it exists, so a
reader never sees half a lock. Filesystems without hard links (gcsfuse)
create it with O_CREAT|O_EXCL instead, read back to check that this run's
record is the one there; a reader that finds a lock without a full record
takes it for one being written, not a dead one, until it is stale. A dead
lock is renamed away first, then its content checked to be the dead one;
a live lock moved so by a start racing another is put back only where no
lock is (never overwriting one), so two runs breaking it at once do not
both go on.

With several processes, process 0 holds the lock for the whole run and
every process learns the verdict (`hold`).
"""

import errno
import json
import os
import threading
import time
from typing import Any
import uuid

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from alexnet import errors
from alexnet import liveness
from alexnet import workdir

HEARTBEAT_SECONDS = 20.0
STALE_SECONDS = 120.0
_ATTEMPTS = 5  # Create-or-break rounds, for runs starting at the same time.
_WAIT_SECONDS = 0.2  # Between rounds, for a lock being written.
# os.link's errors on filesystems without hard links (gcsfuse: ENOSYS).
_NO_HARD_LINKS = {errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM}
# The fields of a full lock record, and their types.
_FIELDS = {'host': str, 'pid': int, 'token': str, 'lock': str, 'since': str}


def _valid(record: Any) -> bool:
  """Whether `record` is a full lock record (not a damaged or foreign one)."""
  return isinstance(record, dict) and all(
      isinstance(record.get(name), kind) for name, kind in _FIELDS.items())


class Lock:
  """The lock of one directory, held by one process at a time."""

  def __init__(self, directory: str, *,
               heartbeat_seconds: float | None = None,
               stale_seconds: float | None = None):
    """Names the lock; `acquire` takes it.

    Args:
      directory: what the lock stands for, e.g. <workdir>/checkpoints; the
        lock file is its sibling `<directory>.lock`.
      heartbeat_seconds: how often the holder touches the lock file
        (default `HEARTBEAT_SECONDS`).
      stale_seconds: a holder that cannot be checked directly and has not
        touched it for this long is dead (default `STALE_SECONDS`).
    """
    self.path = os.path.realpath(directory).rstrip('/') + '.lock'
    self._heartbeat_seconds = heartbeat_seconds or HEARTBEAT_SECONDS
    self._stale_seconds = stale_seconds or STALE_SECONDS
    self._record = {**liveness.this_machine(), 'pid': os.getpid(),
                    'identity': liveness.process_identity(os.getpid()),
                    'token': uuid.uuid4().hex, 'lock': self.path,
                    'since': time.strftime('%Y-%m-%d %H:%M:%S %Z')}
    self._stop = threading.Event()
    self._heartbeat: threading.Thread | None = None
    self._lost: str | None = None  # Why it is no longer ours, once it is not.

  def acquire(self) -> None:
    """Takes the lock, first breaking it if its holder is dead.

    One run is one process: where this process holds the lock already, the
    lock is shared (and stays until its first taker releases it).

    Raises:
      errors.WorkdirError: a live run holds it (naming its host and pid),
        or the directory or its lock cannot be written or read.
    """
    workdir.ensure_directory(os.path.dirname(self.path))
    found = None
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
      if _valid(holder) and all(
          holder.get(key) == self._record[key]
          for key in ('host', 'boot', 'pid_namespace', 'pid', 'identity',
                      'lock')):
        return  # This process holds it already (another writer object).
      death = self._death(holder, age)
      if death is not None:
        self._break(holder, death)
      elif _valid(holder):
        raise errors.WorkdirError(self._in_use(holder, age))
      else:
        time.sleep(_WAIT_SECONDS)  # Being written, or damaged: wait.
    if found is not None and not _valid(found[0]):
      raise errors.WorkdirError(
          f'The lock {self.path} holds no valid record, and was touched '
          f'{found[1]:.0f} s ago (taken as dead after '
          f'{self._stale_seconds:.0f} s). If no run uses '
          f'{os.path.dirname(self.path)}, delete the lock file; or wait.')
    raise errors.WorkdirError(
        f'Could not take the lock {self.path}: other runs are starting on '
        'this workdir at the same time. Start one run per workdir.')

  def _create(self) -> bool:
    """Creates the lock file complete, unless one exists."""
    content = json.dumps(self._record)
    unique = f'{self.path}.{self._record["token"]}'
    try:
      _write_new(unique, content)
      try:
        os.link(unique, self.path)  # Atomic; fails if the lock exists.
        return True
      except FileExistsError:
        return False
      except OSError as error:
        if error.errno not in _NO_HARD_LINKS:
          raise
      # No hard links here (gcsfuse): create it exclusively, then check
      # that the record there is this one.
      try:
        _write_new(self.path, content)
      except FileExistsError:
        return False
      found = self._read()
      return found is not None and found[0].get('token') == self._record[
          'token']
    except OSError as error:
      raise errors.WorkdirError(
          f'Cannot write the lock {self.path}: {error.strerror}. Give a '
          '--workdir you can write.') from None
    finally:
      try:
        os.remove(unique)
      except OSError:
        pass  # Not written, or a leftover that harms nothing.

  def _read(self, path: str | None = None
            ) -> tuple[dict[str, Any], float] | None:
    """(holder, seconds since its heartbeat), or None if there is none.

    The holder is {}, or a partial dict, when the file holds no full
    record (see `_valid`).

    Raises:
      errors.WorkdirError: the lock exists but cannot be read.
    """
    path = path or self.path
    try:
      with open(path) as f:
        age = time.time() - os.fstat(f.fileno()).st_mtime
        try:
          record = json.load(f)
        except ValueError:
          record = {}  # Half written, or damaged.
        return (record if isinstance(record, dict) else {}), age
    except FileNotFoundError:
      return None
    except OSError as error:
      raise errors.WorkdirError(
          f'Cannot read the lock {path}: {error.strerror}. Give a --workdir '
          'you can read and write.') from None

  def _same_machine(self, holder: dict[str, Any]) -> bool:
    """Whether the holder's pid can be looked up here."""
    mine = self._record
    same = all(holder.get(key) == mine[key]
               for key in ('boot', 'pid_namespace'))
    # Without procfs (boot and namespace ''), the hostname must do.
    return same and (bool(mine['boot']) or holder['host'] == mine['host'])

  def _death(self, holder: dict[str, Any], age: float) -> str | None:
    """Why the holder is dead, or None if it may be alive."""
    if not _valid(holder):
      # Never a live holder's for long: a record is written whole.
      if age > self._stale_seconds:
        return f'the lock file holds no valid record ({age:.0f} s old)'
      return None
    if self._same_machine(holder):
      if holder['lock'] != self.path:
        return 'the lock was copied from another directory'
      identity = liveness.process_identity(holder['pid'])
      if identity is None:
        return f'process {holder["pid"]} has ended'
      if identity != holder.get('identity'):
        return f'process id {holder["pid"]} now belongs to another process'
      return None
    if age > self._stale_seconds:
      return f'no heartbeat for {age:.0f} s'
    return None

  def _in_use(self, holder: dict[str, Any], age: float) -> str:
    where = f'process {holder["pid"]} on host {holder["host"]}'
    if holder['host'] == self._record['host'] and not self._same_machine(
        holder):
      where += ' (in another container or pid namespace)'
    return (
        f'{os.path.dirname(self.path)} is in use by another run: {where}, '
        f'since {holder["since"]} (lock {self.path}'
        + ('' if self._same_machine(holder) else
           f'; its heartbeat is {age:.0f} s old, taken as dead after '
           f'{self._stale_seconds:.0f} s')
        + '). Wait for it to end or stop it, or use another --workdir.')

  def _break(self, holder: dict[str, Any], death: str) -> None:
    """Removes the lock of a dead holder, unless another start did."""
    aside = f'{self.path}.dead.{self._record["token"]}'
    try:
      os.rename(self.path, aside)
    except FileNotFoundError:
      return  # Another start broke it first.
    except OSError as error:
      raise errors.WorkdirError(
          f'Cannot remove the lock {self.path} of a dead run ({death}): '
          f'{error.strerror}. Delete it if no run uses '
          f'{os.path.dirname(self.path)}, or use another --workdir.') from None
    moved = self._read(aside)
    if moved is not None and moved[0].get('token') != holder.get('token'):
      # Another start broke the dead lock and took it between our reading
      # and renaming: the lock moved is live. Put it back only where no
      # lock is: if a third start took the free path meanwhile, the moved
      # lock's holder finds that out at its next check and stops.
      try:
        _move_new(aside, self.path)
      except FileExistsError:
        _remove(aside)
      return
    _remove(aside)
    logging.warning('Took over the lock %s of a dead run (process %s on '
                    'host %s): %s.', self.path, holder.get('pid', '?'),
                    holder.get('host', '?'), death)

  def _beat(self) -> None:
    while not self._stop.wait(self._heartbeat_seconds):
      if not self._still_held():
        return
      try:
        os.utime(self.path)
      except OSError as error:
        logging.warning('Cannot refresh the lock %s (%s); another run may '
                        'take it.', self.path, error.strerror)

  def _still_held(self) -> bool:
    """Whether the lock file is still this one's; records why if not."""
    if self._lost is not None:
      return False
    try:
      found = self._read()
      if found is None or not _valid(found[0]):
        # A start breaking a dead lock at the same time may hold this live
        # one aside for an instant before putting it back (`_break`), and
        # where there are no hard links a new lock is written in place.
        time.sleep(_WAIT_SECONDS)
        found = self._read()
    except errors.WorkdirError as error:
      logging.warning('%s', error)
      return True  # Unreadable is not lost: the next beat looks again.
    if found is not None and found[0].get('token') == self._record['token']:
      return True
    if found is None:
      now = 'the lock file was removed'
    elif not _valid(found[0]):
      now = 'the lock file holds no full record now (damaged or overwritten)'
    else:
      now = (f'process {found[0]["pid"]} on host {found[0]["host"]} holds it '
             f'since {found[0]["since"]}')
    self._lost = (
        f'This run lost the lock {self.path} of its workdir: {now}, taken '
        'over after this run\'s heartbeat went stale (was it paused, or cut '
        'off from the storage?). It stops without saving more, to leave the '
        'workdir to one writer.')
    logging.warning('%s', self._lost)
    return False

  def check(self) -> None:
    """Refuses to go on once the lock is no longer this run's.

    Reads the lock file (a save must not follow a lost lock by even one
    heartbeat).

    Raises:
      errors.WorkdirError: another run holds it now (naming it), or the
        lock file was removed.
    """
    if not self._still_held():
      raise errors.WorkdirError(self._lost)

  @property
  def lost(self) -> bool:
    """Whether a heartbeat found the lock taken (no file access)."""
    return self._lost is not None

  def release(self) -> None:
    """Stops the heartbeat and removes the lock, if still this one's."""
    self._stop.set()
    if self._heartbeat is not None:
      self._heartbeat.join()
    try:
      found = self._read()
      if found is not None and found[0].get('token') == self._record['token']:
        os.remove(self.path)
    except (OSError, errors.WorkdirError) as error:
      logging.warning('Cannot remove the lock %s (%s); the next run takes '
                      'it over once its heartbeat is stale.', self.path,
                      getattr(error, 'strerror', None) or error)


def _remove(path: str) -> None:
  try:
    os.remove(path)
  except OSError as error:
    logging.warning('Cannot remove %s (%s).', path, error.strerror)


def _write_new(path: str, content: str) -> None:
  """Writes `path`, which must not exist (FileExistsError otherwise)."""
  descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
  with os.fdopen(descriptor, 'w') as f:
    f.write(content)
    f.flush()
    os.fsync(f.fileno())


def _move_new(source: str, destination: str) -> None:
  """Moves `source` to `destination` unless that exists (never over it)."""
  try:
    os.link(source, destination)
  except OSError as error:
    if error.errno not in _NO_HARD_LINKS:
      raise
    with open(source) as f:
      _write_new(destination, f.read())
  os.remove(source)


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
