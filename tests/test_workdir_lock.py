"""The workdir lock, in this process: live, dead and remote holders.

Forged lock files stand for holders that ended, run on another host or in
another pid namespace, or are half written; a race of three starts on one
dead lock is replayed step by step. `main.py` processes meeting the lock (a
second run, a killed run's lock, a paused holder) are in test_workdir.py.
"""

import errno
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest

from alexnet import checkpoints
from alexnet import errors
from alexnet import liveness
from alexnet import workdir_lock

HOST = socket.gethostname()
# Another machine: another hostname and boot id.
ELSEWHERE = {'host': 'elsewhere', 'boot': 'another-boot-id'}


def _forge(held, **fields):
  """Writes the file of lock `held` as a holder with `fields` would."""
  record = {**liveness.this_machine(), 'pid': os.getpid(),
            'identity': liveness.process_identity(os.getpid()),
            'token': 'forged', 'lock': held.path, 'since': 'earlier'}
  record.update(fields)
  # Written aside and moved in, so that a heartbeat never reads it half done.
  with open(held.path + '.forged', 'w') as f:
    json.dump(record, f)
  os.replace(held.path + '.forged', held.path)


def _age(path, seconds):
  """Sets the lock file's heartbeat `seconds` in the past."""
  old = time.time() - seconds
  os.utime(path, (old, old))


def _ended_pid():
  process = subprocess.Popen(['true'])
  process.wait()  # Reaped: its pid now names no process.
  return process.pid


def test_a_held_lock_refuses_a_second_holder_but_not_a_reader(tmp_path):
  directory = str(tmp_path / 'run' / 'checkpoints')
  lock = workdir_lock.Lock(directory)
  os.makedirs(tmp_path / 'run')
  other = subprocess.Popen(['sleep', '600'])  # Another live process.
  try:
    _forge(lock, pid=other.pid, identity=liveness.process_identity(other.pid))
    with pytest.raises(errors.WorkdirError,
                       match=f'in use by another run: process {other.pid} '
                       f'on host {re.escape(HOST)}, since earlier'):
      lock.acquire()
    with pytest.raises(errors.WorkdirError, match='in use by another run'):
      checkpoints.Checkpoints(directory, keep=1)
    reader = checkpoints.Checkpoints(directory, keep=1, read_only=True)
    with pytest.raises(errors.WorkdirError, match='No checkpoint in'):
      reader.find('latest')  # Reading needs no lock.
    reader.close()
  finally:
    other.kill()
    other.wait()
  store = checkpoints.Checkpoints(directory, keep=1)  # Its holder ended.
  # One process is one run: a second writer in it shares the lock.
  checkpoints.Checkpoints(directory, keep=1).close()
  assert os.path.exists(lock.path)
  store.close()
  assert os.listdir(tmp_path / 'run') == ['checkpoints']


@pytest.mark.parametrize('holder,death', [
    (lambda: {'pid': _ended_pid()}, r'process \d+ has ended'),
    (lambda: {'identity': 'another boot/0'},
     r'process id \d+ now belongs to another process'),
    (lambda: {'lock': '/elsewhere/checkpoints.lock'},
     'the lock was copied from another directory'),
])
def test_the_lock_of_a_dead_holder_on_this_host_is_taken_over(
    tmp_path, caplog, holder, death):
  lock = workdir_lock.Lock(str(tmp_path / 'checkpoints'))
  _forge(lock, **holder())
  lock.acquire()
  assert re.search(f'Took over the lock .* of a dead run .*: {death}',
                   caplog.text), caplog.text
  with open(lock.path) as f:
    assert json.load(f)['token'] != 'forged'
  lock.release()
  assert os.listdir(tmp_path) == []


def test_another_hosts_lock_is_dead_once_its_heartbeat_is_stale(
    tmp_path, caplog):
  lock = workdir_lock.Lock(str(tmp_path / 'checkpoints'), stale_seconds=60)
  _forge(lock, **ELSEWHERE, pid=4242)
  with pytest.raises(errors.WorkdirError,
                     match=r'process 4242 on host elsewhere, since earlier '
                     r'.*its heartbeat is \d s old, taken as dead after 60 s'):
    lock.acquire()
  old = time.time() - 61
  os.utime(lock.path, (old, old))
  lock.acquire()
  assert re.search(r'process 4242 on host elsewhere\): no heartbeat for '
                   r'6\d s', caplog.text), caplog.text
  lock.release()


def test_the_holder_refreshes_its_heartbeat(tmp_path):
  lock = workdir_lock.Lock(str(tmp_path / 'checkpoints'),
                           heartbeat_seconds=0.05)
  lock.acquire()
  os.utime(lock.path, (0, 0))
  deadline = time.monotonic() + 30
  while os.stat(lock.path).st_mtime == 0:
    assert time.monotonic() < deadline, 'no heartbeat'
    time.sleep(0.05)
  assert time.time() - os.stat(lock.path).st_mtime < 30
  lock.release()


def test_a_holder_in_another_pid_namespace_is_alive_until_stale(
    tmp_path, caplog):
  """Two containers of one host share its hostname, not their pids: a pid
  that has ended here may be a live run's there."""
  lock = workdir_lock.Lock(str(tmp_path / 'checkpoints'), stale_seconds=60)
  _forge(lock, pid=_ended_pid(), pid_namespace='pid:[4026530000]')
  with pytest.raises(errors.WorkdirError,
                     match=r'on host .* \(in another container or pid '
                     r'namespace\), since earlier .*its heartbeat is \d s '
                     r'old, taken as dead after 60 s'):
    lock.acquire()
  _age(lock.path, 61)
  lock.acquire()
  assert re.search(r'Took over .*: no heartbeat for 6\d s', caplog.text)
  lock.release()


@pytest.mark.parametrize('content', [
    '{"host": "elsewhere"}', '[]', '{"host": "h", "pid": "1", "token": '
    '"t", "lock": "l", "since": "s"}', '{"ho'])
def test_a_lock_without_a_full_record_is_one_line_until_stale(
    tmp_path, caplog, content, monkeypatch):
  monkeypatch.setattr(workdir_lock, '_WAIT_SECONDS', 0.01)
  lock = workdir_lock.Lock(str(tmp_path / 'checkpoints'), stale_seconds=60)
  with open(lock.path, 'w') as f:
    f.write(content)
  # Fresh: perhaps a lock being written (where there are no hard links).
  with pytest.raises(errors.WorkdirError,
                     match=r'The lock .* holds no valid record, and was '
                     r'touched \d s ago \(taken as dead after 60 s\)\. If no '
                     'run uses .*, delete the lock file; or wait.'):
    lock.acquire()
  _age(lock.path, 61)
  lock.acquire()
  assert re.search(r'Took over .*\(process \S+ on host \S+\): the lock file '
                   r'holds no valid record \(6\d s old\)', caplog.text)
  lock.release()
  assert os.listdir(tmp_path) == []


def test_a_lock_that_cannot_be_read_is_one_line(tmp_path):
  """A directory where the lock file should be: reading it fails with
  IsADirectoryError (an OSError, as EACCES would be)."""
  lock = workdir_lock.Lock(str(tmp_path / 'checkpoints'))
  os.makedirs(lock.path)
  with pytest.raises(errors.WorkdirError,
                     match=f'Cannot read the lock {re.escape(lock.path)}: Is '
                     'a directory'):
    lock.acquire()


# Breaks a stale lock of another user in a sticky directory that is not
# this user's: the rename is refused (EPERM). Root may rename anything, so
# the script runs without CAP_FOWNER and CAP_DAC_OVERRIDE (setpriv).
_BREAK_IN_STICKY = """
import sys
from alexnet import errors, workdir_lock
lock = workdir_lock.Lock(sys.argv[1], stale_seconds=1)
try:
  lock.acquire()
  print('acquired')
except errors.WorkdirError as error:
  print('error:', error)
"""


def test_a_dead_lock_that_cannot_be_removed_is_one_line(repo, tmp_path):
  if os.geteuid() != 0 or not shutil.which('setpriv'):
    pytest.skip('needs root (to give files away) and setpriv')
  sticky = tmp_path / 'sticky'
  sticky.mkdir()
  lock = workdir_lock.Lock(str(sticky / 'checkpoints'))
  _forge(lock, **ELSEWHERE)
  _age(lock.path, 60)
  nobody = 65534
  os.chown(lock.path, nobody, nobody)
  os.chown(sticky, nobody, nobody)
  sticky.chmod(0o1777)
  done = subprocess.run(
      ['setpriv', '--bounding-set=-fowner,-dac_override', sys.executable,
       '-c', _BREAK_IN_STICKY, str(sticky / 'checkpoints')],
      cwd=repo, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr[-3000:]
  assert re.fullmatch(
      f'error: Cannot remove the lock {re.escape(lock.path)} of a dead run '
      r'\(no heartbeat for 6\d s\): Operation not permitted\. Delete it if no '
      f'run uses {re.escape(str(sticky))}, or use another --workdir\\.',
      done.stdout.strip()), done.stdout


def test_without_hard_links_the_lock_still_works(tmp_path, monkeypatch,
                                                 caplog):
  """gcsfuse has no hard links: os.link fails with ENOSYS there (mocked
  here: no such filesystem is mounted on the test machine)."""
  def no_links(*args):
    raise OSError(errno.ENOSYS, 'Function not implemented')
  monkeypatch.setattr(os, 'link', no_links)
  directory = str(tmp_path / 'checkpoints')
  lock = workdir_lock.Lock(directory)
  lock.acquire()
  assert os.listdir(tmp_path) == ['checkpoints.lock']
  other = subprocess.Popen(['sleep', '600'])
  try:
    with pytest.raises(errors.WorkdirError, match='in use by another run'):
      second = workdir_lock.Lock(directory)
      second._record['pid'] = other.pid  # Another live process's start.
      second._record['identity'] = liveness.process_identity(other.pid)
      second.acquire()
  finally:
    other.kill()
    other.wait()
  lock.release()
  assert os.listdir(tmp_path) == []
  _forge(lock, pid=_ended_pid())  # A dead run's lock is broken, too.
  lock = workdir_lock.Lock(directory)
  lock.acquire()
  assert 'Took over the lock' in caplog.text
  lock.release()
  assert os.listdir(tmp_path) == []


def test_three_starts_on_one_dead_lock_leave_one_holder(tmp_path,
                                                        monkeypatch):
  """A reads the dead lock; B breaks and takes it; A, late, renames B's
  live lock aside; C finds no lock and takes it; A must not put B's back
  over C's. B learns it lost the lock."""
  directory = str(tmp_path / 'checkpoints')
  starts = {name: workdir_lock.Lock(directory, heartbeat_seconds=600)
            for name in 'ABC'}
  _forge(starts['A'], pid=_ended_pid())
  dead, _ = starts['A']._read()
  starts['B'].acquire()
  rename = os.rename

  def rename_then_c_starts(source, destination):
    rename(source, destination)
    if '.dead.' in destination:
      starts['C'].acquire()
  monkeypatch.setattr(os, 'rename', rename_then_c_starts)
  starts['A']._break(dead, 'process has ended')
  monkeypatch.undo()
  with open(starts['A'].path) as f:
    assert json.load(f)['token'] == starts['C']._record['token']
  with pytest.raises(errors.WorkdirError, match='This run lost the lock'):
    starts['B'].check()
  starts['C'].check()
  for lock in starts.values():
    lock.release()
  assert os.listdir(tmp_path) == []


def test_a_lock_taken_over_stops_the_heartbeat_and_is_one_line(tmp_path):
  lock = workdir_lock.Lock(str(tmp_path / 'checkpoints'),
                           heartbeat_seconds=0.02)
  lock.acquire()
  lock.check()
  _forge(lock, **ELSEWHERE, pid=4242, since='just now')
  _age(lock.path, 5)
  deadline = time.monotonic() + 30
  while not lock.lost:
    assert time.monotonic() < deadline, 'the heartbeat did not notice'
    time.sleep(0.02)
  with pytest.raises(errors.WorkdirError) as refused:
    lock.check()
  assert str(refused.value).startswith(
      f'This run lost the lock {lock.path} of its workdir: process 4242 on '
      'host elsewhere holds it since just now')
  assert '\n' not in str(refused.value)
  time.sleep(0.1)
  assert time.time() - os.stat(lock.path).st_mtime > 4  # Not refreshed.
  lock.release()
  with open(lock.path) as f:
    assert json.load(f)['pid'] == 4242  # The new holder's, left alone.


def test_a_lock_caught_half_written_is_read_again_not_lost(tmp_path,
                                                          monkeypatch):
  # Without hard links a new lock is written in place: a heartbeat can find
  # it empty. Still held if the write ends while it waits; lost if not.
  lock = workdir_lock.Lock(str(tmp_path / 'checkpoints'))
  lock.acquire()
  with open(lock.path) as f:
    whole = f.read()
  open(lock.path, 'w').close()
  monkeypatch.setattr(workdir_lock.time, 'sleep',
                      lambda seconds: _write(lock.path, whole))
  lock.check()
  assert not lock.lost
  open(lock.path, 'w').close()
  monkeypatch.setattr(workdir_lock.time, 'sleep', lambda seconds: None)
  with pytest.raises(errors.WorkdirError,
                     match='the lock file holds no full record now'):
    lock.check()
  monkeypatch.undo()
  lock.release()


def _write(path, content):
  with open(path, 'w') as f:
    f.write(content)
