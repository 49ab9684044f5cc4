"""Tests of the ablation table (bench/ablations.py).

Training itself is `train.train_and_evaluate`, tested in test_train.py;
here one tiny run checks that a stopped run is resumed, not recorded.
"""

import json
import os

from clu import metric_writers
import numpy as np
import pytest

from alexnet import distributed
from alexnet import errors
from bench import ablations


def test_statistics_mean_sample_std_and_range():
  s = ablations.statistics([0.10, 0.12, 0.17])
  assert s['mean'] == pytest.approx(0.13)
  # Sample standard deviation: sqrt(((-.03)^2 + (-.01)^2 + .04^2) / 2).
  assert s['std'] == pytest.approx(np.sqrt(0.0026 / 2))
  assert (s['min'], s['max'], s['runs']) == (0.10, 0.17, 3)
  assert ablations.statistics([0.2])['std'] == 0.0


def test_table_rows_deltas_and_paper_figures():
  table = ablations.format_table({'paper': [0.02, 0.04],
                                  'no_lrn': [0.05, 0.05],
                                  'pool_2x2': [0.01, 0.03]})
  lines = table.splitlines()
  assert len(lines) == 5 and lines[0].startswith('| setting |')
  assert lines[2] == ('| paper | (defaults) | 3.00 ± 1.41 | 2.00-4.00 | 2 '
                      "|  | the paper's net: 40.7 / 18.2 (ILSVRC-2012 val) |")
  assert lines[3] == ('| no_lrn | lrn.enabled=False | 5.00 ± 0.00 | '
                      '5.00-5.00 | 2 | +2.00 | +1.4 / +1.2 |')
  assert '| pool_size=2, pool_stride=2 |' in lines[4]
  assert '| -1.00 | +0.4 / +0.3 |' in lines[4]


def test_table_without_the_paper_row_has_no_deltas():
  line = ablations.format_table({'no_pca': [0.1]}).splitlines()[2]
  assert line.split('|')[6].strip() == ''


def test_every_setting_names_a_paper_figure():
  assert list(ablations.SETTINGS)[0] == 'paper'
  assert all(s.paper for s in ablations.SETTINGS.values())


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
