"""Host overhead of the training loop per step, on 4 fake CPU devices.

Runs `train.train_and_evaluate` (the real loop: tf.data pipeline, prefetch
thread, mapped step with on-device normalisation, metrics, stop checks)
on the paper's net at its cheapest (one kernel per tower in every layer,
`CHEAPEST_WIDTH`), so that what remains is mostly the host's work, and
times, side by side in one run, a pure loop calling the same mapped step
(`steps.map_train_step`, as the real loop maps it) on one batch already on
the devices.

Per step it prints the marginal wall time (the difference of a long and a
short run over the difference of their steps, which cancels compilation,
evaluation and checkpoints) and the main thread's CPU time, and the input
pipeline's time alone: with a model this cheap the loop waits for tf.data
on a small host, and the main thread's CPU time is the loop's own cost.
Target: the real loop's overhead over the pure loop <= 2 ms per step.

    python bench/loop_overhead.py [--steps=2000]
"""

import os
import sys
import tempfile
import time

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=4')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# Runnable as `python bench/loop_overhead.py` from the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
import jax
import numpy as np

from alexnet import backend
from alexnet import parallel
from alexnet import steps
from configs import alexnet
import input_pipeline
import train

_STEPS = flags.DEFINE_integer('steps', 2000, 'Steps of the long runs.')
# Both loops wait for the devices this often (the real loop when it logs):
# XLA's CPU collectives time out when hundreds of steps are in flight on a
# loaded 2-core host.
SYNC_EVERY = 50
# One kernel per tower in every layer: the paper's net at its cheapest.
CHEAPEST_WIDTH = 0.01


def _config(data_dir: str, num_steps: int):
  config = alexnet.get_config('tiny')
  config.width = CHEAPEST_WIDTH
  # Evaluation and checkpoints only at the end, so that long and short runs
  # do the same fixed work, which their difference cancels.
  config.update(dict(data_dir=data_dir, num_devices=4,
                     num_train_steps=num_steps, batch_size=8,
                     checkpoint_every_steps=10 ** 6,
                     eval_every_epochs=10 ** 3, log_every_steps=SYNC_EVERY,
                     eval_split='test[:8]'))
  return config


def real_loop(data_dir: str, num_steps: int) -> tuple[float, float]:
  """(wall s, main-thread CPU s) of a whole run of `num_steps` steps."""
  with tempfile.TemporaryDirectory() as workdir:
    wall, cpu = time.perf_counter(), time.thread_time()
    train.train_and_evaluate(_config(data_dir, num_steps), workdir)
    return time.perf_counter() - wall, time.thread_time() - cpu


def pure_loop(data_dir: str, num_steps: int) -> tuple[float, float]:
  """(wall s, main-thread CPU s) of `num_steps` mapped steps on one batch.

  The same device work as the real loop's steps (`steps.map_train_step`:
  the uint8 batch normalised on the devices, then `steps.train_step`), with
  nothing on the host between.
  """
  config = _config(data_dir, num_steps)
  layout = parallel.Layout.create(True, jax.devices()[:4])
  num_classes = input_pipeline.get_dataset_info(config).num_classes
  state = steps.create_train_state(
      config, steps.create_model(config, num_classes))
  device_state = layout.shard_towers({'params': state.params,
                                      'opt_state': state.opt_state})
  batch = layout.shard_batch(next(input_pipeline.create_train_iterator(
      config, replicas=layout.local_replicas,
      num_replicas=layout.num_replicas)))
  mean = layout.replicate(input_pipeline.mean_image(config))
  step_fn = steps.map_train_step(
      steps.create_model(config, num_classes, layout.exchange), layout,
      config)
  device_state, _ = step_fn(device_state, batch, mean, 0.01, 0)  # Compiles.
  jax.block_until_ready(device_state)
  wall, cpu = time.perf_counter(), time.thread_time()
  for i in range(num_steps):
    device_state, metrics = step_fn(device_state, batch, mean, 0.01, i)
    if i % SYNC_EVERY == 0:
      jax.block_until_ready(metrics)
  jax.block_until_ready((device_state, metrics))
  return time.perf_counter() - wall, time.thread_time() - cpu


def pipeline_only(data_dir: str, num_steps: int) -> float:
  """Wall s for the real loop's input pipeline to yield `num_steps` batches."""
  config = _config(data_dir, num_steps)
  layout = parallel.Layout.create(True, jax.devices()[:4])
  batches = input_pipeline.create_train_iterator(
      config, replicas=layout.local_replicas,
      num_replicas=layout.num_replicas)
  next(batches)
  start = time.perf_counter()
  for _ in range(num_steps):
    next(batches)
  return time.perf_counter() - start


def main(argv):
  del argv
  backend.start()  # As main.py does: the backend and its CPU options.
  logging.set_verbosity(logging.WARNING)
  long, short = _STEPS.value, _STEPS.value // 4
  with tempfile.TemporaryDirectory() as data_dir:
    real_loop(data_dir, short)  # Prepares the data, warms the caches.
    real = np.subtract(real_loop(data_dir, long), real_loop(data_dir, short))
    pure = pure_loop(data_dir, long - short)
    pipeline = pipeline_only(data_dir, long - short)
  real_ms = 1e3 * real / (long - short)
  pure_ms = 1e3 * np.asarray(pure) / (long - short)
  print(f'4 fake devices (2 replicas of a tower pair), batch 8, '
        f'{long - short} steps; load average {os.getloadavg()[0]:.1f}')
  print(f'{"ms per step":30s} {"wall":>8s} {"main-thread CPU":>16s}')
  print(f'{"real loop (train_and_evaluate)":30s} {real_ms[0]:8.2f} '
        f'{real_ms[1]:16.2f}')
  print(f'{"pure loop (mapped step only)":30s} {pure_ms[0]:8.2f} '
        f'{pure_ms[1]:16.2f}')
  print(f'{"host overhead (real - pure)":30s} {real_ms[0] - pure_ms[0]:8.2f} '
        f'{real_ms[1] - pure_ms[1]:16.2f}   (target <= 2 ms)')
  print(f'{"input pipeline alone":30s} '
        f'{1e3 * pipeline / (long - short):8.2f}   (tf.data on this host\'s '
        f'{os.cpu_count()} cores, the same threads the loop shares)')


if __name__ == '__main__':
  app.run(main)
