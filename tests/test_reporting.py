"""The progress line of long runs, and the stop at a non-finite loss."""

import os
import re
import types

from absl import logging
from clu import metric_writers
import numpy as np
import pytest

from alexnet import checkpoints
from alexnet import errors
from alexnet import reporting
from alexnet import schedule as schedule_lib
from configs import alexnet as configs
import train


@pytest.mark.parametrize('seconds, text', [
    (0, '00:00:00'), (59.6, '00:01:00'), (3_599, '00:59:59'),
    (86_399, '23:59:59'), (86_400, '1d 00:00:00'),
    (2 * 86_400 + 3 * 3_600 + 14 * 60, '2d 03:14:00'),
    (100 * 86_400 + 1, '100d 00:00:01'), (float('inf'), '?')])
def test_durations_show_days_instead_of_wrapping(seconds, text):
  assert reporting.format_duration(seconds) == text


class _Clock:
  """A hand-moved clock: the reporter reads it, the test advances it."""

  def __init__(self):
    self.now = 1_000.0

  def __call__(self):
    return self.now


class _Writer:
  """Keeps {step: scalars}."""

  def __init__(self):
    self.scalars = {}

  def write_scalars(self, step, scalars):
    self.scalars.setdefault(step, {}).update(scalars)


def _reporter(clock, writer, total_steps=1_000_000):
  config = configs.get_config('tiny')
  config.batch_size = 32
  schedule = schedule_lib.Schedule(steps_per_epoch=10_000,
                                   total_steps=total_steps, eval_every=10)
  reporter = reporting.Reporter(config, 10, schedule, writer, '/run',
                                clock=clock)
  layout = types.SimpleNamespace(towers_per_device=2, num_devices=1,
                                 num_replicas=1)
  reporter.start(layout, step=0)
  return reporter


def _steps(reporter, clock, count, seconds_each, loss=1.0):
  for _ in range(count):
    clock.now += seconds_each
    reporter.record({'loss': np.float32(loss), 'accuracy': np.float32(0.5)})


def test_images_per_s_leave_out_evaluation_and_the_eta_counts_it(
    monkeypatch):
  clock, writer, lines = _Clock(), _Writer(), []
  monkeypatch.setattr(logging, 'info',
                      lambda message, *args: lines.append(message % args))
  reporter = _reporter(clock, writer)
  _steps(reporter, clock, 10, seconds_each=0.5)
  reporter.flush(10, 0.01)
  with reporter.paused():  # An evaluation of 95 s.
    clock.now += 95
  _steps(reporter, clock, 10, seconds_each=0.5)
  reporter.flush(20, 0.01)
  # 10 steps of 32 images in 5 s of training, before and after the pause.
  assert writer.scalars[10]['train/images_per_s'] == pytest.approx(64)
  assert writer.scalars[20]['train/images_per_s'] == pytest.approx(64)
  assert writer.scalars[20]['train/step_time_s'] == pytest.approx(0.5)
  # Elapsed: 10 s of steps + 95 s paused. ETA: 999,980 steps left at 0.5 s,
  # plus 95 s paused per 20 steps done: 999,980 * 5.25 s = 60d 18:18:15.
  assert lines[-1].endswith('| 64.0 images/s | elapsed 00:01:45 | '
                            'ETA 60d 18:18:15'), lines[-1]
  assert reporter.eta_seconds(20, 2.0) == pytest.approx(999_980 * 5.25)


def test_a_non_finite_mean_loss_stops_at_its_flush():
  clock, writer = _Clock(), _Writer()
  reporter = _reporter(clock, writer)
  _steps(reporter, clock, 2, seconds_each=1.0)
  reporter.flush(2, 0.01)
  _steps(reporter, clock, 1, seconds_each=1.0, loss=float('nan'))
  _steps(reporter, clock, 2, seconds_each=1.0)
  with pytest.raises(errors.DivergedError,
                     match=r'steps 3-5 is nan.*last good checkpoint'):
    reporter.flush(5, 0.01)
  assert np.isnan(writer.scalars[5]['train/loss'])  # Still in TensorBoard.


def test_divergence_stops_the_run_before_its_checkpoint(tiny, tmp_path):
  """At a huge learning rate the loss goes non-finite within a few steps;
  the run stops at the flush of that step, before saving it: every earlier
  step (a checkpoint each here) is kept, and nothing later is written."""
  config = tiny(num_devices=1, checkpoint_every_steps=1, learning_rate=1e30)
  workdir = str(tmp_path / 'run')
  with pytest.raises(errors.DivergedError, match=r'steps (\d)-\1 is nan') as e:
    train.train_and_evaluate(config, workdir)
  assert workdir in str(e.value)
  diverged = int(re.search(r'steps (\d)-', str(e.value)).group(1))
  assert 1 < diverged <= config.num_train_steps
  store = checkpoints.Checkpoints(os.path.join(workdir, 'checkpoints'),
                                  keep=2)
  assert store.latest_step() == diverged - 1
  store.close()


def test_logged_scalars_reads_every_event_file_of_a_workdir(tmp_path):
  # Two writers, as a run and its resumption write two event files.
  for steps in ((1, 2), (3,)):
    writer = metric_writers.create_default_writer(str(tmp_path))
    for step in steps:
      writer.write_scalars(step, {'eval/error': step / 10, 'other': 7.0})
    writer.close()
  assert len(os.listdir(tmp_path)) == 2
  assert reporting.logged_scalars(str(tmp_path), 'eval/error') == (
      pytest.approx({1: 0.1, 2: 0.2, 3: 0.3}))
  assert reporting.logged_scalars(str(tmp_path), 'absent') == {}
