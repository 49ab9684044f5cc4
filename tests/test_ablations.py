"""Tests of the ablation table (bench/ablations.py).

Training itself is `train.train_and_evaluate`, tested in test_train.py;
here one tiny run checks that a stopped run is resumed, not recorded.
"""

import copy
import json
import os
import statistics

from clu import metric_writers
import numpy as np
import pytest

from alexnet import distributed
from alexnet import errors
from bench import ablations


def test_statistics_agree_with_the_standard_library():
  runs = [0.10, 0.12, 0.17, 0.115]
  s = ablations.statistics(runs)
  assert s['mean'] == pytest.approx(statistics.mean(runs))
  assert s['std'] == pytest.approx(statistics.stdev(runs))  # Sample std.
  assert (s['min'], s['max'], s['runs']) == (min(runs), max(runs), 4)
  assert ablations.statistics([0.2])['std'] == 0.0


def _parse_row(line):
  cells = [cell.strip() for cell in line.strip('|').split('|')]
  mean, std = (float(v) for v in cells[2].split(' ± '))
  low, high = (float(v) for v in cells[3].split('-'))
  delta = float(cells[5]) if cells[5] else None
  return cells[0], cells[1], mean, std, low, high, int(cells[4]), delta


def test_table_rows_match_the_runs_and_the_paper_row():
  top1 = {'paper': [0.02, 0.04, 0.03], 'no_lrn': [0.05, 0.045],
          'pool_2x2': [0.01, 0.03]}
  lines = ablations.format_table(top1).splitlines()
  assert len(lines) == 2 + len(top1) and lines[0].startswith('| setting |')
  paper_mean = 100 * np.mean(top1['paper'])
  for line, (name, runs) in zip(lines[2:], top1.items()):
    row = _parse_row(line)
    percent = 100 * np.asarray(runs)
    assert row[0] == name
    assert row[2:7] == pytest.approx((percent.mean(), percent.std(ddof=1),
                                      percent.min(), percent.max(),
                                      len(runs)), abs=0.005)
    if name == 'paper':
      assert row[7] is None
    else:
      assert row[7] == pytest.approx(percent.mean() - paper_mean, abs=0.005)
    assert line.endswith(f'| {ablations.SETTINGS[name].paper} |')
  assert _parse_row(lines[3])[1] == 'lrn.enabled=False'


def test_table_without_the_paper_row_has_no_deltas():
  line = ablations.format_table({'no_pca': [0.1]}).splitlines()[2]
  assert _parse_row(line)[7] is None


@pytest.mark.parametrize('base', ['digits', 'fashion_mnist'])
def test_every_switch_exists_and_changes_the_paper_setting(base):
  paper = ablations.base_config(base, 1.0, 24.0, 0.02, [18, 22])
  for name, setting in ablations.SETTINGS.items():
    config = copy.deepcopy(paper)
    ablations.apply_overrides(config, setting.overrides)
    assert all(_get(config, field) == value
               for field, value in setting.overrides.items()), name
    # The paper row changes nothing; every other row really turns its
    # switch off (no override that merely restates the paper's value).
    changed = [field for field in setting.overrides
               if _get(config, field) != _get(paper, field)]
    assert bool(changed) == (name != 'paper'), name


def _get(config, dotted):
  for name in dotted.split('.'):
    config = config[name]
  return config


def test_overrides_set_nested_fields_and_refuse_missing_ones():
  config = ablations.base_config('digits', 0.5, 4.0, 0.02, [2, 3.5])
  assert (config.width, config.num_epochs, config.learning_rate,
          config.lr_drop_epochs, config.ten_crop) == (0.5, 4.0, 0.02,
                                                      (2, 3.5), False)
  ablations.apply_overrides(config, {'lrn.alpha': 2e-4, 'pca_sigma': 0.0})
  assert config.lrn.alpha == 2e-4 and config.pca_sigma == 0.0
  for missing in ('lrn.no_such_field', 'no_such_field', 'width.x'):
    with pytest.raises(errors.ConfigError, match=repr(missing)):
      ablations.apply_overrides(config, {missing: 1})


def test_parse_settings_keeps_table_order_and_refuses_unknown():
  assert ablations.parse_settings('all') == list(ablations.SETTINGS)
  assert ablations.parse_settings('no_pca, paper') == ['paper', 'no_pca']
  with pytest.raises(errors.ConfigError, match='no_such'):
    ablations.parse_settings('paper,no_such')


def test_final_error_is_the_last_step_over_all_event_files(tmp_path):
  # Two event files, as a resumed run leaves; steps out of order.
  for steps in ((10, 30), (20,)):
    writer = metric_writers.SummaryWriter(str(tmp_path))
    for step in steps:
      writer.write_scalars(step, {ablations.ERROR_TAG: step / 100,
                                  'eval/centre_loss': 9.0})
    writer.close()
  assert ablations.final_error(str(tmp_path)) == pytest.approx(0.30)
  with pytest.raises(ValueError, match='no_tag'):
    ablations.final_error(str(tmp_path), tag='no_tag')


def test_finished_runs_are_read_not_retrained(tmp_path):
  workdir = tmp_path / 'paper' / 'seed1'
  workdir.mkdir(parents=True)
  (workdir / 'result.json').write_text(json.dumps({'error': 0.25,
                                                   'seconds': 12.0}))
  # A config that could not train proves nothing is trained.
  result = ablations.run_one(None, 'paper', 1, str(tmp_path))
  assert result == {'error': 0.25, 'seconds': 12.0}
  assert os.listdir(workdir) == ['result.json']


def test_a_stopped_run_is_not_recorded_and_resumes_to_the_end(
    tiny, tmp_path, monkeypatch):
  config = tiny(num_devices=1)  # 4 steps, evaluated at the last.
  with monkeypatch.context() as patch:  # As if SIGTERM came at step 2.
    patch.setattr(distributed.StopSignal, 'should_stop',
                  lambda self, step: step >= 2)
    with pytest.raises(ablations.Stopped, match='step 2 of 4'):
      ablations.run_one(config, 'paper', 0, str(tmp_path))
  workdir = tmp_path / 'paper' / 'seed0'
  assert not (workdir / 'result.json').exists()
  result = ablations.run_one(config, 'paper', 0, str(tmp_path))
  assert result['error'] == ablations.final_error(str(workdir))
  assert json.loads((workdir / 'result.json').read_text()) == result
