"""Pre-resized shards: every image decoded and resized once, as the paper did.

The paper resized its images to 256x256 once, before training. Decoding a
full-size JPEG and resizing it costs several times more than decoding a
256x256 one, and training repeats that work every epoch. `prepare` writes
each split that the config reads as TFRecord shards of `resize_size`-square
JPEGs; with `config.use_shards` the pipeline reads them instead of the
original images, and training's crops take the fused decode-and-crop path.

Layout, under `config.shards_dir` (default `<data_dir>/alexnet_shards`):

    <source tag>/<resize_size>/<split>-00003-of-00040.tfrecord
    <source tag>/<resize_size>/manifest.json

Shard i of a split holds its examples [i * n / N, (i + 1) * n / N) in the
source's order. Safe to interrupt: a shard is written under a temporary name
and renamed when complete, a rerun skips the shards that exist, and the
manifest (which the reader requires) is written last. With several
processes each writes every process_count-th shard.
"""

import json
import math
import os
import time
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import tensorflow as tf

from alexnet import reporting
from alexnet.data import ops
from alexnet.data import sources
from alexnet.errors import DatasetError

Config = ml_collections.ConfigDict
MANIFEST = 'manifest.json'
# Examples per shard: ~1k resized JPEGs is ~30 MB, large enough to read
# fast, small enough that an interruption loses little.
EXAMPLES_PER_SHARD = 1024
# ImageNet's own JPEG settings (quality ~90, chroma at half resolution): on
# photo-like images the re-encoded pixels stay within a level or two of the
# resized ones, and they decode much faster than quality 95 with full
# chroma, which is what a GPU host needs (bench/input_pipeline.py).
JPEG_QUALITY = 90


def shards_directory(config: Config, tag: str) -> str:
  """Where the shards of the source `tag` at config.resize_size live."""
  root = config.shards_dir or os.path.join(sources.data_root(config),
                                           'alexnet_shards')
  return os.path.join(root, tag, str(config.resize_size))


def shard_name(split: str, index: int, count: int) -> str:
  return f'{split}-{index:05d}-of-{count:05d}.tfrecord'


def split_names(config: Config, source: sources.Source) -> list[str]:
  """The whole splits that the config's train/eval/minival specs read."""
  specs = [config.train_split, config.eval_split, config.minival_split]
  names = {name for spec in specs if spec for name, _, _ in
           sources.absolute_ranges(source.split_sizes, spec, source.tag)}
  return sorted(names)


def shard_bounds(num_examples: int, per_shard: int) -> list[tuple[int, int]]:
  """[start, stop) of each shard of a split of num_examples."""
  count = max(1, math.ceil(num_examples / per_shard))
  cuts = [i * num_examples // count for i in range(count + 1)]
  return list(zip(cuts[:-1], cuts[1:]))


def _encoded(source: sources.Source, split: str, start: int, stop: int,
             resize_size: int) -> tf.data.Dataset:
  """(JPEG of the resized centre square, label) of examples [start, stop)."""
  def encode(data, label):
    square = ops.decode_centre_square(source.read(data), resize_size)
    return tf.io.encode_jpeg(square, quality=JPEG_QUALITY), label

  return source.examples(f'{split}[{start}:{stop}]').map(
      encode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def write_shard(path: str, examples: tf.data.Dataset) -> int:
  """Writes a shard under a temporary name, then renames it.

  A process killed mid-shard leaves only the temporary file, which the
  reader never opens and the rerun overwrites.

  Args:
    path: the shard's file (see `shard_name`).
    examples: (JPEG bytes, label) to write, in order.

  Returns:
    The number of examples written.
  """
  temporary = path + '.tmp'
  count = 0
  with tf.io.TFRecordWriter(temporary) as writer:
    for image, label in examples.as_numpy_iterator():
      writer.write(tf.train.Example(features=tf.train.Features(feature={
          'image': tf.train.Feature(bytes_list=tf.train.BytesList(
              value=[image])),
          'label': tf.train.Feature(int64_list=tf.train.Int64List(
              value=[int(label)]))})).SerializeToString())
      count += 1
  os.replace(temporary, path)
  return count


class _Progress:
  """Logs images/s and an ETA after each shard."""

  def __init__(self, total: int):
    self._total, self._done, self._start = total, 0, time.perf_counter()

  def update(self, images: int, path: str) -> None:
    self._done += images
    rate = self._done / max(time.perf_counter() - self._start, 1e-9)
    eta = (self._total - self._done) / max(rate, 1e-9)
    logging.info('prepare: %d/%d images (%.1f%%), %.0f images/s, ETA %s; '
                 'wrote %s', self._done, self._total,
                 100 * self._done / max(self._total, 1), rate,
                 reporting.format_duration(eta), path)


def prepare(config: Config, per_shard: int = EXAMPLES_PER_SHARD) -> str:
  """Writes (or completes) the shards of the splits the config reads.

  Args:
    config: the experiment config: the original data (whatever
      use_shards says), resize_size and shards_dir.
    per_shard: examples per shard.

  Returns:
    The shards directory, with its manifest.
  """
  source = sources.make_source(config)
  directory = shards_directory(config, source.tag)
  os.makedirs(directory, exist_ok=True)
  plan = []
  for split in split_names(config, source):
    bounds = shard_bounds(source.split_sizes[split].num_examples, per_shard)
    plan += [(split, i, len(bounds), start, stop)
             for i, (start, stop) in enumerate(bounds)]
  mine = [job for n, job in enumerate(plan)
          if n % jax.process_count() == jax.process_index() and not
          os.path.exists(os.path.join(directory, shard_name(*job[:3])))]
  progress = _Progress(sum(stop - start for *_, start, stop in mine))
  logging.info('prepare: %d of %d shards to write into %s.', len(mine),
               len(plan), directory)
  for split, index, count, start, stop in mine:
    path = os.path.join(directory, shard_name(split, index, count))
    examples = _encoded(source, split, start, stop, config.resize_size)
    progress.update(write_shard(path, examples), path)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('alexnet shards written')
  if jax.process_index() == 0:
    write_manifest(directory, source, config.resize_size, plan)
  return directory


def write_manifest(directory: str, source: sources.Source, resize_size: int,
                   plan: list[tuple[str, int, int, int, int]]) -> None:
  """Writes the manifest the reader requires, last (atomically).

  Args:
    directory: the shards directory.
    source: the original data (its tag and classes).
    resize_size: the side of the stored squares.
    plan: (split, index, count, start, stop) of every shard.
  """
  splits = {}
  for split, _, _, start, stop in plan:
    splits.setdefault(split, []).append(stop - start)
  manifest = {'source': source.tag, 'num_classes': source.num_classes,
              'resize_size': resize_size, 'jpeg_quality': JPEG_QUALITY,
              'splits': splits}
  temporary = os.path.join(directory, MANIFEST + '.tmp')
  with open(temporary, 'w') as f:
    json.dump(manifest, f, indent=1)
  os.replace(temporary, os.path.join(directory, MANIFEST))


def _read_manifest(directory: str, command: str) -> dict[str, Any]:
  path = os.path.join(directory, MANIFEST)
  if not os.path.exists(path):
    raise DatasetError(
        f'config.use_shards=True, but {directory} holds no finished shards '
        f'(no {MANIFEST}). Write them once with: {command}')
  with open(path) as f:
    return json.load(f)


def _parse(record: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  example = tf.io.parse_single_example(record, {
      'image': tf.io.FixedLenFeature([], tf.string),
      'label': tf.io.FixedLenFeature([], tf.int64)})
  return example['image'], tf.cast(example['label'], tf.int32)


def shards_source(config: Config) -> sources.Source:
  """A source reading the shards `prepare` wrote for this config.

  Args:
    config: the experiment config (the original data and resize_size name
      the shards).

  Returns:
    The `Source`; its tag differs from the original data's, so colour
    statistics are computed on the re-encoded images.

  Raises:
    DatasetError: the shards are missing or unfinished (the message gives
      the command that writes them).
  """
  tag = sources.make_source(config).tag
  directory = shards_directory(config, tag)
  command = ('python main.py --mode=prepare --config=<the same config and '
             'overrides> (see docs/training.md, "Pre-resized shards").')
  manifest = _read_manifest(directory, command)
  counts = manifest['splits']
  sizes = {split: sources.SplitSize(sum(c)) for split, c in counts.items()}

  def examples(split):
    parts = []
    for name, start, stop in sources.absolute_ranges(sizes, split, tag):
      files, first = _covering_files(directory, name, counts[name], start,
                                     stop)
      parts.append(tf.data.TFRecordDataset(files).skip(start - first)
                   .take(stop - start).map(_parse))
    ds = parts[0]
    for part in parts[1:]:
      ds = ds.concatenate(part)
    return ds

  return sources.Source(
      tag=f'{tag}-shards', num_classes=manifest['num_classes'],
      split_sizes=sizes, examples=examples, read=lambda data: data)


def _covering_files(directory: str, split: str, counts: list[int],
                    start: int, stop: int) -> tuple[list[str], int]:
  """The shard files holding examples [start, stop), and the first's start."""
  files, first, offset = [], None, 0
  for index, count in enumerate(counts):
    if offset < stop and offset + count > start:
      files.append(os.path.join(directory,
                                shard_name(split, index, len(counts))))
      first = offset if first is None else first
    offset += count
  return files, (start if first is None else first)
