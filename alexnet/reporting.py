"""What a run writes as it goes: TensorBoard scalars, pictures and the log.

Train metrics are averaged between writes, with throughput and an ETA;
evaluation results go out with the learning-rate drops so far and the conv1
kernels (the paper's Figure 3), and a validation loss stuck at chance gets
one warning naming its known cause.
"""

import math
import os
import time

from absl import logging
from clu import metric_writers
import jax
import ml_collections
import numpy as np

from alexnet import parallel
from alexnet import pictures
from alexnet import schedule as schedule_lib


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
  """

  def __init__(self, config: ml_collections.ConfigDict, num_classes: int,
               schedule: schedule_lib.Schedule,
               writer: metric_writers.MetricWriter, workdir: str):
    """Writes nothing yet.

    Args:
      config: uses batch_size (for images/s), flat_loss_evals and
        init_scheme (for the flat-loss warning).
      num_classes: the dataset's classes: chance loss is ln(num_classes).
      schedule: the run's durations, for percentages and the ETA.
      writer: where scalars and pictures go.
      workdir: where process 0 saves conv1_kernels.png.
    """
    self._batch_size, self._schedule = config.batch_size, schedule
    self._writer, self._workdir = writer, workdir
    self._flat_loss = FlatLossMonitor(num_classes, config.flat_loss_evals,
                                      config.init_scheme)
    self._pending = []
    self._since = (0, time.perf_counter())

  def start(self, layout: parallel.Layout, step: int) -> None:
    """Logs what the run will do, on which devices; times from `step`."""
    self._since = (step, time.perf_counter())
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

  def flush(self, step: int, learning_rate: float) -> None:
    """Writes the averages since the last flush and logs a progress line."""
    if not self._pending:
      return
    metrics = jax.device_get(self._pending)
    self._pending = []
    mean = {k: float(np.mean([m[k] for m in metrics])) for k in metrics[0]}
    start_step, start_time = self._since
    self._since = (step, time.perf_counter())
    steps_per_s = (step - start_step) / max(self._since[1] - start_time, 1e-9)
    images_per_s = steps_per_s * self._batch_size
    self._writer.write_scalars(step, {
        'train/loss': mean['loss'], 'train/accuracy': mean['accuracy'],
        'train/lr': learning_rate, 'train/images_per_s': images_per_s,
        'train/step_time_s': 1 / max(steps_per_s, 1e-9)})
    total = self._schedule.total_steps
    eta = (total - step) / max(steps_per_s, 1e-9)
    logging.info(
        'step %d/%d (%.1f%%, epoch %.2f) | loss %.4f | accuracy %.2f%% | lr %g'
        ' | %.1f images/s | ETA %s', step, total, 100 * step / total,
        step / self._schedule.steps_per_epoch, mean['loss'],
        100 * mean['accuracy'], learning_rate, images_per_s,
        time.strftime('%H:%M:%S', time.gmtime(eta)))

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
