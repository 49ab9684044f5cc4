"""How long training runs and how its learning rate falls.

Durations are given in epochs in the config and converted to steps once.
The learning rate is the config's, divided by 10 each time the validation
error stops improving (the paper, section 5; docs/REFERENCE.md,
Optimization): `optax.contrib.reduce_on_plateau` run on the host once per
evaluation, its state checkpointed with the parameters. With
`config.lr_drop_epochs` set, it is divided at those epochs instead, so that
runs compared with each other (bench/ablations.py) share one schedule.
"""

import dataclasses
import math

from absl import logging
import jax
import ml_collections
import optax
from optax import contrib

from alexnet import errors
from alexnet.data import info as info_lib


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Durations in steps, converted once from the config's epochs."""

  steps_per_epoch: int
  total_steps: int
  eval_every: int
  # Steps from which each of config.lr_drop_epochs' drops applies.
  drop_steps: tuple[int, ...] = ()

  @classmethod
  def create(cls, config: ml_collections.ConfigDict,
             info: info_lib.DatasetInfo,
             num_replicas: int = 1) -> 'Schedule':
    """The schedule of `config` on a dataset.

    Args:
      config: uses num_epochs, num_train_steps, eval_every_epochs,
        lr_drop_epochs and batch_size.
      info: the dataset's sizes.
      num_replicas: data-parallel replicas, each reading its own slice.

    Returns:
      The schedule.

    Raises:
      ConfigError: lr_drop_epochs not increasing inside the run.
    """
    per_epoch = info_lib.steps_per_epoch(config, info, num_replicas)
    total = (config.num_train_steps if config.num_train_steps > 0
             else math.ceil(config.num_epochs * per_epoch))
    eval_every = max(1, round(config.eval_every_epochs * per_epoch))
    drops = tuple(round(epoch * per_epoch) for epoch in config.lr_drop_epochs)
    if not all(a < b for a, b in zip((0,) + drops, drops + (total,))):
      raise errors.ConfigError(
          f'config.lr_drop_epochs={tuple(config.lr_drop_epochs)} must be '
          f'increasing epochs inside the run ({total / per_epoch:g} epochs, '
          f'{per_epoch} steps each), e.g. --config.lr_drop_epochs="(20, 22)"'
          '; () keeps the plateau rule.')
    return cls(per_epoch, total, eval_every, drops)

  def fixed_drops(self, step: int) -> int:
    """How many of the fixed drops apply to `step` (0-based)."""
    return sum(step >= drop for drop in self.drop_steps)


def make_plateau(config: ml_collections.ConfigDict
                 ) -> optax.GradientTransformationExtraArgs:
  """Divides the learning rate by 10 when validation error stops improving."""
  plateau = config.plateau
  return contrib.reduce_on_plateau(
      factor=plateau.factor, patience=plateau.patience, rtol=0.0,
      atol=plateau.min_delta, cooldown=plateau.cooldown,
      min_scale=plateau.factor ** plateau.max_drops)


def update_plateau(config: ml_collections.ConfigDict,
                   plateau: contrib.ReduceLROnPlateauState, error: float,
                   step: int) -> contrib.ReduceLROnPlateauState:
  """The schedule's state after an evaluation that measured `error`.

  Args:
    config: uses learning_rate, lr_drop_epochs and config.plateau.
    plateau: the state before, on the host.
    error: the validation (or minival) top-1 error just measured.
    step: the step evaluated, for the log.

  Returns:
    The state after, on the host (unchanged when fixed drops replace the
    plateau rule).
  """
  if config.lr_drop_epochs:
    return plateau
  drops = plateau_drops(config, plateau)
  _, plateau = make_plateau(config).update({}, plateau, value=error)
  plateau = jax.device_get(plateau)
  if plateau_drops(config, plateau) > drops:
    logging.info('Step %d: validation error stopped improving; learning rate '
                 'divided, now %g.', step,
                 config.learning_rate * float(plateau.scale))
  return plateau


def plateau_drops(config: ml_collections.ConfigDict,
                  plateau: contrib.ReduceLROnPlateauState) -> int:
  """How many times the schedule has divided the learning rate."""
  return round(math.log(float(plateau.scale)) /
               math.log(config.plateau.factor))


def lr_drops(config: ml_collections.ConfigDict,
             plateau: contrib.ReduceLROnPlateauState, schedule: Schedule,
             step: int) -> int:
  """How many times the learning rate has been divided before `step`."""
  return plateau_drops(config, plateau) + schedule.fixed_drops(step)


def learning_rate(config: ml_collections.ConfigDict,
                  plateau: contrib.ReduceLROnPlateauState,
                  schedule: Schedule, step: int) -> float:
  """The rate of `step` (0-based): the config's, scaled by the drops."""
  return (config.learning_rate * float(plateau.scale)
          * config.plateau.factor ** schedule.fixed_drops(step))
