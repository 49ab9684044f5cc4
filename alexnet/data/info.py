"""Dataset sizes and the data checks that need no data (library side).

`input_pipeline.get_dataset_info` reads the sizes; the schedule and the
config checks use them through this module, so that the library never
imports the application.
"""

import dataclasses

import ml_collections

from alexnet.errors import ConfigError
from alexnet.errors import DatasetError

Config = ml_collections.ConfigDict
# Allowed values of the config's data choices.
CHOICES = {'mean': ('pixel', 'channel'), 'pca_stats': ('dataset', 'imagenet'),
           'channel_order': ('rgb', 'bgr')}


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Sizes the training loop needs.

  Attributes:
    num_classes: number of labels.
    num_train_examples: examples in `config.train_split`, all processes.
    num_eval_examples: examples per evaluated split: key 'eval' and, when
      `config.minival_split` is set, 'minival'.
  """
  num_classes: int
  num_train_examples: int
  num_eval_examples: dict[str, int]


def validate_config(config: Config) -> None:
  """Refuses data choices the pipeline does not know.

  Args:
    config: the experiment config.

  Raises:
    ConfigError: naming the field and its allowed values.
  """
  for field, allowed in CHOICES.items():
    if config[field] not in allowed:
      raise ConfigError(f'config.{field}={config[field]!r}: choose one of '
                        f'{allowed}.')


def per_replica(config: Config, field: str, num_replicas: int) -> int:
  """config.<field> (a global batch size) split among the replicas.

  Raises:
    ConfigError: the batch does not divide among the replicas.
  """
  if config[field] % num_replicas:
    raise ConfigError(
        f'config.{field}={config[field]} must be divisible by the '
        f'{num_replicas} data-parallel replicas; e.g. --config.{field}='
        f'{num_replicas * max(1, config[field] // num_replicas)}.')
  return config[field] // num_replicas


def steps_per_epoch(config: Config, info: DatasetInfo,
                    num_replicas: int) -> int:
  """Global training steps per epoch (partial batches dropped).

  Every replica holds num_train_examples // num_replicas examples
  (`tfds.split_for_jax_process(..., drop_remainder=True)`), so this is the
  same for every replica.

  Args:
    config: uses batch_size.
    info: from `get_dataset_info`.
    num_replicas: data-parallel replicas over all processes.

  Returns:
    Steps in one epoch (at least 1).

  Raises:
    ConfigError: batch_size not divisible by num_replicas.
    DatasetError: fewer examples than a batch.
  """
  batch = per_replica(config, 'batch_size', num_replicas)
  steps = (info.num_train_examples // num_replicas) // batch
  if steps < 1:
    raise DatasetError(
        f'config.batch_size={config.batch_size} exceeds the '
        f'{info.num_train_examples} training examples.')
  return steps
