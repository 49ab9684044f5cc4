"""tf.data input pipeline for AlexNet (Krizhevsky et al. 2012, sections 2, 4.1).

The entry points of the data package `alexnet/data/`:
* sources: TFDS, offline builders (digits, Fashion-MNIST), image folders,
  in `alexnet/data/sources.py`; pre-resized shards in
  `alexnet/data/shards.py`;
* preprocessing ops in `alexnet/data/ops.py`;
* the per-replica order and random draws in `alexnet/data/epochs.py`;
* colour statistics in `alexnet/data/colour.py`;
* the float part of preprocessing, run on the device, in
  `alexnet/data/on_device.py`.

Every image is decoded to RGB and its largest centred square resized to
`resize_size` (equal, up to sub-pixel rounding, to resizing the shorter side
and centre-cropping). Batches leave tf.data as uint8:

* training: the `image_size` crop (random, or the centre with
  `random_crop=False`), reflected or not, with its crop offset, reflection
  flag and PCA lighting shift; `on_device.train_images` subtracts the mean
  image (`mean_image`) and adds the shift;
* evaluation: the resized square once, with a mask for the padding that
  makes every replica yield the same number of batches while counting each
  example exactly once; `on_device.eval_images` cuts the centre or 10 views.

One tf.data pipeline per process feeds all of its data-parallel replicas
(leading axis R). Replica r reads its own slice of each split with its own
random draws, so a run does not depend on how replicas are spread over
processes, and a pipeline started at step k yields exactly the batches k,
k+1, ... of one started at step 0. Starting late in an epoch costs no more
than starting at its beginning: at most one shuffle window is read for
nothing (docs/REFERENCE.md, Data order).

Colour statistics (mean image, RGB eigenvectors) are computed once per
(dataset, train split, resize_size) and cached as
`<data_dir>/alexnet_colour_stats/<dataset>/<split>_<resize_size>.npz`.
"""

import math
from collections.abc import Iterable, Iterator, Sequence

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from alexnet.data import colour
from alexnet.data import epochs
from alexnet.data import info
from alexnet.data import ops
from alexnet.data import shards
from alexnet.data import sources
from alexnet.data import subsets
from alexnet.errors import DatasetError

Config = ml_collections.ConfigDict
Batch = dict[str, np.ndarray]
AUTOTUNE = tf.data.AUTOTUNE
# The sizes and checks the library shares, named here for the application.
DatasetInfo = info.DatasetInfo
validate_config = info.validate_config
per_replica = info.per_replica
steps_per_epoch = info.steps_per_epoch


def get_dataset_info(config: Config) -> DatasetInfo:
  """Sizes of the configured splits (prepares offline data if missing).

  Args:
    config: the experiment config.

  Returns:
    The `DatasetInfo`.

  Raises:
    ConfigError: an unknown data choice.
    DatasetError: missing, unknown or empty data.
  """
  validate_config(config)
  source = data_source(config)
  specs = {'eval': config.eval_split}
  if config.minival_split:
    specs['minival'] = config.minival_split
  sizes = {name: sources.num_examples(source, spec)
           for name, spec in specs.items()}
  train = sources.num_examples(source, config.train_split)
  for spec, size in [(config.train_split, train),
                     *zip(specs.values(), sizes.values())]:
    if size == 0:
      raise DatasetError(f'Split {spec!r} of {source.tag} is empty.')
  return DatasetInfo(num_classes=source.num_classes,
                     num_train_examples=train, num_eval_examples=sizes)


def data_source(config: Config) -> sources.Source:
  """The configured data: the original images or their pre-resized shards.

  Restricted to config.classes (every split) and to
  config.train_examples_per_class (the split(s) config.train_split reads).
  """
  if config.use_shards:
    source = shards.shards_source(config)
  else:
    source = sources.make_source(config)
  train_splits = {name for name, _, _ in sources.absolute_ranges(
      source.split_sizes, config.train_split, source.tag)}
  return subsets.subset_source(source, tuple(config.classes),
                               config.train_examples_per_class,
                               tuple(sorted(train_splits)))


def mean_image(config: Config) -> np.ndarray:
  """The image `on_device` subtracts (computes colour stats if not cached).

  Args:
    config: uses mean, mean_file, the data fields and resize_size.

  Returns:
    float32 [resize_size, resize_size, 3] RGB, 0-255 scale: the training
    split's (or config.mean_file's) per-pixel mean, or its channel mean
    broadcast (config.mean).
  """
  validate_config(config)
  if config.mean_file:
    return colour.file_mean_image(config)
  stats = colour.colour_stats(config, data_source(config))
  return colour.mean_image(stats, config.mean)


def _check_replicas(replicas: Sequence[int], num_replicas: int) -> None:
  if not replicas or len(set(replicas)) != len(replicas) or not all(
      0 <= r < num_replicas for r in replicas):
    raise ValueError(f'replicas={list(replicas)} must be distinct indices in '
                     f'[0, {num_replicas}).')


def _stack(datasets: list[tf.data.Dataset]) -> tf.data.Dataset:
  """Zips per-replica batches into one batch with a leading replica axis."""
  return tf.data.Dataset.zip(tuple(datasets)).map(
      lambda *batches: {key: tf.stack([b[key] for b in batches])
                        for key in batches[0]})


def _options(threads: int | None) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True  # Resume and reproducibility depend on it.
  if threads:
    options.threading.private_threadpool_size = threads
    options.threading.max_intra_op_parallelism = 1
  return options


def train_dataset(config: Config, *, replicas: Sequence[int],
                  num_replicas: int, start_step: int = 0,
                  threads: int | None = None) -> tf.data.Dataset:
  """The infinite training dataset behind `create_train_iterator`.

  Args:
    config: the experiment config.
    replicas: global indices of the data-parallel replicas this process
      feeds, in the order of the leading axis.
    num_replicas: data-parallel replicas over all processes.
    start_step: global step of the first batch.
    threads: tf.data thread-pool size (None: TF's default, all cores).

  Returns:
    Dataset of the batches `create_train_iterator` describes.
  """
  _check_replicas(replicas, num_replicas)
  validate_config(config)
  batch = per_replica(config, 'batch_size', num_replicas)
  epoch_steps = steps_per_epoch(config, get_dataset_info(config),
                                num_replicas)
  source = data_source(config)
  # Published eigenvectors need no pass over the training set.
  stats = (colour.colour_stats(config, source)
           if config.pca_stats == 'dataset' else None)
  lighting = colour.lighting_components(stats, config.pca_stats)
  resize, size = config.resize_size, config.image_size

  def wire(data, label, offset, flip, shift):
    image = ops.decode_crop(source.read(data), resize, size, offset)
    return {'image': ops.flip_if(image, flip), 'offset': offset,
            'flip': flip, 'shift': shift, 'label': label}

  replica_batches = [
      epochs.train_examples(
          config, source, lighting, replica=replica,
          num_replicas=num_replicas, steps_per_epoch=epoch_steps,
          start_step=start_step).map(wire, num_parallel_calls=AUTOTUNE)
      .batch(batch, drop_remainder=True) for replica in replicas]
  return _stack(replica_batches).prefetch(AUTOTUNE).with_options(
      _options(threads))


def create_train_iterator(config: Config, *, replicas: Sequence[int],
                          num_replicas: int,
                          start_step: int = 0) -> Iterator[Batch]:
  """Infinite iterator over this process's batches of steps start_step, ...

  Args:
    config: the experiment config.
    replicas: global indices of the data-parallel replicas this process
      feeds (R = len(replicas)), in the order of the leading axis.
    num_replicas: data-parallel replicas over all processes.
    start_step: global step of the first batch (resume).

  Returns:
    Iterator of {'image': uint8 [R, b, S, S, 3] crops (reflected),
    'offset': int32 [R, b, 2] crop (top, left) in the resize square,
    'flip': bool [R, b], 'shift': float32 [R, b, 3] PCA lighting shift on
    the 0-255 scale (zeros when off), 'label': int32 [R, b]};
    b = batch_size // num_replicas, S = image_size. Replica r's slice does
    not depend on which other replicas this process feeds.
  """
  return iter(train_dataset(config, replicas=replicas,
                            num_replicas=num_replicas,
                            start_step=start_step).as_numpy_iterator())


class EvalIterable:
  """Re-iterable evaluation batches; each iteration is one full pass."""

  def __init__(self, dataset: tf.data.Dataset, num_batches: int):
    self._dataset = dataset
    self._num_batches = num_batches

  def __len__(self) -> int:
    return self._num_batches

  def __iter__(self) -> Iterator[Batch]:
    return iter(self._dataset.as_numpy_iterator())


def create_eval_iterable(config: Config, split: str, *,
                         replicas: Sequence[int],
                         num_replicas: int) -> Iterable[Batch]:
  """Evaluation batches of 'eval' or 'minival', padded to count each once.

  Args:
    config: the experiment config.
    split: 'eval' (config.eval_split), 'minival' (config.minival_split) or
      'train' (config.train_split, for features).
    replicas: global indices of the data-parallel replicas this process
      feeds (R = len(replicas)), in the order of the leading axis.
    num_replicas: data-parallel replicas over all processes.

  Returns:
    A re-iterable (deterministic order) of {'image': uint8 [R, b, Z, Z, 3]
    resized squares, 'label': int32 [R, b], 'mask': bool [R, b]} with
    b = eval_batch_size // num_replicas, Z = resize_size. Padding examples
    are zero images with mask False; every replica yields the same number
    of batches (`len()`), since evaluation uses collectives.
  """
  # 'train' (unaugmented, in order) is for reading features, not metrics.
  spec = {'eval': config.eval_split, 'minival': config.minival_split,
          'train': config.train_split}.get(split)
  if not spec:
    raise ValueError(f'split={split!r}: use \'eval\', \'train\', or '
                     '\'minival\' with config.minival_split set.')
  _check_replicas(replicas, num_replicas)
  batch = per_replica(config, 'eval_batch_size', num_replicas)
  source = data_source(config)
  splits = [tfds.split_for_jax_process(spec, process_index=r,
                                       process_count=num_replicas)
            for r in range(num_replicas)]
  sizes = [sources.num_examples(source, s) for s in splits]
  if not sum(sizes):
    raise DatasetError(f'Split {spec!r} of {source.tag} is empty.')
  num_batches = math.ceil(max(sizes) / batch)
  resize = config.resize_size

  def preprocess(data, label):
    return {'image': ops.decode_centre_square(source.read(data), resize),
            'label': label, 'mask': tf.constant(True)}

  padding = tf.data.Dataset.from_tensors({
      'image': tf.zeros([resize, resize, 3], tf.uint8),
      'label': tf.constant(0, tf.int32), 'mask': tf.constant(False)}).repeat()

  def replica_batches(replica):
    ds = padding
    if sizes[replica]:
      ds = source.examples(splits[replica]).map(
          preprocess, num_parallel_calls=AUTOTUNE).concatenate(padding)
    return ds.take(num_batches * batch).batch(batch)

  ds = _stack([replica_batches(r) for r in replicas])
  return EvalIterable(ds.prefetch(AUTOTUNE).with_options(_options(None)),
                      num_batches)
