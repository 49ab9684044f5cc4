"""Refuses a config that cannot run, before any work, naming the fix.

Checks that need the devices (e.g. a batch that the data-parallel replicas
cannot share) take the device layout; each cause is raised here once.
"""

import ml_collections

from alexnet import errors
from alexnet import model as model_lib
from alexnet import parallel
from alexnet.data import info as info_lib


def validate(config: ml_collections.ConfigDict,
             layout: parallel.Layout) -> None:
  """Refuses a config that cannot run, naming the field and the fix."""
  positive = ['batch_size', 'eval_batch_size', 'checkpoint_every_steps',
              'log_every_steps', 'keep_checkpoints', 'eval_every_epochs',
              'learning_rate', 'width', 'flat_loss_evals']
  for field in positive:
    if not config[field] > 0:
      raise errors.ConfigError(
          f'config.{field}={config[field]} must be positive.')
  if not (config.num_epochs > 0 or config.num_train_steps > 0):
    raise errors.ConfigError('Set a positive config.num_epochs or '
                             'config.num_train_steps.')
  smallest = model_lib.smallest_image_size(config.pool_size,
                                           config.pool_stride)
  if config.image_size < smallest:
    raise errors.ConfigError(
        f'config.image_size={config.image_size} is too small for the five '
        f'conv layers and three pools; use at least {smallest}.')
  if config.resize_size < config.image_size:
    raise errors.ConfigError(
        f'config.resize_size={config.resize_size} must be at least '
        f'config.image_size={config.image_size}.')
  info_lib.validate_config(config)
  for field in ('batch_size', 'eval_batch_size'):
    info_lib.per_replica(config, field, layout.num_replicas)
  # The model refuses its own choices (init_scheme, activation, ...).
  choices = {'dtype': ('float32', 'bfloat16'),
             'plateau_split': ('eval', 'minival')}
  for field, allowed in choices.items():
    if config[field] not in allowed:
      raise errors.ConfigError(
          f'config.{field}={config[field]!r}: choose one of {allowed}.')
  if config.plateau_split == 'minival' and not config.minival_split:
    raise errors.ConfigError("config.plateau_split='minival' needs "
                             "config.minival_split, e.g. 'train[99%:]'.")
