"""Training end to end, resume, evaluating a checkpoint, optimizer, plateau."""

import glob
import math
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from alexnet import checkpoints
from alexnet import errors
from alexnet import reporting
from alexnet import schedule
from alexnet import steps
from configs import alexnet as configs
import input_pipeline
import train


def _scalars(workdir):
  """{tag: {step: value}} from the TensorBoard event files."""
  scalars = {}
  for path in glob.glob(os.path.join(workdir, 'events.out.tfevents*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.metadata.plugin_data.plugin_name == 'scalars':
          scalars.setdefault(value.tag, {})[event.step] = float(
              tf.make_ndarray(value.tensor))
  return scalars


def _assert_finished_run(workdir, steps):
  store = checkpoints.Checkpoints(os.path.join(workdir, 'checkpoints'),
                                  keep=2)
  assert store.latest_step() == steps
  scalars = _scalars(workdir)
  for tag in ('train/loss', 'train/accuracy', 'train/lr',
              'train/images_per_s', 'eval/centre_top1_error',
              'eval/centre_top5_error', 'eval/ten_crop_top1_error',
              'eval/ten_crop_loss'):
    assert scalars[tag], tag
    assert all(math.isfinite(v) for v in scalars[tag].values()), tag
  picture = np.asarray(Image.open(os.path.join(workdir, 'conv1_kernels.png')))
  assert picture.ndim == 3 and picture.shape[-1] == 3 and picture.std() > 0


@pytest.fixture(scope='module')
def trained(tiny, tmp_path_factory):
  """A finished 4-step run on two devices (one tower each): (config, dir)."""
  workdir = str(tmp_path_factory.mktemp('two_devices'))
  config = tiny(num_devices=2)
  state = train.train_and_evaluate(config, workdir)
  assert state.step == 4
  return config, workdir


def test_end_to_end_two_devices(trained):
  config, workdir = trained
  _assert_finished_run(workdir, steps=4)
  assert train.planned_steps(config) == 4


def test_end_to_end_one_device_with_a_fixed_lr_drop(tiny, tmp_path):
  config = tiny(num_devices=1)
  per_epoch = input_pipeline.steps_per_epoch(
      config, input_pipeline.get_dataset_info(config), num_replicas=1)
  config.lr_drop_epochs = (2 / per_epoch,)  # From the third step on.
  state = train.train_and_evaluate(config, str(tmp_path))
  _assert_finished_run(str(tmp_path), steps=4)
  assert state.params['conv1']['kernel'].shape[0] == 2  # Both towers.
  lr = config.learning_rate  # Logged after each step, at its 1-based count.
  assert _scalars(str(tmp_path))['train/lr'] == pytest.approx(
      {1: lr, 2: lr, 3: lr / 10, 4: lr / 10})


def test_end_to_end_mock_imagenet(tiny, testdata, tmp_path):
  config = tiny(data_dir=str(tmp_path / 'data'), dataset='imagenet2012',
                train_split='train', eval_split='validation', num_devices=2,
                num_train_steps=2, pca_stats='imagenet')
  with tfds.testing.mock_data(num_examples=16, data_dir=testdata,
                              policy=tfds.testing.MockPolicy.USE_FILES):
    state = train.train_and_evaluate(config, str(tmp_path / 'run'))
  _assert_finished_run(str(tmp_path / 'run'), steps=2)
  assert state.params['fc8']['kernel'].shape[-1] == 500  # 1000 classes.


def test_resume_equals_uninterrupted(tiny, tmp_path):
  """2 steps, restart, 2 more == 4 straight (4 devices: 2 replicas x 2)."""
  config = tiny(num_devices=4)
  interrupted, straight = str(tmp_path / 'a'), str(tmp_path / 'b')
  train.train_and_evaluate(tiny(num_devices=4, num_train_steps=2),
                           interrupted)
  resumed = train.train_and_evaluate(config, interrupted)
  uninterrupted = train.train_and_evaluate(config, straight)
  assert resumed.step == uninterrupted.step == 4
  jax.tree.map(np.testing.assert_array_equal,
               (resumed.params, resumed.opt_state),
               (uninterrupted.params, uninterrupted.opt_state))


def test_incompatible_checkpoint_is_refused_untouched(trained):
  config, workdir = trained
  config = config.copy_and_resolve_references()
  config.width = 0.25
  before = sorted(os.listdir(os.path.join(workdir, 'checkpoints')))
  with pytest.raises(errors.WorkdirError, match='width'):
    train.train_and_evaluate(config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == before


def test_non_finite_loss_stops_and_keeps_last_checkpoint(trained, tmp_path):
  config, finished = trained
  workdir = str(tmp_path / 'run')
  shutil.copytree(finished, workdir)
  config = config.copy_and_resolve_references()
  config.learning_rate = 1e30
  config.num_train_steps = 8
  with pytest.raises(errors.DivergedError, match='last good checkpoint'):
    train.train_and_evaluate(config, workdir)
  store = checkpoints.Checkpoints(os.path.join(workdir, 'checkpoints'),
                                  keep=2)
  assert store.latest_step() == 4
  good = steps.create_train_state(config, steps.create_model(config, 10))
  like = {'params': good.params, 'opt_state': good.opt_state,
          'plateau': good.plateau}
  restored, _ = store.restore(like, steps.shape_signature(config, 10))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(restored['params']))


# --- Evaluating a checkpoint without training (main.py --mode=eval) --------


def test_eval_mode_equals_the_runs_own_evaluation(trained):
  """The last checkpoint, restored on another layout (one device), scores
  what the run logged when it evaluated the same parameters."""
  config, workdir = trained
  logged = _scalars(workdir)
  config = config.copy_and_resolve_references()
  config.num_devices = 1
  step, results = train.evaluate_checkpoint(config, workdir)
  assert step == 4
  assert set(results) == {'eval'}
  for name in ('centre_top1_error', 'centre_top5_error', 'centre_loss',
               'ten_crop_top1_error', 'ten_crop_top5_error', 'ten_crop_loss'):
    assert results['eval'][name] == pytest.approx(
        logged[f'eval/{name}'][4], rel=1e-5), name
  # Only the last step was evaluated, so it is also the best; step 2 is
  # kept as the other latest checkpoint.
  assert train.evaluate_checkpoint(config, workdir, 'best')[0] == 4
  assert train.evaluate_checkpoint(config, workdir, '2')[0] == 2
  with pytest.raises(errors.WorkdirError, match=r'step 3 .*\[2, 4\]'):
    train.evaluate_checkpoint(config, workdir, '3')


def test_main_eval_mode_prints_errors_or_explains_an_empty_workdir(
    repo, trained, tmp_path):
  config, workdir = trained
  flags = ['--config=configs/alexnet.py:tiny',
           f'--config.data_dir={config.data_dir}',
           '--config.num_devices=2', '--mode=eval']
  result = _main(repo, *flags, f'--workdir={workdir}', '--checkpoint=best')
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'Checkpoint of step 4 in {workdir}' in result.stdout
  for crop in ('centre', 'ten_crop'):
    assert re.search(f'eval +{crop} +top-1 error +[0-9.]+%  top-5 error',
                     result.stdout), result.stdout
  empty = _main(repo, *flags, f'--workdir={tmp_path}/none')
  assert empty.returncode == 1
  assert 'error: No checkpoint in' in empty.stderr, empty.stderr[-3000:]
  assert 'Traceback' not in empty.stderr
  assert not os.path.exists(tmp_path / 'none')


# --- Optimizer and schedule ---------------------------------------------------


def test_optimizer_equals_the_papers_rule_in_float64_across_an_lr_drop():
  config = configs.get_config()
  rng = np.random.default_rng(0)
  params = {'conv': {'kernel': rng.normal(size=(3, 4)),
                     'bias': rng.normal(size=4)}}
  grads = [jax.tree.map(lambda p: rng.normal(size=p.shape), params)
           for _ in range(5)]
  rates = [0.01, 0.01, 0.001, 0.001, 0.001]  # A drop after step 2.

  # v <- 0.9 v - 0.0005 lr w - lr g (kernels; biases not decayed); w += v.
  want = jax.tree.map(np.copy, params)
  velocity = jax.tree.map(np.zeros_like, params)
  for lr, grad in zip(rates, grads):
    for layer in want:
      for name in want[layer]:
        decay = config.weight_decay if name == 'kernel' else 0.0
        w, v = want[layer][name], velocity[layer][name]
        v[...] = (config.momentum * v - decay * lr * w
                  - lr * grad[layer][name])
        w += v

  got = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)
  state = steps.make_optimizer(config, 0.0).init(got)
  step = jax.jit(lambda p, s, g, lr: _apply(config, p, s, g, lr))
  for lr, grad in zip(rates, grads):
    got, state = step(got, state, grad, lr)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5),
               got, want)


def _apply(config, params, state, grads, lr):
  updates, state = steps.make_optimizer(config, lr).update(grads, state,
                                                           params)
  return optax.apply_updates(params, updates), state


def test_plateau_drops_after_patience_and_never_otherwise():
  config = configs.get_config()
  config.plateau.patience = 2
  config.plateau.max_drops = 2
  plateau = schedule.make_plateau(config)
  state = plateau.init(None)
  errors = [0.9, 0.8, 0.7, 0.7, 0.7, 0.6, 0.6995, 0.65, 0.7, 0.7, 0.7, 0.7]
  drops = []
  for error in errors:
    _, state = plateau.update({}, state, value=error)
    drops.append(schedule.plateau_drops(config, state))
  # Improvements reset the count; 0.6995 is within min_delta of 0.6 so it
  # does not count as one. Drops at the 2nd non-improving evaluation, then
  # never more than max_drops.
  assert drops == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2]


def test_fixed_drops_replace_the_plateau_rule():
  config = configs.get_config()
  config.num_epochs, config.lr_drop_epochs = 4.0, (2, 3.5)
  info = input_pipeline.DatasetInfo(10, num_train_examples=1280,
                                    num_eval_examples={'eval': 10})
  plan = schedule.Schedule.create(config, info)  # 10 steps per epoch.
  assert (plan.total_steps, plan.drop_steps) == (40, (20, 35))
  plateau = schedule.make_plateau(config).init(None)
  for error in [0.5] * 10:  # Would drop under the rule (patience 4).
    plateau = schedule.update_plateau(config, plateau, error, step=0)
  rates = {step: schedule.learning_rate(config, plateau, plan, step)
           for step in (0, 19, 20, 34, 35, 39)}
  assert rates == pytest.approx({0: 0.01, 19: 0.01, 20: 1e-3, 34: 1e-3,
                                 35: 1e-4, 39: 1e-4})
  assert [schedule.lr_drops(config, plateau, plan, step)
          for step in (0, 20, 35)] == [0, 1, 2]


# --- Warnings and configuration errors ----------------------------------------


def test_flat_loss_warns_once_naming_the_cause_and_the_field():
  monitor = reporting.FlatLossMonitor(10, patience=2, init_scheme='paper')
  chance = math.log(10)
  warnings = [monitor.update(loss) for loss in
              (chance + 0.001, chance - 0.002, chance, chance, 1.2)]
  assert [w is not None for w in warnings] == [False, True, False, False,
                                               False]
  assert 'init_scheme=caffe' in warnings[1] and 'ln(10)' in warnings[1]
  learning = reporting.FlatLossMonitor(10, patience=2, init_scheme='paper')
  assert all(learning.update(loss) is None for loss in (2.3, 1.9, 1.2, 0.8))


@pytest.mark.parametrize('overrides,message', [
    (dict(batch_size=5, num_devices=4), 'batch_size=5 must be divisible'),
    (dict(image_size=66, resize_size=70), 'at least 67'),
    (dict(num_devices=3, model_parallel=True), 'odd number'),
    (dict(checkpoint_every_steps=0), 'checkpoint_every_steps=0 must be'),
    (dict(eval_every_epochs=-1.0), 'eval_every_epochs=-1.0 must be'),
    (dict(init_scheme='xavier'), 'init_scheme'),
    (dict(lr_drop_epochs=(0.01, 0.005)), 'must be increasing epochs'),
    (dict(lr_drop_epochs=(1000.0,)), 'inside the run'),
])
def test_bad_configs_are_refused_before_any_work(tiny, tmp_path, overrides,
                                                 message):
  workdir = tmp_path / 'run'
  with pytest.raises(errors.ConfigError, match=message):
    train.train_and_evaluate(tiny(**overrides), str(workdir))
  assert not workdir.exists()


def _main(repo, *args):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2')
  return subprocess.run([sys.executable, 'main.py', *args], cwd=repo, env=env,
                        capture_output=True, text=True, timeout=600)


def test_main_overrides_a_field(repo, data_dir, tmp_path):
  result = _main(repo, '--config=configs/alexnet.py:tiny',
                 f'--workdir={tmp_path}',
                 f'--config.data_dir={data_dir}', '--config.num_train_steps=2',
                 '--config.batch_size=4')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'step 2/2' in result.stderr
  assert os.listdir(tmp_path / 'checkpoints') == ['2']


def test_main_refuses_an_unknown_field(repo, tmp_path):
  result = _main(repo, '--config=configs/alexnet.py:tiny',
                 f'--workdir={tmp_path}',
                 '--config.batch_sise=4')
  assert result.returncode != 0
  assert 'batch_sise' in result.stderr
  assert not os.listdir(tmp_path)


def test_main_explains_a_missing_dataset(repo, tmp_path):
  result = _main(repo, '--config=configs/alexnet.py',
                 f'--workdir={tmp_path}/run',
                 f'--config.data_dir={tmp_path}/data')
  assert result.returncode != 0
  assert 'ILSVRC2012_img_train.tar' in result.stderr
  assert 'Traceback' not in result.stderr
  assert not os.path.exists(tmp_path / 'run')
