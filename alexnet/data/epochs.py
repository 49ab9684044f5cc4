"""The order and random draws of one replica's training examples.

Every data-parallel replica reads its own slice of the training split
(`tfds.split_for_jax_process` with the replica as the "process") and draws
its augmentation from tables keyed on (seed, epoch, replica, example index).
A replica's stream therefore depends on neither the process that feeds it
nor where training started: a stream started at step k yields exactly the
examples of steps k, k+1, ... of a stream started at step 0.

The order is chosen so that resuming costs the same anywhere in an epoch
(docs/REFERENCE.md, "Data order"): the slice is cut into windows of
consecutive examples (the replica's share of config.shuffle_buffer, at
least `MIN_WINDOW`; the whole slice when elements are cheap paths). Each
epoch visits the windows in a random order and each window's examples in a
random order, both keyed on (seed, epoch, replica). A resume skips the
windows before its position without opening them, and drops the examples
before it inside one window: at most one window is read for nothing,
wherever the run stopped.
"""

from typing import Any

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from alexnet.data import ops
from alexnet.data import sources
from alexnet.errors import DatasetError

# Examples a shuffle window holds at least: one shard of
# alexnet/data/shards.py. Fewer, larger windows also mean fewer datasets to
# build when the pipeline starts (one per window).
MIN_WINDOW = 1024
# Folded into the epoch's key for the order (the augmentation splits it).
_ORDER = 0x0dde


def window_size(source: sources.Source, local_examples: int,
                shuffle_buffer: int, num_replicas: int) -> int:
  """Examples of one window of a replica's slice (module docstring).

  Args:
    source: the data.
    local_examples: examples of the replica's slice.
    shuffle_buffer: config.shuffle_buffer, a total over all replicas.
    num_replicas: data-parallel replicas over all processes.

  Returns:
    The window, which with the seed sets every epoch's order.
  """
  if source.cheap_elements:
    return local_examples
  return min(max(MIN_WINDOW, shuffle_buffer // num_replicas), local_examples)


def replica_examples(source: sources.Source, train_split: str,
                     num_replicas: int) -> int:
  """Examples of each replica's slice of `train_split` (all equal)."""
  return sources.num_examples(source, tfds.split_for_jax_process(
      train_split, process_index=0, process_count=num_replicas,
      drop_remainder=True))


def train_examples(config: ml_collections.ConfigDict, source: sources.Source,
                   lighting: tuple[np.ndarray, np.ndarray], *, replica: int,
                   num_replicas: int, steps_per_epoch: int,
                   start_step: int = 0) -> tf.data.Dataset:
  """One replica's infinite stream of training examples and their draws.

  Args:
    config: uses train_split, batch_size, shuffle_buffer, seed, resize_size,
      image_size, pca_sigma, random_crop, random_flip.
    source: the data.
    lighting: (eigvals [3], eigvecs [3, 3]) of the PCA lighting.
    replica: global index of the data-parallel replica.
    num_replicas: data-parallel replicas over all processes.
    steps_per_epoch: global steps per epoch (the same for every replica).
    start_step: global step of the first example's batch.

  Returns:
    Dataset of (data, int32 label, int32 offset [2], bool flip, float32
    shift [3]): the crop offset is the centre's unless config.random_crop,
    flip is False unless config.random_flip, shift is zero when
    config.pca_sigma is 0.

  Raises:
    DatasetError: the replica's slice is smaller than an epoch's batches.
  """
  split = tfds.split_for_jax_process(config.train_split, process_index=replica,
                                     process_count=num_replicas,
                                     drop_remainder=True)
  local_examples = sources.num_examples(source, split)
  batch = config.batch_size // num_replicas
  per_epoch = steps_per_epoch * batch
  if local_examples < per_epoch:
    raise DatasetError(f'Replica {replica} holds {local_examples} examples of '
                       f'{config.train_split!r}, fewer than {per_epoch}.')
  window = window_size(source, local_examples, config.shuffle_buffer,
                       num_replicas)
  windows, sizes = _windows(source, split, local_examples, window)
  start_epoch, skip_steps = divmod(start_step, steps_per_epoch)

  def epoch_examples(epoch):
    key = ops.epoch_key(config.seed, epoch, replica)
    skip = tf.cast(tf.where(epoch == start_epoch, skip_steps * batch, 0),
                   tf.int64)
    offsets, flips, shifts = _epoch_draws(config, lighting, key,
                                          local_examples)

    def attach(data, label, i):
      return (data, label, tf.gather(offsets, i), tf.gather(flips, i),
              tf.gather(shifts, i))

    examples = _shuffled_from(windows, sizes, key, skip)
    return examples.take(per_epoch - skip).map(attach)

  return tf.data.Dataset.counter(start_epoch).flat_map(epoch_examples)


def _windows(source: sources.Source, split: Any, n: int, window: int
             ) -> tuple[list[tf.data.Dataset], tf.Tensor]:
  """The slice's windows, each a dataset of one element, and their sizes.

  Window j is examples [j * window, (j + 1) * window) of the slice (the
  last may be shorter) as one (data [w], label [w], index [w]) element,
  read only when an epoch reaches it. Indices count from the slice's start,
  so that an example's random draws do not depend on where it is shuffled.
  """
  ranges = sources.absolute_ranges(source.split_sizes, split, source.tag)
  windows, sizes = [], []
  for start in range(0, n, window):
    stop = min(start + window, n)
    parts, offset = [], 0
    for name, first, last in ranges:  # The slice's pieces in this window.
      low, high = max(start, offset), min(stop, offset + last - first)
      if low < high:
        parts.append(source.examples(
            f'{name}[{first + low - offset}:{first + high - offset}]'))
      offset += last - first
    examples = parts[0]
    for part in parts[1:]:
      examples = examples.concatenate(part)
    windows.append(examples.enumerate(start).batch(stop - start).map(
        lambda i, example: (example[0], example[1], i)))
    sizes.append(stop - start)
  return windows, tf.constant(sizes, tf.int64)


def _shuffled_from(windows: list[tf.data.Dataset], sizes: tf.Tensor,
                   key: tf.Tensor, skip: tf.Tensor) -> tf.data.Dataset:
  """One epoch's examples in its random order, from position `skip` on.

  Windows that end before `skip` are never read; the examples before it in
  the window that holds it are dropped after the shuffle.
  """
  key = tf.random.experimental.stateless_fold_in(key, _ORDER)
  order = tf.random.experimental.stateless_shuffle(
      tf.range(tf.size(sizes, tf.int64)), key)
  ordered = tf.gather(sizes, order)
  passed = tf.cumsum(ordered) <= skip
  done = tf.reduce_sum(tf.where(passed, ordered, 0))
  chosen = tf.data.Dataset.from_tensor_slices(
      order[tf.reduce_sum(tf.cast(passed, tf.int64)):])

  def shuffle(data, label, index):
    # Keyed on the window's first index: the same in every run and layout.
    window_key = tf.random.experimental.stateless_fold_in(key, index[0])
    permutation = tf.random.experimental.stateless_shuffle(
        tf.range(tf.size(index)), window_key)
    return (tf.gather(data, permutation), tf.gather(label, permutation),
            tf.gather(index, permutation))

  # The next window is read while this one is consumed.
  return (tf.data.Dataset.choose_from_datasets(windows, chosen).map(shuffle)
          .prefetch(1).unbatch().skip(skip - done))


def _epoch_draws(config: ml_collections.ConfigDict,
                 lighting: tuple[np.ndarray, np.ndarray], key: tf.Tensor,
                 n: int) -> tuple[tf.Tensor, ...]:
  """(offsets, flips, shifts) of one epoch, with the switches applied."""
  resize, size = config.resize_size, config.image_size
  draws = ops.draw_augmentation(key, n, resize, size, config.pca_sigma,
                                *lighting)
  offsets = draws.offsets
  if not config.random_crop:
    offsets = tf.fill([n, 2], (resize - size) // 2)
  return offsets, draws.flips & config.random_flip, draws.shifts
