"""A resume continues the data stream it saved, or refuses in one line."""

import dataclasses
import itertools
import os

import numpy as np
import pytest
import tensorflow as tf

from alexnet import errors
from alexnet import recipe
from alexnet.data import epochs
import input_pipeline
import train


def test_a_changed_recipe_is_refused_and_the_same_one_resumes(tiny,
                                                              tmp_path):
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(tiny(num_devices=1, num_train_steps=2), workdir)
  saved = sorted(os.listdir(os.path.join(workdir, 'checkpoints')))
  changes = {'batch_size': 16, 'seed': 1, 'train_split': 'train[:90%]',
             'resize_size': 80}
  with pytest.raises(errors.WorkdirError) as e:
    train.train_and_evaluate(tiny(num_devices=1, **changes), workdir)
  message = str(e.value)
  assert '\n' not in message
  for field in ('batch_size 8 -> 16', 'seed 0 -> 1',
                "train_split 'train' -> 'train[:90%]'",
                'resize_size 76 -> 80', '--workdir',
                f'--config.init_from={workdir}'):
    assert field in message, field
  assert 'image_size' not in message  # Unchanged fields are not named.
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == saved
  # The saved recipe survives its JSON round trip: the same config resumes.
  assert train.train_and_evaluate(tiny(num_devices=1, num_train_steps=3),
                                  workdir).step == 3


def test_the_recipe_names_every_field_of_the_data_stream(tiny):
  config = tiny()
  source = input_pipeline.data_source(config)
  current = recipe.recipe(config, num_replicas=2)
  assert current == {'seed': 0, 'batch_size': 8, 'num_replicas': 2,
                     'dataset': 'digits', 'train_split': 'train',
                     'shuffle_buffer': 64, 'image_size': 67,
                     'resize_size': 76, 'classes': [],
                     'train_examples_per_class': 0}
  assert recipe.check({recipe.KEY: current}, current, 'w', 5, source) is None
  with pytest.raises(errors.WorkdirError, match='num_replicas 2 -> 4'):
    recipe.check({recipe.KEY: current}, recipe.recipe(config, 4), 'w', 5,
                 source)
  with pytest.raises(errors.WorkdirError, match="dataset 'digits' -> 'x'"):
    recipe.check({recipe.KEY: current}, {**current, 'dataset': 'x'}, 'w', 5,
                 source)
  # A checkpoint from before recipes were saved resumes, with a warning.
  warning = recipe.check({'step': 5, 'seed': 0}, current, 'w', 5, source)
  assert 'step 5 in w records no data recipe' in warning
  # An imported checkpoint's empty recipe is adopted without one.
  assert recipe.check({'step': 0, recipe.KEY: {}}, current, 'w', 0,
                      source) is None


def test_what_sets_the_stream_is_compared_not_the_text(tiny):
  """train_split by the examples it selects; shuffle_buffer by the window
  it gives each replica: digits' 1347 training examples on one replica
  are one window of 1024 (the least) and one of 323 for a buffer up to
  1024, and a single window of 1347 for any buffer from 1347 on."""
  config = tiny()
  source = input_pipeline.data_source(config)
  saved = recipe.recipe(config, num_replicas=1)

  def check(saved_fields, **fields):
    return recipe.check({recipe.KEY: {**saved, **saved_fields}},
                        {**saved, **fields}, 'w', 5, source)

  assert check({'train_split': 'train[:90%]'},
               train_split='train[0%:90%]') is None
  assert check({'train_split': 'train'}, train_split='train[0%:100%]') is None
  with pytest.raises(errors.WorkdirError,
                     match=r"train_split 'train\[:90%\]' -> 'train\[:80%\]'"):
    check({'train_split': 'train[:90%]'}, train_split='train[:80%]')
  assert check({'shuffle_buffer': 2000}, shuffle_buffer=16_384) is None
  assert check({'shuffle_buffer': 1024}, shuffle_buffer=100) is None
  with pytest.raises(errors.WorkdirError,
                     match=r'shuffle_buffer 1024 -> 2000 \(windows of 1024 -> '
                     r'1347 examples per replica\)'):
    check({'shuffle_buffer': 1024}, shuffle_buffer=2000)
  # A recipe saved before shuffle_buffer was recorded is not refused for it.
  older = {name: value for name, value in saved.items()
           if name != 'shuffle_buffer'}
  assert recipe.check({recipe.KEY: older}, saved, 'w', 5, source) is None


# --- The data stream: resuming anywhere costs at most one window ------------


def _digits_stream(config, source, start_step):
  """Replica 0's training stream of 1,347 digits: windows of 1,024 + 323."""
  steps = input_pipeline.steps_per_epoch(
      config, input_pipeline.get_dataset_info(config), 1)
  lighting = (np.ones(3, np.float32), np.eye(3, dtype=np.float32))
  return epochs.train_examples(config, source, lighting, replica=0,
                               num_replicas=1, steps_per_epoch=steps,
                               start_step=start_step).as_numpy_iterator()


def _counting(source, reads):
  """`source`, appending 1 to `reads` for each record it reads."""
  def count(data, label):
    tf.py_function(lambda: reads.append(1), [], [])
    return data, label
  return dataclasses.replace(
      source, examples=lambda spec: source.examples(spec).map(count))


def test_resumed_streams_equal_the_uninterrupted_one_and_skip_windows(tiny):
  config = tiny(shuffle_buffer=64)  # Windows of MIN_WINDOW examples.
  source = input_pipeline.data_source(config)
  per_epoch = 168 * 8
  assert epochs.MIN_WINDOW == 1024 and per_epoch == 1344
  whole = list(itertools.islice(_digits_stream(config, source, 0),
                                2 * per_epoch))
  labels = [example[1] for example in whole]
  epoch0, epoch1 = whole[:per_epoch], whole[per_epoch:]
  # Each epoch: 1,344 distinct records (of 1,347), in a new order.
  assert len({e[0] for e in epoch0}) == len({e[0] for e in epoch1}) == 1344
  assert [e[0] for e in epoch0] != [e[0] for e in epoch1]
  # Mid-window, near a window's end, the last step, an epoch boundary and
  # into the second epoch: the same examples and draws as straight through.
  for step in (1, 127, 130, 167, 168, 200):
    resumed = _digits_stream(config, source, step)
    for expected in whole[step * 8:step * 8 + 48]:
      got = next(resumed)
      assert got[0] == expected[0]
      for a, b in zip(got[1:], expected[1:]):
        np.testing.assert_array_equal(a, b)
  assert len(set(labels)) == 10
  # Resuming at the last step of epoch 0 (example 1,336) reads one window
  # (the one holding it, the last visited), not the 1,336 examples before.
  reads = []
  next(_digits_stream(config, _counting(source, reads), 167))
  assert len(reads) in (323, 1024)
