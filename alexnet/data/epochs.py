"""The order and random draws of one replica's training examples.

Every data-parallel replica reads its own slice of the training split
(`tfds.split_for_jax_process` with the replica as the "process"), shuffled
each epoch with a seed derived from (seed, epoch), and draws its
augmentation from tables keyed on (seed, epoch, replica, example index). A
replica's stream therefore depends on neither the process that feeds it nor
where training started: a stream started at step k yields exactly the
examples of steps k, k+1, ... of a stream started at step 0.
"""

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from alexnet.data import ops
from alexnet.data import sources
from alexnet.errors import DatasetError


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
  # Example indices are attached before shuffling, so an example's random
  # draws do not depend on where the shuffle puts it.
  indexed = source.examples(split).enumerate()
  # config.shuffle_buffer is a total over all replicas.
  buffer = local_examples if source.cheap_elements else min(
      max(1, config.shuffle_buffer // num_replicas), local_examples)
  start_epoch, skip_steps = divmod(start_step, steps_per_epoch)

  def epoch_examples(epoch):
    ds = indexed.shuffle(buffer, seed=config.seed * 1_000_003 + epoch,
                         reshuffle_each_iteration=False).take(per_epoch)
    # Resuming skips undecoded records of the first epoch only.
    skip = tf.where(epoch == start_epoch, skip_steps * batch, 0)
    offsets, flips, shifts = _epoch_draws(config, lighting, epoch, replica,
                                          local_examples)

    def attach(i, example):
      data, label = example
      return (data, label, tf.gather(offsets, i), tf.gather(flips, i),
              tf.gather(shifts, i))

    return ds.skip(tf.cast(skip, tf.int64)).map(attach)

  return tf.data.Dataset.counter(start_epoch).flat_map(epoch_examples)


def _epoch_draws(config: ml_collections.ConfigDict,
                 lighting: tuple[np.ndarray, np.ndarray], epoch: tf.Tensor,
                 replica: int, n: int) -> tuple[tf.Tensor, ...]:
  """(offsets, flips, shifts) of one epoch, with the switches applied."""
  resize, size = config.resize_size, config.image_size
  draws = ops.draw_augmentation(ops.epoch_key(config.seed, epoch, replica),
                                n, resize, size, config.pca_sigma, *lighting)
  offsets = draws.offsets
  if not config.random_crop:
    offsets = tf.fill([n, 2], (resize - size) // 2)
  return offsets, draws.flips & config.random_flip, draws.shifts
