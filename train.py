"""Training and evaluation of the paper's AlexNet (the application; see main.py).

`train_and_evaluate(config, workdir)` runs the whole experiment and resumes
from `workdir` if it holds a checkpoint; `evaluate_checkpoint` evaluates a
saved one without training. The state, the optimizer and the steps they run
are the library's (alexnet/steps.py), so that tests, benchmarks and
experiments use exactly the step that trains.
"""

import dataclasses
import functools
import os
from typing import Any

from absl import logging
from clu import metric_writers
import jax
import ml_collections
import numpy as np
from optax import contrib

from alexnet import checkpoints
from alexnet import config_checks
from alexnet import distributed
from alexnet import errors
from alexnet import evaluation
from alexnet import finetune
from alexnet import model as model_lib
from alexnet import parallel
from alexnet import prefetch
from alexnet import recipe as recipe_lib
from alexnet import reporting
from alexnet import schedule as schedule_lib
from alexnet import steps
import input_pipeline

PyTree = Any


def _create_layout(config: ml_collections.ConfigDict) -> parallel.Layout:
  """The device layout, with config errors named as such."""
  devices = jax.devices()
  if config.num_devices:
    if not 0 < config.num_devices <= jax.local_device_count():
      raise errors.ConfigError(
          f'config.num_devices={config.num_devices}, but this process has '
          f'{jax.local_device_count()} devices; 0 uses them all.')
    if jax.process_count() > 1:
      raise errors.ConfigError('config.num_devices must be 0 (all devices) '
                               'with several processes.')
    devices = jax.local_devices()[:config.num_devices]
  return parallel.Layout.create(config.model_parallel, devices,
                                towers=config.towers)


@dataclasses.dataclass(frozen=True)
class _Experiment:
  """What stays fixed during one run; built by `_prepare`."""

  config: ml_collections.ConfigDict
  workdir: str
  layout: parallel.Layout
  info: input_pipeline.DatasetInfo
  schedule: schedule_lib.Schedule
  model: model_lib.AlexNet
  # The training set's mean image, once on every device: batches arrive as
  # uint8 and are normalised inside the mapped steps.
  mean_image: jax.Array

  @property
  def signature(self) -> dict[str, Any]:
    return steps.shape_signature(self.config, self.info.num_classes)

  @property
  def recipe(self) -> dict[str, Any]:
    """What the data stream depends on; a resume must not change it."""
    return recipe_lib.recipe(self.config, self.layout.num_replicas)

  def open_checkpoints(self, read_only: bool = False
                       ) -> checkpoints.Checkpoints:
    return checkpoints.Checkpoints(
        os.path.join(self.workdir, 'checkpoints'),
        keep=self.config.keep_checkpoints, read_only=read_only)

  def evaluate(self, params: PyTree) -> dict[str, dict[str, float]]:
    """{split: metrics} of the parameters on the devices."""
    step = lambda params, batch: self._p_eval_step(params, batch,
                                                   self.mean_image)
    return {split: evaluation.evaluate(step, params, batches, self.layout)
            for split, batches in self._eval_sets.items()}

  @functools.cached_property
  def _eval_sets(self) -> dict[str, input_pipeline.EvalIterable]:
    return {split: input_pipeline.create_eval_iterable(
        self.config, split, replicas=self.layout.local_replicas,
        num_replicas=self.layout.num_replicas)
            for split in self.info.num_eval_examples}

  @functools.cached_property
  def _p_eval_step(self) -> Any:
    return steps.map_eval_step(self.model, self.layout, self.config)

  @functools.cached_property
  def p_train_step(self) -> Any:
    """The mapped `steps.train_step`, fed uint8 batches and the mean image."""
    return steps.map_train_step(self.model, self.layout, self.config)


def _prepare(config: ml_collections.ConfigDict, workdir: str) -> _Experiment:
  """Checks the config against the devices and reads the dataset's sizes."""
  layout = _create_layout(config)
  config_checks.validate(config, layout)
  finetune.validate(config)
  info = input_pipeline.get_dataset_info(config)
  return _Experiment(
      config, os.path.abspath(workdir), layout, info,
      schedule_lib.Schedule.create(config, info, layout.num_replicas),
      steps.create_model(config, info.num_classes, layout.exchange),
      layout.replicate(input_pipeline.mean_image(config)))


def planned_steps(config: ml_collections.ConfigDict) -> int:
  """The step `train_and_evaluate(config, ...)` ends at, unless stopped."""
  return schedule_lib.Schedule.create(
      config, input_pipeline.get_dataset_info(config),
      _create_layout(config).num_replicas).total_steps


def _restore(experiment: _Experiment, store: checkpoints.Checkpoints,
             step: int | None = None,
             resume: bool = False) -> steps.TrainState:
  """Checkpoint `step`, else the latest readable one, else a fresh state.

  To `resume` training, the checkpoint's recipe must be this run's.
  """
  config = experiment.config
  model = steps.create_model(config, experiment.info.num_classes)
  like = jax.eval_shape(functools.partial(steps.initial_tree, config, model))
  restored = store.restore(like, experiment.signature, step)
  if restored is None and config.init_from:
    logging.info('Starting in %s from the parameters of %s.',
                 experiment.workdir, config.init_from)
    return finetune.initial_state(config, model)
  if restored is None:
    logging.info('Starting from scratch in %s.', experiment.workdir)
    return steps.create_train_state(config, model)
  tree, meta = restored
  if resume:
    warning = recipe_lib.check(meta, experiment.recipe, experiment.workdir,
                               meta['step'],
                               input_pipeline.data_source(config))
    if warning:
      logging.warning(warning)
  logging.info('Resuming from step %d in %s.', meta['step'],
               experiment.workdir)
  return steps.TrainState(step=meta['step'], **jax.device_get(tree))


@dataclasses.dataclass
class _Training:
  """The state of a run in progress: one copy of each part, named once."""

  step: int
  device_state: PyTree  # {'params', 'opt_state'}, laid out on the devices.
  plateau: contrib.ReduceLROnPlateauState  # On the host.

  def to_host(self, layout: parallel.Layout) -> steps.TrainState:
    tree = layout.gather_towers(self.device_state)
    return steps.TrainState(step=self.step, plateau=self.plateau, **tree)


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> steps.TrainState:
  """Trains, evaluates and checkpoints; resumes from `workdir` if possible.

  Args:
    config: the experiment config (configs/alexnet.py).
    workdir: where checkpoints, TensorBoard files and pictures go.

  Returns:
    The final state (host copy).

  Raises:
    errors.UserError: a config, dataset or workdir that cannot run, or a
      run that diverged (its last good checkpoint is kept).
  """
  experiment = _prepare(config, workdir)
  store = experiment.open_checkpoints()
  try:
    # Refuses an incompatible or unshared workdir before any work.
    state = _restore(experiment, store, resume=True)
    writer = metric_writers.create_default_writer(
        experiment.workdir, just_logging=jax.process_index() > 0)
    if state.step == 0:
      writer.write_hparams(config.to_dict())
    training = _Training(state.step, experiment.layout.shard_towers(
        {'params': state.params, 'opt_state': state.opt_state}), state.plateau)
    try:
      with distributed.StopSignal() as stop:
        _train(experiment, store, training, writer, stop)
    finally:
      store.wait()
      writer.flush()
  finally:
    store.close()
  return training.to_host(experiment.layout)


def _train(experiment: _Experiment, store: checkpoints.Checkpoints,
           training: _Training, writer: metric_writers.MetricWriter,
           stop: distributed.StopSignal) -> None:
  """Steps `training` to the end (or a stop), evaluating and saving."""
  config, layout, schedule = (experiment.config, experiment.layout,
                              experiment.schedule)
  reporter = reporting.Reporter(config, experiment.info.num_classes,
                                schedule, writer, experiment.workdir)
  reporter.start(layout, training.step)
  host_batches = input_pipeline.create_train_iterator(
      config, replicas=layout.local_replicas,
      num_replicas=layout.num_replicas, start_step=training.step)
  with prefetch.to_devices(host_batches, layout.shard_batch) as batches:
    while training.step < schedule.total_steps:
      learning_rate = schedule_lib.learning_rate(config, training.plateau,
                                                 schedule, training.step)
      training.device_state, metrics = experiment.p_train_step(
          training.device_state, next(batches), experiment.mean_image,
          learning_rate, training.step)
      training.step = step = training.step + 1
      reporter.record(metrics)
      store.check_lock()  # Another run took the workdir over: stop.
      # Asked once after every step: with several processes this is JAX's
      # preemption sync point, which all of them must reach together.
      stopping = stop.should_stop(step)
      scheduled = step % schedule.eval_every == 0
      evaluated = scheduled or step == schedule.total_steps
      save = (evaluated or stopping
              or step % config.checkpoint_every_steps == 0)
      if save or step % config.log_every_steps == 0:
        reporter.flush(step, learning_rate)
      if save:
        with reporter.paused():
          _save(experiment, store, training,
                reporter if evaluated else None, scheduled)
      if stopping:
        logging.warning('Stopped after step %d on request; its checkpoint is '
                        'being written. Run the same command to resume.', step)
        return


def _save(experiment: _Experiment, store: checkpoints.Checkpoints,
          training: _Training, reporter: reporting.Reporter | None,
          scheduled: bool) -> None:
  """Checkpoints `training`, first evaluating it if given a `reporter`.

  Only scheduled evaluations move the learning-rate schedule, so that a
  run's length does not change its learning rates. The checkpoint is
  ranked by config.plateau_split's top-1 error.
  """
  config = experiment.config
  tree = experiment.layout.gather_towers(training.device_state)
  # A non-finite loss stops the run at the flush before this; parameters
  # can still go non-finite with a finite loss, and are never saved so.
  if not all(np.isfinite(x).all() for x in jax.tree.leaves(tree['params'])):
    raise errors.DivergedError(
        f'Training diverged: non-finite loss or parameters by step '
        f'{training.step}. The last good checkpoint (step '
        f'{store.latest_step()}) is kept in {experiment.workdir}; lower '
        '--config.learning_rate or check the input scale.')
  error = None
  if reporter:
    results = experiment.evaluate(training.device_state['params'])
    error = results[config.plateau_split]['centre_top1_error']
    if scheduled:
      training.plateau = schedule_lib.update_plateau(
          config, training.plateau, error, training.step)
    reporter.write_evaluation(
        training.step, results,
        schedule_lib.lr_drops(config, training.plateau, experiment.schedule,
                              training.step),
        np.asarray(tree['params']['conv1']['kernel']))
  meta = {'step': training.step, 'seed': config.seed,
          'shape': experiment.signature, recipe_lib.KEY: experiment.recipe}
  store.save(training.step, {**tree, 'plateau': training.plateau}, meta,
             error)


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                        checkpoint: str = 'latest'
                        ) -> tuple[int, dict[str, dict[str, float]]]:
  """Evaluates a saved checkpoint without training (main.py --mode=eval).

  Reads the workdir only: it may be evaluated while a run trains there.

  Args:
    config: the config the checkpoint was trained with (shapes must match).
    workdir: the run's workdir.
    checkpoint: 'latest', 'best' (lowest validation error) or a step.

  Returns:
    (step, {split: metrics}) for 'eval' (and 'minival' if configured):
    centre and 10-crop loss, top-1 and top-5 error.

  Raises:
    errors.UserError: no such checkpoint, or a config that does not fit.
  """
  experiment = _prepare(config, workdir)
  store = experiment.open_checkpoints(read_only=True)
  try:
    state = _restore(experiment, store, store.find(checkpoint))
  finally:
    store.close()
  params = experiment.layout.shard_towers({'params': state.params})['params']
  return state.step, experiment.evaluate(params)
