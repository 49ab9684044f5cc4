"""Runs through faults: several processes, SIGKILL, SIGTERM, a foreign
checkpoint, an unshared workdir.

Every run here is a real `main.py` process (or `tests/fault_worker.py`,
main.py with a fault injected at an exact moment) on the tiny variant, and
ends compared with one uninterrupted in-process reference run of the same
12 steps on 4 devices (2 replicas x 2 towers): resumed == uninterrupted.
Bad configs are refused in test_train.py.
"""

import functools
import logging
import os
import re
import shutil
import signal
import socket
import time

import jax
import numpy as np
from PIL import Image
import pytest

from alexnet import checkpoints
from alexnet import steps
import main
import processes
import train

STEPS = 12  # checkpoint_every_steps is the tiny variant's 2.


@pytest.fixture(scope='module')
def config(tiny):
  """config(**overrides): the tiny variant, run for STEPS steps."""
  return lambda **overrides: tiny(num_train_steps=STEPS, **overrides)


@pytest.fixture(scope='module')
def reference(config, tmp_path_factory):
  """The uninterrupted run: (workdir, final state), in this process."""
  workdir = str(tmp_path_factory.mktemp('reference'))
  state = train.train_and_evaluate(config(), workdir)
  assert state.step == STEPS
  return workdir, state


_STARTED = []  # Every process a test starts, so that none outlives it.


@pytest.fixture(autouse=True)
def _kill_leftovers():
  yield
  while _STARTED:
    process = _STARTED.pop()
    if process.poll() is None:
      process.kill()
      process.wait()


class _Run(processes.LoggedProcess):
  """main.py (or fault_worker.py) on the tiny variant for STEPS steps."""

  def __init__(self, repo, data_dir, log, workdir, *flags, **kwargs):
    super().__init__(repo, log, '--config=configs/alexnet.py:tiny',
                     f'--workdir={workdir}', f'--config.data_dir={data_dir}',
                     f'--config.num_train_steps={STEPS}', *flags, **kwargs)
    _STARTED.append(self.process)


@pytest.fixture
def start(repo, data_dir):
  """start(log, workdir, *flags, devices=4, script='main.py', **env)."""
  return functools.partial(_Run, repo, data_dir)


class _Store:
  """The workdir's checkpoints, closed after use: an open orbax manager
  cleans up temporary directories in the background, and must not race
  the next run doing the same."""

  def __init__(self, workdir):
    self.workdir = workdir

  def __enter__(self) -> checkpoints.Checkpoints:
    self.store = checkpoints.Checkpoints(
        os.path.join(self.workdir, 'checkpoints'), keep=2)
    return self.store

  def __exit__(self, *exc):
    self.store.close()


def _latest(workdir):
  with _Store(workdir) as store:
    return store.latest_step()


def _restore(workdir, config):
  state = steps.create_train_state(config, steps.create_model(config, 10))
  like = {'params': state.params, 'opt_state': state.opt_state,
          'plateau': state.plateau}
  with _Store(workdir) as store:
    return store.restore(like, steps.shape_signature(config, 10))


def _assert_same_as_reference(workdir, config, reference, exact=True):
  tree, meta = _restore(workdir, config)
  assert meta['step'] == STEPS
  _, state = reference
  if exact:
    check = np.testing.assert_array_equal
  else:  # Float32 rounding of another summation order, nothing more.
    check = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                    atol=1e-8)
  jax.tree.map(check, (tree['params'], tree['opt_state']),
               (state.params, state.opt_state))


def _temporary(workdir):
  return [name for name in os.listdir(os.path.join(workdir, 'checkpoints'))
          if 'tmp' in name]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


# --- Several processes --------------------------------------------------------


def _two_processes(start, tmp_path, workdirs, *flags):
  address = f'--config.coordinator_address=127.0.0.1:{_free_port()}'
  return [start(tmp_path / f'process{i}.log', workdirs[i], address,
               '--config.num_processes=2', f'--config.process_id={i}', *flags,
               devices=2) for i in range(2)]


def test_two_processes_equal_one_process(reference, start, config, tmp_path):
  """2 processes x 2 devices (gloo) == 1 process x 4 devices."""
  workdir = str(tmp_path / 'run')
  # Saves and log lines are cross-process syncs; neither changes the
  # parameters, so the run saves and logs only at its end.
  runs = _two_processes(start, tmp_path, [workdir] * 2,
                        f'--config.checkpoint_every_steps={STEPS}',
                        f'--config.log_every_steps={STEPS}')
  assert [run.wait() for run in runs] == [0, 0], runs[1].text()[-3000:]
  assert 'JAX process 1 of 2' in runs[1].text()
  # Summaries and pictures come from process 0 only.
  assert len([n for n in os.listdir(workdir) if 'tfevents' in n]) == 1
  _assert_same_as_reference(workdir, config(), reference, exact=False)


def _resume_in_process(workdir, config, reference, step, caplog):
  """Finishes the run here (quicker than a process); it must resume from
  `step` and end exactly where the reference did."""
  # On absl's own logger: parsing absl flags in an earlier test of this
  # process (tests/test_workdir.py) may have set it to WARNING.
  caplog.set_level(logging.INFO, logger='absl')
  state = train.train_and_evaluate(config, workdir)
  assert f'Resuming from step {step} ' in caplog.text
  _, want = reference
  assert state.step == want.step == _latest(workdir)
  jax.tree.map(np.testing.assert_array_equal,
               (state.params, state.opt_state), (want.params, want.opt_state))


# --- Kills and preemption ----------------------------------------------------


def test_kills_lose_no_work_and_sigterm_saves_exits_0_and_resumes(
    reference, start, config, tmp_path, caplog):
  """One workdir through three processes, then finished here.

  SIGKILL before the first checkpoint leaves none; SIGKILL during the
  asynchronous save of step 10 leaves its files in a temporary directory
  that is never renamed, and the next run resumes from step 8; SIGTERM
  there saves the step reached and exits 0; the run finished from that step
  equals the uninterrupted reference exactly.
  """
  workdir = str(tmp_path / 'run')
  worker = 'tests/fault_worker.py'

  run = start(tmp_path / 'before_first.log', workdir, script=worker,
              FAULT_KILL='save:2')
  assert run.wait() == -signal.SIGKILL, run.text()[-3000:]
  assert _latest(workdir) is None

  run = start(tmp_path / 'saving.log', workdir, script=worker,
              FAULT_KILL='commit:10')
  assert run.wait() == -signal.SIGKILL, run.text()[-3000:]
  assert _temporary(workdir), os.listdir(os.path.join(workdir, 'checkpoints'))

  # Slow steps, so that the signal surely lands before the last step (12).
  run = start(tmp_path / 'term.log', workdir, script=worker,
              FAULT_STEP_SECONDS=0.6)
  run.wait_for(f'step 9/{STEPS}')
  sent = time.monotonic()
  run.process.send_signal(signal.SIGTERM)
  assert run.wait() == 0, run.text()[-3000:]
  seconds = time.monotonic() - sent
  assert 'Resuming from step 8 ' in run.text(), run.text()[-3000:]
  stopped = int(re.search(r'Stopped after step (\d+)', run.text())[1])
  assert 9 <= stopped < STEPS, run.text()[-3000:]
  assert _latest(workdir) == stopped
  assert not _temporary(workdir)
  print(f'SIGTERM to exit: {seconds:.2f} s (step {stopped})')
  # Typically 2-4 s here; the bound is loose for a loaded CI machine.
  assert seconds < 120, run.text()[-3000:]

  _resume_in_process(workdir, config(), reference, stopped, caplog)


# --- A checkpoint of another net, a workdir not shared ------------------------


def _folder_of_three_classes(root):
  rng = np.random.default_rng(0)
  for split, count in (('train', 4), ('test', 1)):
    for label in ('a', 'b', 'c'):
      os.makedirs(root / split / label)
      for i in range(count):
        pixels = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / split / label / f'{i}.jpg')


def _snapshot(path):
  """Every file under `path` with its size and modification time."""
  found = {}
  for folder, _, files in os.walk(path):
    for name in files:
      stat = os.stat(os.path.join(folder, name))
      found[os.path.join(folder, name)] = (stat.st_size, stat.st_mtime_ns)
  return found


def _main_in_process(workdir, config) -> str | int | None:
  """What main.py exits with, run here (after flag parsing) to save time.

  Returns:
    The SystemExit code: a message, which Python prints before exiting
    with status 1 (test_train.py checks that in a real process).
  """
  with pytest.raises(SystemExit) as exit_:
    main.run(config, str(workdir))
  return exit_.value.code


def test_checkpoint_of_other_classes_is_refused_untouched(
    reference, config, tmp_path):
  _folder_of_three_classes(tmp_path / 'folder')
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference[0], workdir)
  before = _snapshot(workdir)
  code = _main_in_process(workdir, config(
      dataset='folder', eval_split='test', folder=str(tmp_path / 'folder')))
  assert re.match(r"error: .*'num_classes': 10.*'num_classes': 3", code), code
  assert _snapshot(workdir) == before


def test_workdir_not_shared_by_all_processes_fails_clearly(
    reference, start, tmp_path):
  """Process 0 sees the reference's checkpoint, process 1 an empty dir."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference[0], workdir)
  runs = _two_processes(start, tmp_path, [workdir, str(tmp_path / 'other')])
  for run in runs:
    assert run.wait() == 1, run.text()[-3000:]
    assert (f'process 0: step {STEPS}, process 1: none' in run.text()
            and 'a filesystem all processes share' in run.text()), (
                run.text()[-3000:])


# --- Damaged and unreadable checkpoints ---------------------------------------


def _largest_file(folder):
  paths = [os.path.join(root, name) for root, _, names in os.walk(folder)
           for name in names]
  return max(paths, key=os.path.getsize)


def test_a_damaged_checkpoint_falls_back_in_one_warning_without_traceback(
    reference, start, config, tmp_path):
  """The latest step's largest data file truncated (an interrupted copy):
  the run restores the step before, sets the damaged one aside, finishes
  where the reference did, and prints no traceback on the way."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference[0], workdir)
  with _Store(workdir) as store:
    previous = sorted(store._manager.all_steps())[-2]  # pylint: disable=protected-access
  data = _largest_file(os.path.join(workdir, 'checkpoints', str(STEPS),
                                    'state'))
  os.truncate(data, os.path.getsize(data) // 2)
  run = start(tmp_path / 'damaged.log', workdir)
  assert run.wait() == 0, run.text()[-3000:]
  text = run.text()
  assert f'Resuming from step {previous} ' in text, text[-3000:]
  assert len(re.findall('Damaged checkpoint', text)) == 1, text[-3000:]
  assert 'Traceback' not in text and 'Event loop is closed' not in text, (
      text[-5000:])
  assert os.listdir(os.path.join(workdir, 'checkpoints_damaged'))
  _assert_same_as_reference(workdir, config(), reference)
