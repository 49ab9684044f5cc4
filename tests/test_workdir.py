"""One run per workdir, and refusals of a bad command line or workdir.

The lock itself is tested in this process in test_workdir_lock.py; here
real `main.py` processes meet it: a second run on a workdir in use, a run
after a SIGKILL, and a paused holder whose lock another run took over.
"""

import json
import logging
import os
import re
import signal
import socket
import sys
import time

import numpy as np
import pytest

from alexnet import checkpoints
from alexnet import errors
from alexnet import workdir
from alexnet import workdir_lock
import main
import processes
import train

HOST = socket.gethostname()


# --- The workdir's path ----------------------------------------------------


def test_a_workdir_that_is_a_file_or_unwritable_is_refused(tmp_path):
  (tmp_path / 'file').write_text('')
  for path in (tmp_path / 'file', tmp_path / 'file' / 'run'):
    with pytest.raises(errors.WorkdirError, match=f'{tmp_path / "file"} is '
                       'a file, not a directory'):
      workdir.check_path(str(path))
    with pytest.raises(errors.WorkdirError, match='is a file'):
      workdir_lock.Lock(str(path / 'checkpoints')).acquire()
  if os.geteuid() == 0:  # Root writes anywhere a filesystem lets it.
    unwritable = '/sys/alexnet-test-run'
  else:
    unwritable = str(tmp_path / 'read_only' / 'run')
    os.makedirs(os.path.dirname(unwritable), mode=0o500)
  with pytest.raises(errors.WorkdirError,
                     match=r'Cannot create the workdir .*Give a --workdir '
                     'you can write'):
    workdir_lock.Lock(os.path.join(unwritable, 'checkpoints')).acquire()


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
    monkeypatch.setattr(workdir_lock, 'STALE_SECONDS', 2.0)
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
