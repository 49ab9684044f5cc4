"""Training and evaluation of the paper's AlexNet (a library; see main.py).

`train_and_evaluate(config, workdir)` runs the whole experiment and resumes
from `workdir` if it holds a checkpoint; `evaluate_checkpoint` evaluates a
saved one without training. The pieces they are made of
(`create_train_state`, `train_step`, `eval_step`, `make_optimizer`, ...) are
public so that tests, benchmarks and notebooks can use them alone.
"""

import dataclasses
import functools
import os
from typing import Any

from absl import logging
from clu import metric_writers
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from optax import contrib

from alexnet import checkpoints
from alexnet import config_checks
from alexnet import distributed
from alexnet import errors
from alexnet import evaluation
from alexnet import model as model_lib
from alexnet import parallel
from alexnet import prefetch
from alexnet import reporting
from alexnet import schedule as schedule_lib
from alexnet.data import on_device
import input_pipeline

PyTree = Any


@flax.struct.dataclass
class TrainState:
  """The whole training state, one host copy (tower leaves are [2, ...]).

  The data position and the dropout keys are functions of (seed, step), so
  `step` is all the checkpoint needs to resume them exactly.
  """

  step: int
  params: PyTree
  opt_state: optax.OptState
  plateau: contrib.ReduceLROnPlateauState


def create_model(config: ml_collections.ConfigDict, num_classes: int,
                 exchange: model_lib.Exchange | None = None
                 ) -> model_lib.AlexNet:
  """The net the config describes; `exchange` None keeps all towers local."""
  return model_lib.AlexNet(
      num_classes=num_classes, width=config.width, towers=config.towers,
      lrn_enabled=config.lrn.enabled, lrn_k=config.lrn.k,
      lrn_size=config.lrn.size, lrn_alpha=config.lrn.alpha,
      lrn_beta=config.lrn.beta, pool_size=config.pool_size,
      pool_stride=config.pool_stride, activation=config.activation,
      dropout_rate=config.dropout_rate, init_scheme=config.init_scheme,
      conv_impl=config.conv_impl, dtype=jnp.dtype(config.dtype),
      exchange=exchange)


def decay_mask(params: PyTree) -> PyTree:
  """True for kernels: weight decay skips biases, as cuda-convnet2/Caffe do."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: path[-1].key == 'kernel', params)


def make_optimizer(config: ml_collections.ConfigDict,
                   learning_rate: float | jax.Array
                   ) -> optax.GradientTransformation:
  """The paper's update (section 5), with the learning rate inside v.

  v <- momentum * v - weight_decay * lr * w - lr * grad;  w <- w + v.
  The chain holds no learning-rate state, so `learning_rate` can be a traced
  argument of the train step: a drop does not recompile.

  Args:
    config: uses momentum and weight_decay.
    learning_rate: the current learning rate.

  Returns:
    The optax transformation.
  """
  return optax.chain(
      optax.add_decayed_weights(config.weight_decay, mask=decay_mask),
      optax.scale_by_learning_rate(learning_rate),
      optax.trace(decay=config.momentum))


def _initial_tree(config: ml_collections.ConfigDict,
                  model: model_lib.AlexNet) -> PyTree:
  """{'params', 'opt_state', 'plateau'} at step 0, as a jittable function."""
  images = jnp.zeros((1, config.image_size, config.image_size, 3))
  params = model.init(jax.random.key(config.seed), images,
                      train=False)['params']
  return {'params': params,
          'opt_state': make_optimizer(config, 0.0).init(params),
          'plateau': schedule_lib.make_plateau(config).init(None)}


def create_train_state(config: ml_collections.ConfigDict,
                       model: model_lib.AlexNet) -> TrainState:
  """Initial state on the host; the same for every device layout.

  Args:
    config: uses seed and image_size.
    model: a model with both towers local (the default exchange).

  Returns:
    The state at step 0.
  """
  tree = jax.jit(functools.partial(_initial_tree, config, model))()
  return TrainState(step=0, **jax.device_get(tree))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def train_step(device_state: PyTree, batch: dict[str, jax.Array],
               learning_rate: jax.Array, step: jax.Array, *,
               model: model_lib.AlexNet, layout: parallel.Layout,
               config: ml_collections.ConfigDict
               ) -> tuple[PyTree, dict[str, jax.Array]]:
  """One SGD step on this device's towers.

  Args:
    device_state: {'params', 'opt_state'} of this device's towers.
    batch: this replica's {'image', 'label'}.
    learning_rate: the current learning rate.
    step: the global step; keys dropout together with the replica and tower.
    model: the net with the layout's exchange.
    layout: the device layout.
    config: the experiment config.

  Returns:
    The new device state and {'loss', 'accuracy'} averaged over replicas.
  """
  dropout_key = jax.random.fold_in(
      jax.random.fold_in(jax.random.key(config.seed), step),
      layout.replica_index())

  def loss_fn(params):
    logits = model.apply({'params': params}, batch['image'], train=True,
                         rngs={'dropout': dropout_key})
    return cross_entropy(logits, batch['label']).mean(), logits

  params, opt_state = device_state['params'], device_state['opt_state']
  loss, logits, grads = layout.grad(loss_fn)(params)
  updates, opt_state = make_optimizer(config, learning_rate).update(
      grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  accuracy = jnp.mean(jnp.argmax(logits, -1) == batch['label'])
  metrics = layout.mean_over_replicas({'loss': loss, 'accuracy': accuracy})
  return {'params': params, 'opt_state': opt_state}, metrics


def eval_step(params: PyTree, batch: dict[str, jax.Array], *,
              model: model_lib.AlexNet, layout: parallel.Layout
              ) -> dict[str, jax.Array]:
  """Metric sums of one evaluation batch over all replicas."""
  images = batch['image']
  flat = images.reshape(-1, *images.shape[2:])
  logits = model.apply({'params': params}, flat, train=False)
  logits = logits.reshape(*images.shape[:2], -1)
  return layout.sum_over_replicas(
      evaluation.eval_metrics(logits, batch['label'], batch['mask']))


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


def shape_signature(config: ml_collections.ConfigDict,
                    num_classes: int) -> dict[str, Any]:
  """The settings that fix parameter shapes: a checkpoint must match them."""
  return {'num_classes': num_classes, 'width': config.width,
          'image_size': config.image_size, 'towers': config.towers,
          'pool_size': config.pool_size, 'pool_stride': config.pool_stride}


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
    return shape_signature(self.config, self.info.num_classes)

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
    config = self.config

    def normalised_step(params, batch, mean_image):
      views = on_device.eval_images(batch, mean_image, config.image_size,
                                    config.ten_crop)
      return eval_step(params, {**batch, 'image': views}, model=self.model,
                       layout=self.layout)
    return self.layout.pmap(normalised_step, out_axes=None)

  @functools.cached_property
  def p_train_step(self) -> Any:
    """The mapped `train_step`, fed uint8 batches and the mean image."""
    def normalised_step(device_state, batch, mean_image, learning_rate,
                        step):
      inputs = {'image': on_device.train_images(batch, mean_image),
                'label': batch['label']}
      return train_step(device_state, inputs, learning_rate, step,
                        model=self.model, layout=self.layout,
                        config=self.config)
    return self.layout.pmap(normalised_step, in_axes=(0, 0, 0, None, None),
                            out_axes=(0, None), donate_argnums=(0,))


def _prepare(config: ml_collections.ConfigDict, workdir: str) -> _Experiment:
  """Checks the config against the devices and reads the dataset's sizes."""
  layout = _create_layout(config)
  config_checks.validate(config, layout)
  info = input_pipeline.get_dataset_info(config)
  return _Experiment(
      config, os.path.abspath(workdir), layout, info,
      schedule_lib.Schedule.create(config, info, layout.num_replicas),
      create_model(config, info.num_classes, layout.exchange),
      layout.replicate(input_pipeline.mean_image(config)))


def planned_steps(config: ml_collections.ConfigDict) -> int:
  """The step `train_and_evaluate(config, ...)` ends at, unless stopped."""
  return schedule_lib.Schedule.create(
      config, input_pipeline.get_dataset_info(config),
      _create_layout(config).num_replicas).total_steps


def _restore(experiment: _Experiment, store: checkpoints.Checkpoints,
             step: int | None) -> TrainState:
  """Checkpoint `step`, or a fresh state where `step` is None."""
  config = experiment.config
  model = create_model(config, experiment.info.num_classes)
  if step is None:
    logging.info('Starting from scratch in %s.', experiment.workdir)
    return create_train_state(config, model)
  like = jax.eval_shape(functools.partial(_initial_tree, config, model))
  tree, _ = store.restore(like, experiment.signature, step)
  logging.info('Resuming from step %d in %s.', step, experiment.workdir)
  return TrainState(step=step, **jax.device_get(tree))


@dataclasses.dataclass
class _Training:
  """The state of a run in progress: one copy of each part, named once."""

  step: int
  device_state: PyTree  # {'params', 'opt_state'}, laid out on the devices.
  plateau: contrib.ReduceLROnPlateauState  # On the host.

  def to_host(self, layout: parallel.Layout) -> TrainState:
    tree = layout.gather_towers(self.device_state)
    return TrainState(step=self.step, plateau=self.plateau, **tree)


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> TrainState:
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
    state = _restore(experiment, store,
                     store.check_latest(experiment.signature))
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
  # The one divergence check: a checkpoint is never written non-finite.
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
          'shape': experiment.signature}
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
