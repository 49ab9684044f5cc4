"""A resume continues the data stream it saved, or refuses in one line."""

import os

import pytest

from alexnet import errors
from alexnet import recipe
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
  current = recipe.recipe(config, num_replicas=2)
  assert current == {'seed': 0, 'batch_size': 8, 'num_replicas': 2,
                     'dataset': 'digits', 'train_split': 'train',
                     'image_size': 67, 'resize_size': 76}
  assert recipe.check({recipe.KEY: current}, current, 'w', 5) is None
  with pytest.raises(errors.WorkdirError, match='num_replicas 2 -> 4'):
    recipe.check({recipe.KEY: current}, recipe.recipe(config, 4), 'w', 5)
  with pytest.raises(errors.WorkdirError, match="dataset 'digits' -> 'x'"):
    recipe.check({recipe.KEY: current}, {**current, 'dataset': 'x'}, 'w', 5)
  # A checkpoint from before recipes were saved resumes, with a warning.
  warning = recipe.check({'step': 5, 'seed': 0}, current, 'w', 5)
  assert 'step 5 in w records no data recipe' in warning
