"""main.py with faults injected at exact moments, for tests/test_faults.py.

    python tests/fault_worker.py --config=... --workdir=...   (main.py's flags)

Test-only; it wraps public methods only (the library has no test hooks).
Environment variables:

* FAULT_STEP_SECONDS: sleep this long after each train step (in
  `StopSignal.should_stop`, asked once per step), so that a signal sent
  from outside surely lands while training (tiny steps take milliseconds).
* FAULT_KILL: SIGKILL this process at an exact point:
  - 'save:STEP': when the checkpoint of STEP is requested, before anything
    of it is written (e.g. 'save:2' is "before the first checkpoint");
  - 'commit:STEP': inside orbax's asynchronous commit of STEP, on its
    background thread: every file of the checkpoint is written into the
    temporary directory, which is not yet renamed to its final name
    (`orbax.checkpoint.path.atomicity.AtomicRenameTemporaryPath.finalize`).
* FAULT_MACHINE: the workdir lock records this process as one of another
  machine (that hostname, another boot id), whose liveness only its
  heartbeat shows.
* FAULT_HEARTBEAT_SECONDS, FAULT_STALE_SECONDS: the lock's timing
  (alexnet/workdir_lock.py's HEARTBEAT_SECONDS and STALE_SECONDS).
"""

import functools
import os
import signal
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from absl import app  # pylint: disable=g-import-not-at-top
from orbax.checkpoint.path import atomicity

from alexnet import checkpoints
from alexnet import distributed
from alexnet import liveness
from alexnet import workdir_lock
import main


def _die() -> None:
  sys.stderr.write('fault_worker: SIGKILL\n')
  sys.stderr.flush()
  os.kill(os.getpid(), signal.SIGKILL)


def _slow_steps(seconds: float) -> None:
  should_stop = distributed.StopSignal.should_stop

  @functools.wraps(should_stop)
  def sleep_then_ask(self, step):
    time.sleep(seconds)
    return should_stop(self, step)
  distributed.StopSignal.should_stop = sleep_then_ask


def _kill_at_save(step: int) -> None:
  save = checkpoints.Checkpoints.save

  @functools.wraps(save)
  def save_or_die(self, at, *args, **kwargs):
    if at == step:
      _die()
    return save(self, at, *args, **kwargs)
  checkpoints.Checkpoints.save = save_or_die


def _kill_at_commit(step: int) -> None:
  path_class = atomicity.AtomicRenameTemporaryPath
  finalize = path_class.finalize

  @functools.wraps(finalize)
  async def finalize_or_die(self, *args, **kwargs):
    if self.get_final().name == str(step):
      _die()
    return await finalize(self, *args, **kwargs)
  path_class.finalize = finalize_or_die


def _lock_settings() -> None:
  machine = os.environ.get('FAULT_MACHINE')
  if machine:
    liveness.this_machine = lambda: {'host': machine,
                                     'boot': f'{machine}-boot',
                                     'pid_namespace': ''}
  for name in ('HEARTBEAT_SECONDS', 'STALE_SECONDS'):
    if f'FAULT_{name}' in os.environ:
      setattr(workdir_lock, name, float(os.environ[f'FAULT_{name}']))


def _install_faults() -> None:
  _lock_settings()
  seconds = float(os.environ.get('FAULT_STEP_SECONDS', 0))
  if seconds:
    _slow_steps(seconds)
  kill = os.environ.get('FAULT_KILL', '')
  if kill:
    where, step = kill.split(':')
    {'save': _kill_at_save, 'commit': _kill_at_commit}[where](int(step))


if __name__ == '__main__':
  _install_faults()
  sys.argv[0] = os.path.join(REPO, 'main.py')
  app.run(main.main)
