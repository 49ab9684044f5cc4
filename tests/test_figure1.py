"""Tests of the Figure 1 command (alexnet/figure1.py) on generated data."""

import glob
import json
import os

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from alexnet import errors
from alexnet import figure1
from alexnet.data import fashion_mnist
from configs import figure1 as figure1_config

_NUM_IMAGES = 320


def _write_learnable_idx(directory):
  """Noise plus a bright 5x5 block whose position gives the class."""
  rng = np.random.default_rng(0)
  labels = (np.arange(_NUM_IMAGES) % 10).astype(np.uint8)
  images = rng.integers(0, 60, (_NUM_IMAGES, 28, 28), dtype=np.uint8)
  for image, label in zip(images, labels):
    top, left = 3 + 14 * (label // 5), 1 + 5 * (label % 5)
    image[top:top + 5, left:left + 5] = 255
  names = fashion_mnist.FILES['train']
  fashion_mnist.write_idx(os.path.join(directory, names[0]), images)
  fashion_mnist.write_idx(os.path.join(directory, names[1]), labels)


def _tiny_config(idx_dir):
  config = figure1_config.get_config()
  config.unlock()
  config.idx_dir = str(idx_dir)
  config.num_train = 0
  config.features = (4, 4, 8)
  config.batch_size = 32  # 10 steps per epoch.
  config.records_per_epoch = 5  # A record every 2 steps.
  config.learning_rates = (0.01, 0.1)
  config.sweep_epochs = 1
  config.num_epochs = 3
  config.target_errors = (0.5, 0.25)
  return config


def _first_at_or_below(curve, target):
  errors_ = np.asarray(curve['errors'])
  hits = np.flatnonzero(errors_ <= target)
  return curve['epochs'][hits[0]] if hits.size else None


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
  root = tmp_path_factory.mktemp('figure1')
  _write_learnable_idx(root)
  config = _tiny_config(root)
  workdir = str(root / 'workdir')
  result = figure1.run_figure1(config, workdir)
  return config, workdir, result


def test_records_both_curves_at_every_fifth_of_an_epoch(tiny_run):
  _, workdir, result = tiny_run
  with open(os.path.join(workdir, 'figure1.json')) as f:
    assert json.load(f) == json.loads(json.dumps(result))
  expected = [round(0.2 * i, 6) for i in range(1, 16)]
  for activation in ('relu', 'tanh'):
    curve = result['curves'][activation]
    assert not curve['diverged']
    assert [round(e, 6) for e in curve['epochs']] == expected
    assert all(0.0 <= e <= 1.0 for e in curve['errors'])
  # The generated classes are learnable: both nets get far below chance.
  for activation in ('relu', 'tanh'):
    assert min(result['curves'][activation]['errors']) < 0.45


def test_keeps_the_fastest_learning_rate_and_trains_it_on(tiny_run):
  _, _, result = tiny_run
  assert len(result['sweep']) == 4
  for activation in ('relu', 'tanh'):
    sweep = [c for c in result['sweep'] if c['activation'] == activation]
    assert [len(c['errors']) for c in sweep] == [5, 5]
    best = min(sweep, key=lambda c: np.mean(c['errors']))
    assert result['learning_rates'][activation] == best['learning_rate']
    full = result['curves'][activation]
    # The kept run continues from where its sweep stopped.
    assert full['errors'][:5] == best['errors']


def test_crossing_epochs_and_ratio_match_the_recorded_curves(tiny_run):
  _, _, result = tiny_run
  assert [t['error'] for t in result['targets']] == [0.5, 0.25]
  for target in result['targets']:
    for activation in ('relu', 'tanh'):
      assert target['epochs'][activation] == _first_at_or_below(
          result['curves'][activation], target['error'])
    relu, tanh = target['epochs']['relu'], target['epochs']['tanh']
    if relu is None or tanh is None:
      assert target['ratio'] is None
    else:
      assert target['ratio'] == pytest.approx(tanh / relu)
  assert result['targets'][0]['epochs']['relu'] is not None


def test_writes_the_png_and_tensorboard_scalars(tiny_run):
  _, workdir, result = tiny_run
  picture = np.asarray(Image.open(os.path.join(workdir, 'figure1.png')))
  assert picture.shape == (420, 640, 3)
  colours = {tuple(p) for p in picture.reshape(-1, 3)}
  assert (0, 0, 200) in colours and (200, 0, 0) in colours  # ReLU, tanh.
  relu = result['curves']['relu']
  run_dir = os.path.join(workdir, f'relu_lr{relu["learning_rate"]:g}')
  logged = {}
  for path in glob.glob(os.path.join(run_dir, 'events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag == 'train/error':
          logged[event.step] = float(tf.make_ndarray(value.tensor))
  assert [logged[s] for s in sorted(logged)] == pytest.approx(
      relu['errors'])
  assert glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))


def test_epochs_to_reach_counts_equality_and_may_never_reach():
  curve = figure1.Curve('relu', 0.1, epochs=[0.5, 1.0, 1.5, 2.0],
                        errors=[0.5, 0.25, 0.3, 0.1])
  assert figure1.epochs_to_reach(curve, 0.25) == 1.0
  assert figure1.epochs_to_reach(curve, 0.2) == 2.0
  assert figure1.epochs_to_reach(curve, 0.05) is None


def test_summary_ratio_is_tanh_over_relu():
  config = figure1_config.get_config()
  chosen = {
      'relu': figure1.Curve('relu', 0.03, epochs=[1.0, 2.0, 3.0],
                            errors=[0.4, 0.2, 0.1]),
      'tanh': figure1.Curve('tanh', 0.01, epochs=[1.0, 2.0, 3.0],
                            errors=[0.5, 0.3, 0.2])}
  summary = figure1.summarize(config, chosen)
  assert summary['learning_rates'] == {'relu': 0.03, 'tanh': 0.01}
  assert summary['targets'][0] == {
      'error': 0.25, 'epochs': {'relu': 2.0, 'tanh': 3.0}, 'ratio': 1.5}
  assert summary['targets'][1] == {
      'error': 0.1, 'epochs': {'relu': 3.0, 'tanh': None}, 'ratio': None}
  text = figure1.report(config, 10_000, summary)
  assert 'epochs to 25% training error: relu 2.00, tanh 3.00' in text
  assert 'ratio tanh/relu 1.50' in text
  assert 'tanh not within 6; ratio tanh/relu n/a' in text


def test_fastest_never_keeps_a_diverged_run():
  good = figure1.Curve('tanh', 0.01, epochs=[1.0], errors=[0.6])
  diverged = figure1.Curve('tanh', 0.1, epochs=[1.0], errors=[0.1],
                           diverged=True)
  better = figure1.Curve('tanh', 0.03, epochs=[1.0], errors=[0.4])
  assert figure1.fastest([good, diverged, better]) is better
  assert figure1.fastest([good, diverged]) is good


def test_refuses_settings_that_cannot_record(tmp_path):
  _write_learnable_idx(tmp_path)
  config = _tiny_config(tmp_path)
  config.num_train = _NUM_IMAGES + 1
  with pytest.raises(errors.ConfigError, match='config.num_train=321'):
    figure1.run_figure1(config, str(tmp_path / 'w'))
  config.num_train = 0
  config.records_per_epoch = 11
  with pytest.raises(errors.ConfigError, match='records_per_epoch=11'):
    figure1.run_figure1(config, str(tmp_path / 'w'))
  assert not (tmp_path / 'w').exists()


def test_the_shipped_config_is_valid():
  config = figure1_config.get_config()
  figure1.validate_config(config, config.num_train)
  assert config.target_errors[0] == 0.25 and config.weight_decay == 0.0
