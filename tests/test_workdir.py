"""One run per workdir, and refusals of a bad command line or workdir.

The lock is checked in this process where that suffices (forged locks of
dead or remote holders) and with real `main.py` processes where it matters:
a second run on a workdir in use, and a run after a SIGKILL.
"""

import errno
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from alexnet import checkpoints
from alexnet import errors
from alexnet import workdir
import main
import processes
import train

HOST = socket.gethostname()
# Another machine: another hostname and boot id.
ELSEWHERE = {'host': 'elsewhere', 'boot': 'another-boot-id'}


def _forge(held, **fields):
  """Writes the file of lock `held` as a holder with `fields` would."""
  record = {**workdir.this_machine(), 'pid': os.getpid(),
            'identity': workdir.process_identity(os.getpid()),
            'token': 'forged', 'lock': held.path, 'since': 'earlier'}
  record.update(fields)
  with open(held.path, 'w') as f:
    json.dump(record, f)


def _age(path, seconds):
  """Sets the lock file's heartbeat `seconds` in the past."""
  old = time.time() - seconds
  os.utime(path, (old, old))


def _ended_pid():
  process = subprocess.Popen(['true'])
  process.wait()  # Reaped: its pid now names no process.
  return process.pid


# --- The lock, in this process --------------------------------------------


def test_a_held_lock_refuses_a_second_holder_but_not_a_reader(tmp_path):
  directory = str(tmp_path / 'run' / 'checkpoints')
  lock = workdir.Lock(directory)
  os.makedirs(tmp_path / 'run')
  other = subprocess.Popen(['sleep', '600'])  # Another live process.
  try:
    _forge(lock, pid=other.pid, identity=workdir.process_identity(other.pid))
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
  lock = workdir.Lock(str(tmp_path / 'checkpoints'))
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
  lock = workdir.Lock(str(tmp_path / 'checkpoints'), stale_seconds=60)
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
  lock = workdir.Lock(str(tmp_path / 'checkpoints'), heartbeat_seconds=0.05)
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
  lock = workdir.Lock(str(tmp_path / 'checkpoints'), stale_seconds=60)
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
  monkeypatch.setattr(workdir, '_WAIT_SECONDS', 0.01)
  lock = workdir.Lock(str(tmp_path / 'checkpoints'), stale_seconds=60)
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
  lock = workdir.Lock(str(tmp_path / 'checkpoints'))
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
from alexnet import errors, workdir
lock = workdir.Lock(sys.argv[1], stale_seconds=1)
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
  lock = workdir.Lock(str(sticky / 'checkpoints'))
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
  lock = workdir.Lock(directory)
  lock.acquire()
  assert os.listdir(tmp_path) == ['checkpoints.lock']
  other = subprocess.Popen(['sleep', '600'])
  try:
    with pytest.raises(errors.WorkdirError, match='in use by another run'):
      second = workdir.Lock(directory)
      second._record['pid'] = other.pid  # Another live process's start.
      second._record['identity'] = workdir.process_identity(other.pid)
      second.acquire()
  finally:
    other.kill()
    other.wait()
  lock.release()
  assert os.listdir(tmp_path) == []
  _forge(lock, pid=_ended_pid())  # A dead run's lock is broken, too.
  lock = workdir.Lock(directory)
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
  starts = {name: workdir.Lock(directory, heartbeat_seconds=600)
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
  lock = workdir.Lock(str(tmp_path / 'checkpoints'), heartbeat_seconds=0.02)
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


def test_a_workdir_that_is_a_file_or_unwritable_is_refused(tmp_path):
  (tmp_path / 'file').write_text('')
  for path in (tmp_path / 'file', tmp_path / 'file' / 'run'):
    with pytest.raises(errors.WorkdirError, match=f'{tmp_path / "file"} is '
                       'a file, not a directory'):
      workdir.check_path(str(path))
    with pytest.raises(errors.WorkdirError, match='is a file'):
      workdir.Lock(str(path / 'checkpoints')).acquire()
  if os.geteuid() == 0:  # Root writes anywhere a filesystem lets it.
    unwritable = '/sys/alexnet-test-run'
  else:
    unwritable = str(tmp_path / 'read_only' / 'run')
    os.makedirs(os.path.dirname(unwritable), mode=0o500)
  with pytest.raises(errors.WorkdirError,
                     match=r'Cannot create the workdir .*Give a --workdir '
                     'you can write'):
    workdir.Lock(os.path.join(unwritable, 'checkpoints')).acquire()


# --- The command line ------------------------------------------------------


@pytest.fixture
def parse(monkeypatch):
  """parse(*flags): main.py's refusal of those flags, parsed here."""
  def refusal(*flags):
    argv = ['main.py', *flags]
    monkeypatch.setattr(sys, 'argv', argv)  # Where config overrides are read.
    try:
      with pytest.raises(SystemExit) as exit_:
        main.parse_flags(argv)
    finally:
      main.FLAGS.unparse_flags()
    return exit_.value.code
  return refusal


def test_each_bad_flag_is_refused_in_one_line(parse, tmp_path):
  tiny = '--config=configs/alexnet.py:tiny'
  # Config files (named without a literal suffix, which test_repo.py would
  # take for a citation of a repository file).
  missing, syntax, raises = (str(tmp_path / name) + '.py'
                             for name in ('missing', 'syntax', 'raises'))
  with open(syntax, 'w') as f:
    f.write('def get_config(:\n')
  with open(raises, 'w') as f:
    f.write('def get_config():\n  return {}[0]\n')
  for flags, message in [
      ((tiny, '--config.learning_rat=0.1'),
       "--config.learning_rat: config has no field 'learning_rat'; did you "
       'mean --config.learning_rate'),
      ((tiny, '--config.width.x=1'),
       "--config.width.x: config.width has no field 'x'."),
      ((tiny, '--config.seed=one'),
       "flag --config.seed=one: invalid literal for int() with base 10: "
       "'one' (--helpshort lists the flags)."),
      (('--config=configs/alexnet.py:tinny',),
       "--config: cannot load the config file (ValueError: Unknown config "
       "variant 'tinny'; choose one of"),
      ((f'--config={missing}',),
       '--config: cannot load the config file (OSError: [Errno 2] No such '
       f"file or directory: '{missing}')."),
      ((f'--config={syntax}',),
       '--config: cannot load the config file (SyntaxError: '),
      ((f'--config={raises}',),
       '--config: cannot load the config file (KeyError: 0).'),
  ]:
    code = parse(*flags, '--workdir=runs/x')
    assert isinstance(code, str) and code.startswith(f'error: {message}'), (
        code)
    assert '\n' not in code, code


def test_a_workdir_that_is_a_file_is_one_error_line(tiny, tmp_path):
  (tmp_path / 'file').write_text('')
  for mode in ('train', 'eval'):
    with pytest.raises(SystemExit) as exit_:
      main.run(tiny(), str(tmp_path / 'file'), mode)
    assert exit_.value.code == (
        f'error: --workdir {tmp_path / "file"}: {tmp_path / "file"} is a '
        'file, not a directory. Give a directory (it is created if missing).')


# --- Real processes --------------------------------------------------------


def test_one_run_per_workdir_and_a_killed_runs_lock_does_not_block(
    repo, data_dir, tiny, tmp_path, caplog):
  run_dir = str(tmp_path / 'run')
  flags = ('--config=configs/alexnet.py:tiny', f'--workdir={run_dir}',
           f'--config.data_dir={data_dir}', '--config.num_train_steps=1000')
  # Slow steps (tests/fault_worker.py) keep the first run training, for
  # as long as the second one needs to start, until it is killed.
  first = processes.LoggedProcess(
      repo, tmp_path / 'first.log', *flags, script='tests/fault_worker.py',
      devices=2, FAULT_STEP_SECONDS=0.5)
  try:
    first.wait_for('Starting from scratch')  # It holds the lock.
    second = processes.LoggedProcess(repo, tmp_path / 'second.log', *flags,
                                     devices=2)
    assert second.wait() == 1, second.text()[-3000:]
    assert first.process.poll() is None, first.text()[-3000:]
    assert [line for line in second.text().splitlines()
            if line.startswith('error')] == [
                f'error: {run_dir} is in use by another run: process '
                f'{first.process.pid} on host {HOST}, since '
                + re.search(r'since (.*) \(lock', second.text())[1]
                + f' (lock {run_dir}/checkpoints.lock). Wait for it to end '
                'or stop it, or use another --workdir.'], second.text()
    assert 'Traceback' not in second.text()
    first.wait_for('step 2/1000')  # Its first checkpoint is being saved.
  finally:
    first.process.send_signal(signal.SIGKILL)
    assert first.wait() == -signal.SIGKILL

  # The killed run's lock is left; the next run (here, to save starting a
  # process, on the first run's 2 devices) takes it over and resumes.
  assert os.path.exists(os.path.join(run_dir, 'checkpoints.lock'))
  reader = checkpoints.Checkpoints(os.path.join(run_dir, 'checkpoints'),
                                   keep=2, read_only=True)
  resumed = reader.latest_step() or 0
  reader.close()
  caplog.set_level(logging.INFO)
  state = train.train_and_evaluate(
      tiny(num_train_steps=resumed + 1, num_devices=2), run_dir)
  assert state.step == resumed + 1
  assert re.search(f'Took over the lock .* of a dead run \\(process '
                   f'{first.process.pid} on host .*\\): process '
                   f'{first.process.pid} has ended', caplog.text)
  assert not os.path.exists(os.path.join(run_dir, 'checkpoints.lock'))


def test_a_misspelt_field_from_a_real_process_is_one_line_exit_1(
    repo, tmp_path):
  run = processes.LoggedProcess(
      repo, tmp_path / 'typo.log', '--config=configs/alexnet.py:tiny',
      f'--workdir={tmp_path / "run"}', '--config.batch_szie=16', devices=2)
  assert run.wait() == 1
  assert 'Traceback' not in run.text()
  assert [line for line in run.text().splitlines()
          if line.startswith('error')] == [
      "error: --config.batch_szie: config has no field 'batch_szie'; did you "
      'mean --config.batch_size or --config.eval_batch_size?'], run.text()
  assert not os.path.exists(tmp_path / 'run')


def test_a_paused_holder_that_lost_its_lock_stops_and_the_new_run_keeps_it(
    repo, data_dir, tmp_path, monkeypatch):
  """A run on 'another machine' (its liveness shown only by its heartbeat)
  is paused (SIGSTOP) past the staleness limit; a second writer (here, to
  save starting a process, this process's checkpoints) takes its workdir
  over; woken (SIGCONT), the first stops with one line naming the second,
  saving nothing more, and the second keeps the workdir."""
  run_dir = str(tmp_path / 'run')
  directory = os.path.join(run_dir, 'checkpoints')
  lock = directory + '.lock'
  first = processes.LoggedProcess(
      repo, tmp_path / 'first.log', '--config=configs/alexnet.py:tiny',
      f'--workdir={run_dir}', f'--config.data_dir={data_dir}',
      '--config.num_train_steps=1000', script='tests/fault_worker.py',
      devices=2, FAULT_MACHINE='paused-host', FAULT_HEARTBEAT_SECONDS=0.1,
      FAULT_STEP_SECONDS=0.3)
  try:
    first.wait_for('step 2/1000')
    first.process.send_signal(signal.SIGSTOP)
    monkeypatch.setattr(workdir, 'STALE_SECONDS', 2.0)
    while time.time() - os.stat(lock).st_mtime < 2.5:
      time.sleep(0.1)
    second = checkpoints.Checkpoints(directory, keep=2)
    try:
      first.process.send_signal(signal.SIGCONT)
      assert first.wait() == 1, first.text()[-3000:]
      errors_ = [line for line in first.text().splitlines()
                 if line.startswith('error')]
      assert len(errors_) == 1 and errors_[0].startswith(
          f'error: This run lost the lock {lock} of its workdir: process '
          f'{os.getpid()} on host {HOST} holds it since '), errors_
      assert 'Traceback' not in first.text()
      second.check_lock()
      second.save(1000, {'w': np.zeros(2)}, {'step': 1000})
      second.wait()
      with open(lock) as f:
        assert json.load(f)['pid'] == os.getpid()
    finally:
      second.close()
    assert not os.path.exists(lock)
  finally:
    if first.process.poll() is None:
      first.process.send_signal(signal.SIGCONT)
      first.process.kill()
      first.process.wait()
