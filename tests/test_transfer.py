"""Fine-tuning (init_from, reinit, lr multiplier), class subsets, features."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from alexnet import errors
from alexnet import finetune
from alexnet import steps
from alexnet.data import subsets
from configs import alexnet as configs
import features
import input_pipeline
import main
import train


def _labels_and_data(dataset):
  pairs = list(dataset.as_numpy_iterator())
  return [label for _, label in pairs], [data for data, _ in pairs]


def test_kept_indices_are_the_first_of_each_class_in_order():
  labels = np.array([3, 1, 3, 2, 1, 3, 1, 0, 3])
  np.testing.assert_array_equal(
      subsets.kept_indices(labels, (3, 1)), [0, 1, 2, 4, 5, 6, 8])
  np.testing.assert_array_equal(
      subsets.kept_indices(labels, (3, 1), per_class=2), [0, 1, 2, 4])


def test_class_subset_remaps_labels_and_limits_only_the_training_split(tiny):
  full_config = tiny()
  config = tiny(classes=(7, 2, 5), train_examples_per_class=4)
  full = input_pipeline.data_source(full_config)
  subset = input_pipeline.data_source(config)
  assert subset.num_classes == 3
  # Oracle: the full split's first 4 of each class, in order, relabelled.
  all_labels, all_data = _labels_and_data(full.examples('train'))
  want = [i for i, label in enumerate(all_labels)
          if label in (7, 2, 5) and all_labels[:i].count(label) < 4]
  labels, data = _labels_and_data(subset.examples('train'))
  assert labels == [(7, 2, 5).index(all_labels[i]) for i in want]
  assert data == [all_data[i] for i in want]
  assert np.bincount(labels).tolist() == [4, 4, 4]
  # Slices and per-replica splits cut the kept examples.
  labels_half, _ = _labels_and_data(subset.examples('train[6:]'))
  assert labels_half == labels[6:]
  # Evaluation splits keep every example of the classes.
  test_labels, _ = _labels_and_data(full.examples('test'))
  kept_test, _ = _labels_and_data(subset.examples('test'))
  assert kept_test == [(7, 2, 5).index(label) for label in test_labels
                       if label in (7, 2, 5)]
  info = input_pipeline.get_dataset_info(
      tiny(classes=(7, 2, 5), eval_split='test'))
  assert (info.num_classes, info.num_eval_examples['eval']) == (
      3, len(kept_test))
  with pytest.raises(errors.ConfigError, match='config.classes'):
    input_pipeline.data_source(tiny(classes=(1, 1)))


def test_reinit_multiplier_scales_exactly_the_reinit_layers_inside_v():
  config = configs.get_config()
  config.reinit, config.reinit_lr_multiplier = ('fc8',), 10.0
  rng = np.random.default_rng(0)
  params = {layer: {'kernel': rng.normal(size=(3, 4)),
                    'bias': rng.normal(size=4)} for layer in ('fc7', 'fc8')}
  grads = [jax.tree.map(lambda p: rng.normal(size=p.shape), params)
           for _ in range(3)]
  lr = 0.01
  # v <- 0.9 v - m lr (g + wd w) (wd on kernels only); w += v.
  want = jax.tree.map(np.copy, params)
  velocity = jax.tree.map(np.zeros_like, params)
  for grad in grads:
    for layer, multiplier in (('fc7', 1.0), ('fc8', 10.0)):
      for name in ('kernel', 'bias'):
        decay = config.weight_decay if name == 'kernel' else 0.0
        w, v = want[layer][name], velocity[layer][name]
        v[...] = config.momentum * v - multiplier * lr * (
            grad[layer][name] + decay * w)
        w += v
  got = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)
  optimizer = steps.make_optimizer(config, lr)
  state = optimizer.init(got)
  for grad in grads:
    updates, state = optimizer.update(grad, state, got)
    got = optax.apply_updates(got, updates)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5),
               got, want)


@pytest.fixture(scope='module')
def source_run(tiny, tmp_path_factory):
  """A finished 4-step tiny run on one device: (config, workdir)."""
  workdir = str(tmp_path_factory.mktemp('source'))
  config = tiny(num_devices=1)
  assert train.train_and_evaluate(config, workdir).step == 4
  return config, workdir


def test_fine_tuning_copies_reinits_and_resumes_without_reinit(
    source_run, tiny, tmp_path):
  _, source = source_run
  saved, step = finetune.read_params(source)
  assert step == 4
  assert finetune.read_params(
      os.path.join(source, 'checkpoints', '2'))[1] == 2
  config = tiny(num_devices=1, classes=(0, 1, 2), init_from=source,
                num_train_steps=2, ten_crop=False)
  model = steps.create_model(config, 3)
  with pytest.raises(errors.ConfigError) as refused:
    finetune.initial_state(config, model)
  for part in ("'fc8'", '(2, 512, 5)', '(2, 512, 2)', '--config.reinit'):
    assert part in str(refused.value)

  config.reinit, config.reinit_lr_multiplier = ('fc8',), 10.0
  start = finetune.initial_state(config, model)
  fresh = steps.create_train_state(config, model)
  assert start.step == 0
  for layer, values in start.params.items():
    want = fresh.params[layer] if layer == 'fc8' else saved[layer]
    jax.tree.map(np.testing.assert_array_equal, values, want)
  assert all(not np.any(x) for x in jax.tree.leaves(start.opt_state))

  workdir = str(tmp_path / 'finetune')
  assert train.train_and_evaluate(config, workdir).step == 2
  after_two, _ = finetune.read_params(workdir)
  # Resuming reads the run's own checkpoint, never init_from again, and
  # re-initialises nothing: a resume at the end starts (and so ends) with
  # every layer, fc8 included, exactly as saved.
  config.init_from = str(tmp_path / 'gone')
  resumed = train.train_and_evaluate(config, workdir)
  assert resumed.step == 2
  jax.tree.map(np.testing.assert_array_equal, resumed.params, after_two)
  config.num_train_steps = 3
  state = train.train_and_evaluate(config, workdir)
  assert state.step == 3
  moved = [not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(state.params), jax.tree.leaves(after_two), strict=True)]
  assert any(moved)  # And it trains on from there.
  with pytest.raises(errors.ConfigError, match='is not a run'):
    train.train_and_evaluate(config, str(tmp_path / 'new'))
  for overrides, match in (({'reinit': ('fc8',)}, 'set config.init_from'),
                           ({'reinit': ('fc9',), 'init_from': source},
                            'not layers of this model'),
                           ({'reinit_lr_multiplier': 10.0}, 'is empty')):
    with pytest.raises(errors.ConfigError, match=match):
      train.train_and_evaluate(tiny(num_devices=1, **overrides),
                               str(tmp_path / 'refused'))


def test_features_are_fc8s_input_with_the_splits_labels(source_run):
  config, workdir = source_run
  main.run(config, workdir, 'features', split='eval')
  fc7 = np.load(os.path.join(workdir, 'features', 'eval_fc7.npy'))
  labels = np.load(os.path.join(workdir, 'features', 'eval_labels.npy'))
  # Width 0.125: 256 fc7 units per tower, both towers.
  assert fc7.shape == (32, 512) and fc7.dtype == np.float32
  source = input_pipeline.data_source(config)
  want, _ = _labels_and_data(source.examples(config.eval_split))
  np.testing.assert_array_equal(labels, want)
  # fc8 applied to the features gives the logits: the grouped order.
  found = features.extract(config, workdir, 'eval')
  np.testing.assert_array_equal(found.fc7, fc7)
  params, _ = finetune.read_params(workdir)
  kernel, bias = params['fc8']['kernel'], params['fc8']['bias']
  wide = np.moveaxis(kernel, 0, 1).reshape(kernel.shape[1], -1)
  logits = (fc7 @ wide + bias.reshape(-1))[:, :found.logits.shape[1]]
  np.testing.assert_allclose(logits, found.logits, rtol=1e-4, atol=1e-4)
  assert (fc7 >= 0).all() and fc7.std() > 0
