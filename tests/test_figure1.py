"""Tests of the Figure 1 experiment (experiments/figure1.py and its table,
experiments/crossings.py).

One tiny run, two seeds, on generated learnable data; the other tests use
hand-made curves.
"""

import glob
import json
import os

import numpy as np
from PIL import Image
import pytest

from alexnet import errors
from alexnet import reporting
from alexnet.data import fashion_mnist
from configs import figure1 as figure1_config
from experiments import crossings
from experiments import figure1

_NUM_IMAGES = 320
_BLUE, _RED = (31, 119, 180), (214, 39, 40)  # tab:blue (ReLU), tab:red.


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
  config.seeds = (0, 1)
  return config


def _first_at_or_below(curve, target):
  errors_ = np.asarray(curve['errors'])
  hits = np.flatnonzero(errors_ <= target)
  return curve['epochs'][hits[0]] if hits.size else None


def _logged_errors(run_dir):
  logged = reporting.logged_scalars(run_dir, 'train/error')
  return [logged[step] for step in sorted(logged)]


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
  root = tmp_path_factory.mktemp('figure1')
  _write_learnable_idx(root)
  config = _tiny_config(root)
  workdir = str(root / 'workdir')
  result = figure1.run_figure1(config, workdir)
  return config, workdir, result


def test_records_every_seeds_curves_from_real_training(tiny_run):
  _, workdir, result = tiny_run
  with open(os.path.join(workdir, 'figure1.json')) as f:
    assert json.load(f) == json.loads(json.dumps(result))
  assert result['seeds'] == [0, 1]
  expected = [round(0.2 * i, 6) for i in range(1, 16)]
  for seed, curves in zip((0, 1), result['curves']):
    for activation in ('relu', 'tanh'):
      curve = curves[activation]
      assert curve['seed'] == seed and not curve['diverged']
      assert [round(e, 6) for e in curve['epochs']] == expected
      # The generated classes are learnable: far below chance.
      assert min(curve['errors']) < 0.45
      # The recorded curve is what training logged, step by step.
      run_dir = os.path.join(workdir, f'seed{seed}',
                             f'{activation}_lr{curve["learning_rate"]:g}')
      assert _logged_errors(run_dir) == pytest.approx(curve['errors'])
  # Seeds change the initial weights and data order, so the curves.
  assert result['curves'][0]['relu']['errors'] != (
      result['curves'][1]['relu']['errors'])


def test_keeps_each_seeds_fastest_learning_rate_and_trains_it_on(tiny_run):
  _, _, result = tiny_run
  assert len(result['sweep']) == 8  # 2 seeds x 2 activations x 2 rates.
  for i, seed in enumerate(result['seeds']):
    for activation in ('relu', 'tanh'):
      sweep = [c for c in result['sweep']
               if c['activation'] == activation and c['seed'] == seed]
      assert [len(c['errors']) for c in sweep] == [5, 5]
      best = min(sweep, key=lambda c: np.mean(c['errors']))
      assert result['learning_rates'][activation][i] == best['learning_rate']
      # The kept run continues from where its sweep stopped.
      assert result['curves'][i][activation]['errors'][:5] == best['errors']


def test_crossing_epochs_and_ratio_spread_match_the_curves(tiny_run):
  _, _, result = tiny_run
  assert [t['error'] for t in result['targets']] == [0.5, 0.25]
  for target in result['targets']:
    reached = {a: [_first_at_or_below(c[a], target['error'])
                   for c in result['curves']] for a in ('relu', 'tanh')}
    assert target['epochs'] == reached
    ratios = [t / r for r, t in zip(reached['relu'], reached['tanh'])
              if r is not None and t is not None]
    assert target['ratio']['n'] == len(ratios)
    if ratios:
      assert target['ratio']['mean'] == pytest.approx(np.mean(ratios))
      assert target['ratio']['std'] == pytest.approx(
          np.std(ratios, ddof=1) if len(ratios) > 1 else 0.0)
  assert None not in result['targets'][0]['epochs']['relu']


def test_writes_a_png_with_both_activations_and_tensorboard(tiny_run):
  _, workdir, _ = tiny_run
  picture = np.asarray(
      Image.open(os.path.join(workdir, 'figure1.png')).convert('RGB'))
  assert picture.shape == (420, 640, 3)
  for colour in (_BLUE, _RED):
    assert np.any(np.abs(picture.astype(int) - colour).sum(-1) <= 30)
  assert glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))


def test_a_second_run_reads_finished_seeds_instead_of_training(tiny_run):
  config, workdir, result = tiny_run
  events = sorted(glob.glob(os.path.join(workdir, 'seed*', '*', 'events*')))
  again = figure1.run_figure1(config, workdir)
  assert json.loads(json.dumps(again)) == json.loads(json.dumps(result))
  assert sorted(glob.glob(
      os.path.join(workdir, 'seed*', '*', 'events*'))) == events


def test_epochs_to_reach_counts_equality_and_may_never_reach():
  curve = crossings.Curve('relu', 0.1, 0, epochs=[0.5, 1.0, 1.5, 2.0],
                        errors=[0.5, 0.25, 0.3, 0.1])
  assert crossings.epochs_to_reach(curve, 0.25) == 1.0
  assert crossings.epochs_to_reach(curve, 0.2) == 2.0
  assert crossings.epochs_to_reach(curve, 0.05) is None


def _hand_made_seeds():
  epochs = [1.0, 2.0, 3.0, 4.0]
  return [  # Per seed: ReLU and tanh curves at epochs 1-4.
      {'relu': crossings.Curve('relu', 0.03, 0, epochs, [0.4, 0.2, 0.1, 0.1]),
       'tanh': crossings.Curve('tanh', 0.01, 0, epochs, [0.5, 0.3, 0.2, 0.2])},
      {'relu': crossings.Curve('relu', 0.1, 1, epochs, [0.2, 0.2, 0.1, 0.1]),
       'tanh': crossings.Curve('tanh', 0.01, 1, epochs, [0.3, 0.2, 0.2, 0.1])},
  ]


def test_summary_ratios_per_seed_and_their_spread():
  config = figure1_config.get_config()
  summary = crossings.summarize(config, _hand_made_seeds())
  assert summary['seeds'] == [0, 1]
  assert summary['learning_rates'] == {'relu': [0.03, 0.1],
                                       'tanh': [0.01, 0.01]}
  at_25, at_15, at_10 = summary['targets']
  # 25%: ReLU at 2 and 1, tanh at 3 and 2: ratios 1.5 and 2.
  assert at_25['epochs'] == {'relu': [2.0, 1.0], 'tanh': [3.0, 2.0]}
  assert at_25['ratios'] == [1.5, 2.0]
  assert at_25['ratio']['mean'] == pytest.approx(1.75)
  assert at_25['ratio']['std'] == pytest.approx(np.sqrt(0.125))  # ddof=1.
  # 10%: seed 0's tanh never gets there: one ratio, 4 / 3.
  assert at_10['epochs'] == {'relu': [3.0, 3.0], 'tanh': [None, 4.0]}
  assert at_10['ratios'] == [None, pytest.approx(4 / 3)]
  assert at_10['ratio'] == {'mean': pytest.approx(4 / 3), 'std': 0.0, 'n': 1}
  assert at_15['epochs']['tanh'] == [None, 4.0]


def test_report_prints_one_table_row_per_target():
  config = figure1_config.get_config()
  summary = crossings.summarize(config, _hand_made_seeds())
  lines = crossings.report(config, 10_000, summary).splitlines()
  assert 'relu: learning rates 0.03, 0.1' in lines[1]
  rows = [line for line in lines if line.startswith('| ')]
  assert len(rows) == 1 + len(config.target_errors)
  assert rows[1] == ('| 25% | 2.00, 1.00 | 3.00, 2.00 | 1.50, 2.00 | '
                     '**1.75 ± 0.35** (2 of 2 seeds) |')
  never = f'>{config.num_epochs:g}'
  assert rows[3] == (f'| 10% | 3.00, 3.00 | {never}, 4.00 | n/a, 1.33 | '
                     '**1.33 ± 0.00** (1 of 2 seeds) |')


def test_fastest_never_keeps_a_diverged_run():
  good = crossings.Curve('tanh', 0.01, 0, epochs=[1.0], errors=[0.6])
  diverged = crossings.Curve('tanh', 0.1, 0, epochs=[1.0], errors=[0.1],
                           diverged=True)
  better = crossings.Curve('tanh', 0.03, 0, epochs=[1.0], errors=[0.4])
  assert crossings.fastest([good, diverged, better]) is better
  assert crossings.fastest([good, diverged]) is good


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
  config.records_per_epoch = 5
  config.seeds = ()
  with pytest.raises(errors.ConfigError, match='config.seeds is empty'):
    figure1.run_figure1(config, str(tmp_path / 'w'))
  assert not (tmp_path / 'w').exists()


def test_the_shipped_config_is_valid():
  config = figure1_config.get_config()
  figure1.validate_config(config, config.num_train)
