"""Does resuming cost more late in an epoch? Seconds to the first batch.

Writes a synthetic training set as the pre-resized shards that
`main.py --mode=prepare` makes (what a long ImageNet run reads with
`--config.use_shards=True`): 50,000 small photo-like JPEGs in shards of
1,024. Then, for a run resumed at 0%, 50% and 99% of an epoch, times what a
resumed `train.py` waits for before its first step: building the training
pipeline (`input_pipeline.create_train_iterator`) and its first batch, in
wall and CPU seconds. The shuffle window is the paper config's (16,384
examples, one replica).

    python bench/resume.py [--examples=50000] [--repeats=3]

The records sit in the page cache (just written), so the figures are the
CPU cost of reading; from a disk or a network filesystem, reading the
records a resume skips costs more.
"""

import argparse
import os
import sys
import tempfile
import time

# Runnable as `python bench/resume.py` from the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ml_collections  # pylint: disable=g-import-not-at-top
import numpy as np
import tensorflow as tf

from alexnet.data import shards
from alexnet.data import sources
from configs import alexnet
import input_pipeline

RESIZE_SIZE = 64  # Stored squares; ~4 KB JPEGs keep the set small.
FRACTIONS = (0.0, 0.5, 0.99)


def _images(start: int, stop: int) -> tf.data.Dataset:
  """(JPEG, label) of examples [start, stop): colour waves plus noise."""
  size = RESIZE_SIZE

  def image(i):
    rng = tf.random.stateless_uniform([3], [i, 0], 0, 6.3)
    ramp = tf.linspace(0.0, 6.0, size)
    wave = tf.sin(ramp[:, None, None] + ramp[None, :, None] / 2 + rng)
    noise = tf.random.stateless_normal([size, size, 3], [i, 1], 0, 20)
    pixels = tf.clip_by_value(127 + 80 * wave + noise, 0, 255)
    return (tf.io.encode_jpeg(tf.cast(pixels, tf.uint8), quality=90),
            tf.cast(i % 10, tf.int32))

  return tf.data.Dataset.range(start, stop).map(
      image, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def write_set(root: str, count: int) -> ml_collections.ConfigDict:
  """Writes the shards of a `count`-example folder dataset; its config."""
  for label in range(10):  # The folder names the data; shards hold it.
    os.makedirs(os.path.join(root, 'images', 'train', f'c{label}'))
  config = alexnet.get_config()
  config.update(dict(dataset='folder', folder=os.path.join(root, 'images'),
                     data_dir=os.path.join(root, 'data'), use_shards=True,
                     train_split='train', eval_split='train[:128]',
                     resize_size=RESIZE_SIZE, image_size=RESIZE_SIZE - 8,
                     batch_size=128))
  source = sources.make_source(config)
  directory = shards.shards_directory(config, source.tag)
  os.makedirs(directory)
  bounds = shards.shard_bounds(count, shards.EXAMPLES_PER_SHARD)
  plan = [('train', i, len(bounds), start, stop)
          for i, (start, stop) in enumerate(bounds)]
  for split, index, shard_count, start, stop in plan:
    shards.write_shard(
        os.path.join(directory, shards.shard_name(split, index, shard_count)),
        _images(start, stop))
  shards.write_manifest(directory, source, RESIZE_SIZE, plan)
  return config


def seconds_to_first_batch(config: ml_collections.ConfigDict,
                           start_step: int) -> tuple[float, float]:
  """(wall, CPU) seconds to build the pipeline at `start_step` and get a
  batch. CPU time counts every thread of this process (tf.data's too), so
  it stays comparable when other work loads the machine."""
  wall, cpu = time.perf_counter(), time.process_time()
  iterator = input_pipeline.create_train_iterator(
      config, replicas=[0], num_replicas=1, start_step=start_step)
  next(iterator)
  return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--examples', type=int, default=50_000)
  parser.add_argument('--repeats', type=int, default=3,
                      help='timings per position; the fastest is printed')
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as root:
    start = time.perf_counter()
    config = write_set(root, args.examples)
    print(f'{args.examples} records in shards of {shards.EXAMPLES_PER_SHARD}'
          f' written in {time.perf_counter() - start:.1f} s; '
          f'{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}.')
    input_pipeline.mean_image(config)  # Colour statistics, not timed.
    steps = input_pipeline.steps_per_epoch(
        config, input_pipeline.get_dataset_info(config), 1)
    seconds_to_first_batch(config, 0)  # Warm-up: tracing, not timed.
    print(f'batch {config.batch_size}, {steps} steps per epoch, shuffle '
          f'window {config.shuffle_buffer}')
    print('seconds to the first batch (fastest of each):')
    print(f'{"resumed at":>10s} {"step":>5s} {"wall":>7s} {"CPU":>7s}  '
          'CPU vs the 0% case')
    first = None
    for fraction in FRACTIONS:
      step = min(int(fraction * steps), steps - 1)
      timings = [seconds_to_first_batch(config, step)
                 for _ in range(args.repeats)]
      wall, cpu = min(t[0] for t in timings), min(t[1] for t in timings)
      first = first or cpu
      print(f'{fraction:10.0%} {step:5d} {wall:7.2f} {cpu:7.2f}  '
            f'{cpu / first:.2f}x')


if __name__ == '__main__':
  main()
