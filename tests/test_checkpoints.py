"""Which checkpoints are kept, and finding one by 'latest', 'best' or step."""

import functools
import logging as python_logging
import os
import re
import sys
import types

import jax
import numpy as np
import pytest

from alexnet import checkpoint_reads
from alexnet import checkpoints
from alexnet import errors
from alexnet import steps


def _save(store, step, error=None):
  store.save(step, {'w': np.full(3, step, np.float32)}, {'step': step}, error)
  store.wait()


def test_the_best_checkpoint_is_kept_and_found_across_restarts(tmp_path):
  directory = str(tmp_path / 'checkpoints')
  store = checkpoints.Checkpoints(directory, keep=1)
  _save(store, 1, error=0.1)
  _save(store, 2, error=0.5)
  _save(store, 3)  # Between evaluations: no error to rank it by.
  assert sorted(os.listdir(directory)) == ['1', '3']
  store.close()

  store = checkpoints.Checkpoints(directory, keep=1)  # A resumed run.
  _save(store, 4)
  _save(store, 5)
  store.close()
  assert sorted(os.listdir(directory)) == ['1', '5']

  reader = checkpoints.Checkpoints(directory, keep=1, read_only=True)
  assert reader.find('best') == reader.best_step() == 1
  assert reader.find('latest') == 5
  assert reader.find('5') == 5
  with pytest.raises(errors.WorkdirError, match=r'step 2 .*\[1, 5\]'):
    reader.find('2')
  reader.close()


def test_finding_in_an_empty_or_unevaluated_workdir_explains(tmp_path):
  missing = checkpoints.Checkpoints(str(tmp_path / 'none'), keep=1,
                                    read_only=True)
  with pytest.raises(errors.WorkdirError, match='No checkpoint in'):
    missing.find('latest')
  missing.close()
  assert not os.path.exists(tmp_path / 'none')  # Read-only creates nothing.

  store = checkpoints.Checkpoints(str(tmp_path / 'run'), keep=2)
  _save(store, 1)
  with pytest.raises(errors.WorkdirError, match='--checkpoint=latest'):
    store.find('best')
  store.close()


# --- Damaged checkpoints --------------------------------------------------


def _files(folder):
  return sorted(os.path.relpath(os.path.join(root, name), folder)
                for root, _, names in os.walk(folder) for name in names)


def _truncate_state(folder):
  """Halves every file of the state's arrays (an interrupted copy)."""
  for name in _files(folder):
    if name.startswith('state'):
      path = os.path.join(folder, name)
      os.truncate(path, os.path.getsize(path) // 2)


def _delete_array_data(folder):
  """Deletes the state's data files (a lost file), leaving its index."""
  data = os.path.join(folder, 'state', 'd')
  assert os.listdir(data)
  for name in os.listdir(data):
    os.remove(os.path.join(data, name))


def _three_checkpoints(directory):
  store = checkpoints.Checkpoints(directory, keep=3)
  for step in (1, 2, 3):
    _save(store, step, error=None)
  store.close()


_LIKE = {'w': np.zeros(3, np.float32)}


@pytest.mark.parametrize('damage', [_truncate_state, _delete_array_data])
def test_a_damaged_latest_checkpoint_is_set_aside_and_the_previous_restored(
    tmp_path, damage, caplog):
  directory = str(tmp_path / 'checkpoints')
  _three_checkpoints(directory)
  damage(os.path.join(directory, '3'))
  files = _files(os.path.join(directory, '3'))

  store = checkpoints.Checkpoints(directory, keep=3)
  state, meta = store.restore(_LIKE, None)
  np.testing.assert_array_equal(state['w'], np.full(3, 2, np.float32))
  assert meta == {'step': 2}
  warnings = [r.getMessage() for r in caplog.records
              if r.levelname == 'WARNING' and 'Damaged' in r.getMessage()]
  assert len(warnings) == 1, warnings
  assert re.search(r'step 3 \(state/: \w+Error: .+\)\. Restoring step 2 ',
                   warnings[0]), warnings[0]
  # Set aside whole, outside orbax's sight; the run goes on from step 2.
  aside = os.listdir(tmp_path / 'checkpoints_damaged')
  assert len(aside) == 1 and aside[0].startswith('3-'), aside
  assert _files(tmp_path / 'checkpoints_damaged' / aside[0]) == files
  assert store.latest_step() == 2
  _save(store, 3)
  store.close()
  assert sorted(os.listdir(directory)) == ['1', '2', '3']
  reader = checkpoints.Checkpoints(directory, keep=3, read_only=True)
  np.testing.assert_array_equal(reader.restore(_LIKE, None)[0]['w'],
                                np.full(3, 3, np.float32))
  reader.close()


def test_a_damaged_checkpoint_asked_for_names_the_readable_ones(tmp_path):
  directory = str(tmp_path / 'checkpoints')
  _three_checkpoints(directory)
  _truncate_state(os.path.join(directory, '3'))
  reader = checkpoints.Checkpoints(directory, keep=3, read_only=True)
  with pytest.raises(errors.WorkdirError,
                     match=r'step 3 .* is damaged \(state/: \w+Error: .+\)\. '
                     r'Readable checkpoints: \[1, 2\]; e\.g\. '
                     r'--checkpoint=2\.'):
    reader.restore(_LIKE, None, step=reader.find('latest'))
  reader.close()
  assert sorted(os.listdir(directory)) == ['1', '2', '3']  # Read only.


@pytest.fixture(autouse=True)
def _quick_retries(monkeypatch):
  monkeypatch.setattr(checkpoint_reads, '_RETRY_SECONDS', 0.01)


def _fail_reads(monkeypatch, error, times=None):
  """Makes the next `times` (all, if None) state reads raise `error`;
  returns the list of steps whose reads were attempted."""
  restore = checkpoints.ocp.StandardCheckpointHandler.restore
  attempted = []

  def failing(self, directory, *args, **kwargs):
    attempted.append(int(directory.parent.name))
    if times is None or len(attempted) <= times:
      raise error
    return restore(self, directory, *args, **kwargs)
  monkeypatch.setattr(checkpoints.ocp.StandardCheckpointHandler, 'restore',
                      failing)
  return attempted


def test_a_transient_read_error_is_retried_not_taken_for_damage(
    tmp_path, monkeypatch, caplog):
  """ESTALE on NFS, once, on a good newest checkpoint: restored, not set
  aside, and the run does not rewind."""
  directory = str(tmp_path / 'checkpoints')
  _three_checkpoints(directory)
  attempted = _fail_reads(
      monkeypatch, OSError(116, 'Stale file handle'), times=1)
  store = checkpoints.Checkpoints(directory, keep=3)
  state, meta = store.restore(_LIKE, None)
  store.close()
  assert attempted == [3, 3]
  assert meta == {'step': 3}
  np.testing.assert_array_equal(state['w'], np.full(3, 3, np.float32))
  assert 'Damaged' not in caplog.text
  assert sorted(os.listdir(tmp_path)) == ['checkpoints']
  assert sorted(os.listdir(directory)) == ['1', '2', '3']


def test_nothing_is_set_aside_when_no_checkpoint_reads(tmp_path, monkeypatch):
  """A failure all checkpoints share is the code's or config's, not damage:
  named as what it is, with every file left in place."""
  directory = str(tmp_path / 'checkpoints')
  _three_checkpoints(directory)
  store = checkpoints.Checkpoints(directory, keep=3)
  with pytest.raises(errors.WorkdirError,
                     match=r"step 3\) whose state has another structure .*"
                     r"1 entries only in the checkpoint, e\.g\. \['w'\]; 1 "
                     r"only in this config, e\.g\. \['v'\]\).* not damaged"):
    store.restore({'v': np.zeros(3, np.float32)}, None)  # Another tree.
  with pytest.raises(errors.WorkdirError, match=r'step 3\) of a run with '
                     r"None, but this config gives \{'towers': 2\}"):
    store.restore(_LIKE, {'towers': 2})
  with monkeypatch.context() as patch:
    _fail_reads(patch, ValueError('no codec for bfloat17'))
    with pytest.raises(errors.WorkdirError,
                       match=r'all 3 for the same reason \(state/: ValueError: '
                       r'no codec for bfloat17\).* left as they are'):
      store.restore(_LIKE, None)
  store.close()
  assert sorted(os.listdir(tmp_path)) == ['checkpoints']
  assert sorted(os.listdir(directory)) == ['1', '2', '3']
  # Damage of different kinds on each: nothing reads, nothing is named.
  _truncate_state(os.path.join(directory, '3'))
  for step in ('1', '2'):
    _delete_array_data(os.path.join(directory, step))
  store = checkpoints.Checkpoints(directory, keep=3)
  with pytest.raises(errors.WorkdirError,
                     match=r'can be read: step 3 .*; step 2 .*; step 1 .*'
                     r'Restore them from a copy'):
    store.restore(_LIKE, None)
  store.close()
  assert sorted(os.listdir(directory)) == ['1', '2', '3']


def test_a_switched_reinit_lr_multiplier_is_named_and_nothing_moved(
    tiny, tmp_path):
  """reinit_lr_multiplier 1.0 -> 10 adds optax.masked to the optimizer:
  every checkpoint fails to fit the new state for that one reason."""
  directory = str(tmp_path / 'checkpoints')
  fine_tuning = {'init_from': str(tmp_path), 'reinit': ('fc8',)}
  trees = {}
  for multiplier in (1.0, 10.0):
    config = tiny(reinit_lr_multiplier=multiplier, **fine_tuning)
    model = steps.create_model(config, 10)
    trees[multiplier] = jax.eval_shape(
        functools.partial(steps.initial_tree, config, model))
  store = checkpoints.Checkpoints(directory, keep=3)
  saved = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), trees[1.0])
  for step in (1, 2):
    store.save(step, saved, {'step': step})
  store.wait()
  with pytest.raises(errors.WorkdirError,
                     match=r'step 2\) whose state has another structure .*'
                     r"'opt_state/2/trace/conv1/bias'.*"
                     r"'opt_state/3/trace/conv1/bias'.*reinit_lr_multiplier"):
    store.restore(trees[10.0], None)
  assert store.restore(trees[1.0], None)[1] == {'step': 2}
  store.close()
  assert sorted(os.listdir(tmp_path)) == ['checkpoints']
  assert sorted(os.listdir(directory)) == ['1', '2']


def test_a_checkpoint_another_process_cannot_read_is_damaged_for_all(
    tmp_path, monkeypatch, caplog):
  """Process 0's view of a 2-process resume where process 1 fails to read
  step 3: both take the worst outcome, so both restore step 2."""
  directory = str(tmp_path / 'checkpoints')
  _three_checkpoints(directory)
  other = iter([3, 1, 0])  # Process 1: latest step, read step 3, step 2.
  gathered = []

  def allgather(value):
    gathered.append(int(value))
    return np.asarray([value, next(other)])

  store = checkpoints.Checkpoints(directory, keep=3)
  # Two processes as these modules see them (orbax itself stays with one).
  two = types.SimpleNamespace(process_count=lambda: 2,
                              process_index=lambda: 0, tree=jax.tree)
  for module in (checkpoints, checkpoint_reads):
    monkeypatch.setattr(module, 'jax', two)
  monkeypatch.setattr(checkpoints.multihost_utils, 'process_allgather',
                      allgather)
  monkeypatch.setattr(checkpoints.multihost_utils, 'sync_global_devices',
                      lambda name: None)
  state, _ = store.restore(_LIKE, None)
  monkeypatch.undo()
  store.close()
  np.testing.assert_array_equal(state['w'], np.full(3, 2, np.float32))
  assert gathered == [3, 0, 0]  # This process read both.
  assert 'step 3 (unreadable on another process)' in caplog.text
  assert sorted(os.listdir(directory)) == ['1', '2']


def _failure_in(filename):
  """exc_info of an error raised by code that claims to live in `filename`."""
  try:
    code = compile('raise ValueError("OUT_OF_RANGE")', filename, 'exec')
    exec(code, {})  # pylint: disable=exec-used
  except ValueError:
    return sys.exc_info()
  raise AssertionError('unreachable')


def test_asyncio_reports_of_a_failed_reads_other_errors_are_dropped():
  def shown(message, filename):
    record = python_logging.LogRecord('asyncio', python_logging.ERROR, 'x', 1,
                                      message, None, _failure_in(filename))
    # pylint: disable-next=protected-access
    return checkpoint_reads._unretrieved_read_error(record)

  orbax_file = '/venv/site-packages/orbax/checkpoint/_src/read.py'
  assert not shown('Task exception was never retrieved\nfuture: <Task>',
                   orbax_file)
  assert not shown('Future exception was never retrieved',
                   '/x/tensorstore/y.py')
  assert shown('Task exception was never retrieved', '/work/main/train.py')
  assert shown('Executing <Task> took 0.2 seconds', orbax_file)
