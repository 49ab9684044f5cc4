"""Training end to end, evaluating a checkpoint, main.py, optimizer, plateau.

Resuming (== an uninterrupted run) is tested in test_faults.py, on runs
stopped by signals and kills.
"""

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
from experiments import learning_curve
from experiments import plots
import input_pipeline
import main
import processes
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
  """A finished 4-step run on two devices (one tower each), the learning
  rate dropped by a fixed epoch from the third step on: (config, dir)."""
  workdir = str(tmp_path_factory.mktemp('two_devices'))
  config = tiny(num_devices=2)
  per_epoch = input_pipeline.steps_per_epoch(
      config, input_pipeline.get_dataset_info(config), num_replicas=1)
  config.lr_drop_epochs = (2 / per_epoch,)
  state = train.train_and_evaluate(config, workdir)
  assert state.step == 4
  return config, workdir


def test_end_to_end_two_devices_with_a_fixed_lr_drop(trained):
  config, workdir = trained
  _assert_finished_run(workdir, steps=4)
  assert train.planned_steps(config) == 4
  lr = config.learning_rate  # Logged after each step, at its 1-based count.
  assert _scalars(workdir)['train/lr'] == pytest.approx(
      {1: lr, 2: lr, 3: lr / 10, 4: lr / 10})


def test_learning_curve_places_each_evaluation_at_its_epoch(trained,
                                                           tmp_path):
  config, workdir = trained
  # 1,347 training digits (sklearn's 1,797, less the 450 of the test
  # split), 8 images a step: 168 steps an epoch, and the run's one
  # evaluation is after its 4 steps.
  per_epoch = learning_curve.steps_per_epoch(config)
  assert per_epoch == 168
  curves = learning_curve.read_curves(workdir, per_epoch)
  assert set(curves) == {'train', 'eval'}  # No minival split.
  epochs, (error,) = curves['eval']
  assert epochs == pytest.approx([4 / 168])
  _, results = train.evaluate_checkpoint(config, workdir, 'latest')
  assert error == pytest.approx(results['eval']['centre_top1_error'])
  percent = f'{100 * error:.2f}'
  # Two runs (here the same one twice): each one's error, their mean, std.
  assert learning_curve.table([curves, curves]).splitlines()[1].split() == [
      'epoch', '0.02', percent, percent, 'mean', percent, '+-', '0.00']
  epochs, error = curves['train']
  assert epochs == pytest.approx(np.arange(1, 5) / 168)
  accuracy = _scalars(workdir)['train/accuracy']
  assert error == pytest.approx([1 - accuracy[s] for s in range(1, 5)])
  path = str(tmp_path / 'curve.png')
  plots.save_png(learning_curve.draw([curves], 'digits'), path)
  picture = np.asarray(Image.open(path))
  assert picture.shape[:2] == (420, 640) and picture.std() > 0


def test_end_to_end_one_device_mock_imagenet(tiny, testdata, tmp_path):
  config = tiny(data_dir=str(tmp_path / 'data'), dataset='imagenet2012',
                train_split='train', eval_split='validation', num_devices=1,
                num_train_steps=2, pca_stats='imagenet')
  with tfds.testing.mock_data(num_examples=16, data_dir=testdata,
                              policy=tfds.testing.MockPolicy.USE_FILES):
    state = train.train_and_evaluate(config, str(tmp_path / 'run'))
  _assert_finished_run(str(tmp_path / 'run'), steps=2)
  assert state.params['fc8']['kernel'].shape[-1] == 500  # 1000 classes.


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


def test_eval_mode_prints_the_runs_own_evaluation(trained, monkeypatch,
                                                 capsys):
  """main.py --mode=eval restores the last checkpoint on another layout
  (one device), scores what the run logged when it evaluated the same
  parameters, and prints each crop's errors. (Which checkpoint 'best',
  'latest' or a step finds: test_checkpoints.py.)"""
  config, workdir = trained
  logged = _scalars(workdir)
  config = config.copy_and_resolve_references()
  config.num_devices = 1
  evaluations = []
  evaluate = train.evaluate_checkpoint
  monkeypatch.setattr(train, 'evaluate_checkpoint',
                      lambda *args: evaluations.append(evaluate(*args))
                      or evaluations[-1])
  main.run(config, workdir, mode='eval', checkpoint='latest')
  [(step, results)] = evaluations
  assert step == 4 and set(results) == {'eval'}
  printed = capsys.readouterr().out
  assert f'Checkpoint of step 4 in {workdir}:' in printed
  for crop in ('centre', 'ten_crop'):
    for name in ('top1_error', 'top5_error', 'loss'):
      assert results['eval'][f'{crop}_{name}'] == pytest.approx(
          logged[f'eval/{crop}_{name}'][4], rel=1e-5), (crop, name)
    metrics = {k: results['eval'][f'{crop}_{k}']
               for k in ('top1_error', 'top5_error', 'loss')}
    assert (f"eval     {crop:8s} top-1 error "
            f"{100 * metrics['top1_error']:6.2f}%  top-5 error "
            f"{100 * metrics['top5_error']:6.2f}%  loss "
            f"{metrics['loss']:.4f}") in printed, printed


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
    (dict(batch_size=5),
     'config.batch_size=5 must be divisible by the 2 data-parallel'),
    (dict(image_size=66, resize_size=70),
     'config.image_size=66 is too small.*use at least 67'),
    (dict(num_devices=3), 'has 3 devices, an odd number'),
    (dict(dataset='no_such_dataset'), "Unknown dataset 'no_such_dataset'"),
    (dict(dataset='imagenet2012', data_dir='{tmp}/data'),
     'ILSVRC2012_img_train.tar'),
    (dict(checkpoint_every_steps=0),
     'config.checkpoint_every_steps=0 must be positive'),
    (dict(eval_every_epochs=-1.0),
     'config.eval_every_epochs=-1.0 must be positive'),
    (dict(log_every_steps=-5), 'config.log_every_steps=-5 must be positive'),
    (dict(num_processes=2),
     'missing: config.coordinator_address, config.process_id'),
    (dict(init_scheme='xavier'), 'config.init_scheme=.xavier.: choose one'),
    (dict(lr_drop_epochs=(0.01, 0.005)), 'must be increasing epochs'),
    (dict(lr_drop_epochs=(1000.0,)), 'inside the run'),
])
def test_bad_config_exits_with_its_message_before_any_work(
    tiny, tmp_path, overrides, message):
  """main.py's refusal, run here (after flag parsing) to save a process:
  the message Python prints as one line before exiting with status 1."""
  overrides = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v
               for k, v in overrides.items()}
  workdir = tmp_path / 'run'
  code = _main_in_process(tiny(**overrides), workdir)
  assert isinstance(code, str) and re.match(f'error: .*{message}', code), code
  assert not workdir.exists()


def test_eval_of_an_empty_workdir_explains_and_creates_nothing(tiny,
                                                               tmp_path):
  code = _main_in_process(tiny(), tmp_path / 'none', mode='eval')
  assert isinstance(code, str) and code.startswith('error: No checkpoint in')
  assert not os.path.exists(tmp_path / 'none')


def _main_in_process(config, workdir, **kwargs) -> str | int | None:
  """The SystemExit code of `main.run`: a message for a refusal."""
  with pytest.raises(SystemExit) as exit_:
    main.run(config, str(workdir), **kwargs)
  return exit_.value.code


def _main(repo, *args):
  return subprocess.run([sys.executable, 'main.py', *args], cwd=repo,
                        env=processes.environment(devices=2),
                        capture_output=True, text=True, timeout=600)


def test_main_applies_its_flags(repo, data_dir, tmp_path):
  """A real process: --config.FIELD overrides reach the run. (A refusal
  from a real process, exit status 1 and one error line:
  test_workdir.py's misspelt field.)"""
  result = _main(repo, '--config=configs/alexnet.py:tiny',
                 f'--workdir={tmp_path}', f'--config.data_dir={data_dir}',
                 '--config.num_train_steps=2', '--config.batch_size=4')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'step 2/2' in result.stderr
  assert '2 steps of 4 images' in result.stderr
  assert os.listdir(tmp_path / 'checkpoints') == ['2']
