"""What a run writes as it goes: TensorBoard scalars, pictures and the log.

Train metrics are averaged between writes, with throughput and an ETA;
evaluation results go out with the learning-rate drops so far and the conv1
kernels (the paper's Figure 3), and a validation loss stuck at chance gets
one warning naming its known cause. A non-finite average loss stops the run
at the write that sees it, before anything else is saved.

Throughput counts training alone: time spent in `Reporter.paused` blocks
(evaluations, checkpoints) is left out of images/s and step time, and
spread over the remaining steps in the ETA. Durations print with days
(`2d 03:14:00`), since a paper-sized run lasts about a week.
`logged_scalars` reads a scalar back from a workdir (benches, experiments).
"""

import contextlib
import glob
import math
import os
import time
from collections.abc import Callable, Iterator

from absl import logging
from clu import metric_writers
import jax
import ml_collections
import numpy as np
import tensorflow as tf

from alexnet import errors
from alexnet import parallel
from alexnet import pictures
from alexnet import schedule as schedule_lib


def format_duration(seconds: float) -> str:
  """'2d 03:14:00' (days, then hh:mm:ss); under a day '03:14:00'.

  Args:
    seconds: a duration; rounded to whole seconds.

  Returns:
    The text; '?' for a duration that is not finite (no rate measured yet).
  """
  if not math.isfinite(seconds):
    return '?'
  days, rest = divmod(max(0, round(seconds)), 86_400)
  hours, rest = divmod(rest, 3_600)
  minutes, secs = divmod(rest, 60)
  clock = f'{hours:02d}:{minutes:02d}:{secs:02d}'
  return f'{days}d {clock}' if days else clock


def logged_scalars(workdir: str, tag: str) -> dict[int, float]:
  """{step: value} of a scalar a run wrote to its TensorBoard files.

  Args:
    workdir: a `train_and_evaluate` workdir.
    tag: the scalar's name, e.g. 'eval/centre_top1_error'.

  Returns:
    Every logged value by step, over all of the workdir's event files (a
    resumed run writes a new file); empty if the scalar was never written.
  """
  values = {}
  for path in sorted(glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))):
    # Read as records, not with summary_iterator, which is deprecated and
    # says so on every call.
    for record in tf.data.TFRecordDataset(path):
      event = tf.compat.v1.Event.FromString(record.numpy())
      for value in event.summary.value:
        if value.tag == tag:
          values[event.step] = float(tf.make_ndarray(value.tensor))
  return values


class FlatLossMonitor:
  """Notices a validation loss stuck at chance, ln(num_classes).

  That is the widely reported "flat loss" of the paper's initialisation
  (biases 1, weights N(0, 0.01)) when inputs are not mean-subtracted 0-255
  pixels or are tiny (docs/REFERENCE.md, Initialization): the net learns
  only the class prior.
  """

  def __init__(self, num_classes: int, patience: int, init_scheme: str):
    self._chance = math.log(num_classes)
    self._num_classes, self._patience = num_classes, patience
    self._init_scheme = init_scheme
    self._flat = 0

  def update(self, loss: float) -> str | None:
    """The warning, once, when the loss has been flat `patience` times."""
    flat = abs(loss - self._chance) < 0.01 * self._chance
    self._flat = self._flat + 1 if flat else 0
    if self._flat != self._patience:
      return None
    return (f'The validation loss has stayed at ln({self._num_classes}) = '
            f'{self._chance:.3f} (chance) for {self._patience} evaluations: '
            "the net is not learning. A known cause is the paper's "
            'initialisation (biases 1, weights N(0, 0.01)) with inputs that '
            'are not mean-subtracted 0-255 pixels, or tiny inputs such as the '
            'digits; try --config.init_scheme=caffe (config.init_scheme is '
            f'now {self._init_scheme!r}).')


class Reporter:
  """Writes a run's train and evaluation results.

  A step's train metrics stay on the devices until `flush`, so recording
  them never waits for the devices.

  Not `clu.periodic_actions.ReportProgress`: its steps/s counts the time of
  its `timed` parts (evaluations) too, and its ETA ('1d10h17m') goes to a
  work-unit note rather than this log line.
  """

  def __init__(self, config: ml_collections.ConfigDict, num_classes: int,
               schedule: schedule_lib.Schedule,
               writer: metric_writers.MetricWriter, workdir: str, *,
               clock: Callable[[], float] = time.monotonic):
    """Writes nothing yet.

    Args:
      config: uses batch_size (for images/s), flat_loss_evals and
        init_scheme (for the flat-loss warning).
      num_classes: the dataset's classes: chance loss is ln(num_classes).
      schedule: the run's durations, for percentages and the ETA.
      writer: where scalars and pictures go.
      workdir: where process 0 saves conv1_kernels.png.
      clock: seconds, monotonic (tests pass a fake one).
    """
    self._batch_size, self._schedule = config.batch_size, schedule
    self._writer, self._workdir, self._clock = writer, workdir, clock
    self._flat_loss = FlatLossMonitor(num_classes, config.flat_loss_evals,
                                      config.init_scheme)
    self._pending = []
    now = clock()
    # (step, time) where this process started, and of the last flush.
    self._start = self._since = (0, now)
    # Seconds in `paused` blocks since the start, and since the last flush.
    self._paused_total = self._paused = 0.0

  def start(self, layout: parallel.Layout, step: int) -> None:
    """Logs what the run will do, on which devices; times from `step`."""
    self._start = self._since = (step, self._clock())
    if layout.towers_per_device == 1:
      devices = (f'{layout.num_devices} devices: {layout.num_replicas} '
                 'replica(s) of a tower pair, one tower per device')
    else:
      devices = (f'{layout.num_devices} device(s), both towers on each, '
                 f'{layout.num_replicas} data-parallel replica(s)')
    logging.info('%s; %d steps of %d images (%d per epoch), evaluating every '
                 '%d.', devices, self._schedule.total_steps, self._batch_size,
                 self._schedule.steps_per_epoch, self._schedule.eval_every)

  def record(self, metrics: dict[str, jax.Array]) -> None:
    """Keeps one step's {'loss', 'accuracy'} for the next `flush`."""
    self._pending.append(metrics)

  @contextlib.contextmanager
  def paused(self) -> Iterator[None]:
    """Leaves the block's wall time (evaluation, saving) out of images/s.

    Call it right after a `flush`, which waits for the devices, so that no
    training step is still running when the block starts.
    """
    start = self._clock()
    try:
      yield
    finally:
      seconds = self._clock() - start
      self._paused += seconds
      self._paused_total += seconds

  def flush(self, step: int, learning_rate: float) -> None:
    """Writes the averages since the last flush and logs a progress line.

    Args:
      step: steps done.
      learning_rate: the rate of the last step.

    Raises:
      errors.DivergedError: the average loss is not finite. Raised before
        the caller saves anything, so the last checkpoint stays the last
        good one.
    """
    if not self._pending:
      return
    metrics = jax.device_get(self._pending)
    self._pending = []
    mean = {k: float(np.mean([m[k] for m in metrics])) for k in metrics[0]}
    (last_step, last_time), now = self._since, self._clock()
    train_seconds = max(now - last_time - self._paused, 1e-9)
    self._since, self._paused = (step, now), 0.0
    steps_per_s = (step - last_step) / train_seconds
    images_per_s = steps_per_s * self._batch_size
    self._writer.write_scalars(step, {
        'train/loss': mean['loss'], 'train/accuracy': mean['accuracy'],
        'train/lr': learning_rate, 'train/images_per_s': images_per_s,
        'train/step_time_s': 1 / max(steps_per_s, 1e-9)})
    if not math.isfinite(mean['loss']):
      raise errors.DivergedError(
          f'Training diverged: the mean loss of steps {last_step + 1}-{step} '
          f'is {mean["loss"]}. Nothing non-finite was saved: the last good '
          f'checkpoint is kept in {self._workdir}. Lower '
          '--config.learning_rate or check the input scale, then rerun.')
    logging.info(
        'step %d/%d (%.1f%%, epoch %.2f) | loss %.4f | accuracy %.2f%% | lr %g'
        ' | %.1f images/s | elapsed %s | ETA %s', step,
        self._schedule.total_steps, 100 * step / self._schedule.total_steps,
        step / self._schedule.steps_per_epoch, mean['loss'],
        100 * mean['accuracy'], learning_rate, images_per_s,
        format_duration(now - self._start[1]),
        format_duration(self.eta_seconds(step, steps_per_s)))

  def eta_seconds(self, step: int, steps_per_s: float) -> float:
    """Seconds to the last step: training at `steps_per_s`, plus the paused
    time so far (evaluations, saving) per step done, for each step left."""
    done = step - self._start[0]
    overhead = self._paused_total / done if done > 0 else 0.0
    left = self._schedule.total_steps - step
    return left * (1 / max(steps_per_s, 1e-9) + overhead)

  def write_evaluation(self, step: int, results: dict[str, dict[str, float]],
                       lr_drops: int, conv1_kernel: np.ndarray) -> None:
    """Writes {split: metrics}, the drops so far and the conv1 kernels.

    Args:
      step: the step evaluated.
      results: {split: {metric: value}}; 'eval' feeds the flat-loss check.
      lr_drops: how many times the learning rate has been divided.
      conv1_kernel: host [towers, kh, kw, 3, n] conv1 kernels.
    """
    scalars = {f'{split}/{name}': value for split, metrics in results.items()
               for name, value in metrics.items()}
    scalars['train/lr_drops'] = lr_drops
    self._writer.write_scalars(step, scalars)
    warning = self._flat_loss.update(results['eval']['centre_loss'])
    if warning:
      logging.warning(warning)
    picture = pictures.kernel_grid(conv1_kernel)
    self._writer.write_images(step, {'conv1_kernels': picture[None]})
    if jax.process_index() == 0:
      pictures.save_png(picture,
                        os.path.join(self._workdir, 'conv1_kernels.png'))
