"""Which checkpoints are kept, and finding one by 'latest', 'best' or step."""

import os

import numpy as np
import pytest

from alexnet import checkpoints
from alexnet import errors


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
