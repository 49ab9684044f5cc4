"""Training and evaluation of the paper's AlexNet (a library; see main.py).

`train_and_evaluate(config, workdir)` runs the whole experiment and resumes
from `workdir` if it holds a checkpoint. The pieces it is made of
(`create_train_state`, `train_step`, `eval_step`, `make_optimizer`, ...) are
public so that tests and notebooks can use them alone.
"""

from collections.abc import Callable, Iterator
import collections
import dataclasses
import functools
import math
import os
import time
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
from alexnet import distributed
from alexnet import errors
from alexnet import model as model_lib
from alexnet import parallel
from alexnet import pictures
import input_pipeline

PyTree = Any


class ConfigError(ValueError):
  """A configuration that cannot run, refused before any work."""


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


# --- Model and optimizer ------------------------------------------------------


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


def make_plateau(config: ml_collections.ConfigDict
                 ) -> optax.GradientTransformationExtraArgs:
  """Divides the learning rate by 10 when validation error stops improving."""
  plateau = config.plateau
  return contrib.reduce_on_plateau(
      factor=plateau.factor, patience=plateau.patience, rtol=0.0,
      atol=plateau.min_delta, cooldown=plateau.cooldown,
      min_scale=plateau.factor ** plateau.max_drops)


def plateau_drops(config: ml_collections.ConfigDict,
                  plateau: contrib.ReduceLROnPlateauState) -> int:
  """How many times the schedule has divided the learning rate."""
  return round(math.log(float(plateau.scale)) /
               math.log(config.plateau.factor))


def create_train_state(config: ml_collections.ConfigDict,
                       model: model_lib.AlexNet) -> TrainState:
  """Initial state on the host; the same for every device layout.

  Args:
    config: uses seed and image_size.
    model: a model with both towers local (the default exchange).

  Returns:
    The state at step 0.
  """
  images = jnp.zeros((1, config.image_size, config.image_size, 3))
  init = jax.jit(functools.partial(model.init, train=False))
  params = jax.device_get(init(jax.random.key(config.seed), images)['params'])
  opt_state = jax.device_get(make_optimizer(config, 0.0).init(params))
  plateau = jax.device_get(make_plateau(config).init(None))
  return TrainState(step=0, params=params, opt_state=opt_state,
                    plateau=plateau)


# --- Steps (run under the layout's pmap) --------------------------------------


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def train_step(towers: PyTree, batch: dict[str, jax.Array],
               learning_rate: jax.Array, step: jax.Array, *,
               model: model_lib.AlexNet, layout: parallel.Layout,
               config: ml_collections.ConfigDict
               ) -> tuple[PyTree, dict[str, jax.Array]]:
  """One SGD step on this device's towers.

  Args:
    towers: {'params', 'opt_state'} of this device's towers.
    batch: this replica's {'image', 'label'}.
    learning_rate: the current learning rate.
    step: the global step; keys dropout together with the replica and tower.
    model: the net with the layout's exchange.
    layout: the device layout.
    config: the experiment config.

  Returns:
    The new towers and {'loss', 'accuracy'} averaged over replicas.
  """
  dropout_key = jax.random.fold_in(
      jax.random.fold_in(jax.random.key(config.seed), step),
      layout.replica_index())

  def loss_fn(params):
    logits = model.apply({'params': params}, batch['image'], train=True,
                         rngs={'dropout': dropout_key})
    return cross_entropy(logits, batch['label']).mean(), logits

  loss, logits, grads = layout.grad(loss_fn)(towers['params'])
  updates, opt_state = make_optimizer(config, learning_rate).update(
      grads, towers['opt_state'], towers['params'])
  params = optax.apply_updates(towers['params'], updates)
  accuracy = jnp.mean(jnp.argmax(logits, -1) == batch['label'])
  metrics = layout.mean_over_replicas({'loss': loss, 'accuracy': accuracy})
  return {'params': params, 'opt_state': opt_state}, metrics


def _label_rank(log_probs: jax.Array, labels: jax.Array) -> jax.Array:
  """Classes scored strictly above the label (0: a top-1 hit)."""
  label_score = jnp.take_along_axis(log_probs, labels[:, None], axis=-1)
  return jnp.sum(log_probs > label_score, axis=-1)


def eval_metrics(logits: jax.Array, labels: jax.Array,
                 mask: jax.Array) -> dict[str, jax.Array]:
  """Sums of losses and errors over the unmasked examples of a batch.

  Args:
    logits: [batch, views, classes]; view 0 is the centre crop. With 10
      views the paper's prediction averages the 10 softmax outputs.
    labels: [batch] int.
    mask: [batch] bool, False for padding.

  Returns:
    Sums, to be added over batches and devices and divided by 'count'.
  """
  predictions = {'centre': jax.nn.log_softmax(logits[:, 0])}
  if logits.shape[1] > 1:
    # log(mean_v softmax_v), computed in log space so that it cannot
    # underflow to log(0).
    predictions['ten_crop'] = (
        jax.nn.logsumexp(jax.nn.log_softmax(logits), axis=1)
        - jnp.log(logits.shape[1]))
  sums = {'count': jnp.sum(mask.astype(jnp.float32))}
  top_k = min(5, logits.shape[-1])
  masked_sum = lambda x: jnp.sum(jnp.where(mask, x, 0.0))
  for name, log_probs in predictions.items():
    nll = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
    rank = _label_rank(log_probs, labels)
    sums[f'{name}_loss'] = masked_sum(nll)
    sums[f'{name}_top1_error'] = masked_sum((rank >= 1).astype(jnp.float32))
    sums[f'{name}_top5_error'] = masked_sum(
        (rank >= top_k).astype(jnp.float32))
  return sums


def eval_step(params: PyTree, batch: dict[str, jax.Array], *,
              model: model_lib.AlexNet, layout: parallel.Layout
              ) -> dict[str, jax.Array]:
  """Metric sums of one evaluation batch over all replicas."""
  images = batch['image']
  flat = images.reshape(-1, *images.shape[2:])
  logits = model.apply({'params': params}, flat, train=False)
  logits = logits.reshape(*images.shape[:2], -1)
  return layout.sum_over_replicas(
      eval_metrics(logits, batch['label'], batch['mask']))


def summarize(sums: dict[str, float]) -> dict[str, float]:
  """Turns summed eval metrics into means over the evaluated examples."""
  count = sums['count']
  return {name: float(value) / count for name, value in sums.items()
          if name != 'count'}


def evaluate(p_eval_step: Callable[..., Any], params: PyTree,
             batches: input_pipeline.EvalIterable,
             layout: parallel.Layout) -> dict[str, float]:
  """Exact metrics over one evaluation split (padding masked out)."""
  total = collections.Counter()
  for batch in batches:
    sums = jax.device_get(p_eval_step(params, layout.shard_batch(batch)))
    total.update({k: float(v) for k, v in sums.items()})
  return summarize(total)


# --- The experiment -----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Durations in steps, converted once from the config's epochs."""

  steps_per_epoch: int
  total_steps: int
  eval_every: int

  @classmethod
  def create(cls, config: ml_collections.ConfigDict,
             info: input_pipeline.DatasetInfo,
             num_replicas: int = 1) -> 'Schedule':
    # Each replica reads its own slice of the data (see `_train_batches`).
    per_epoch = input_pipeline.steps_per_epoch(config, info,
                                               process_count=num_replicas)
    total = (config.num_train_steps if config.num_train_steps > 0
             else math.ceil(config.num_epochs * per_epoch))
    eval_every = max(1, round(config.eval_every_epochs * per_epoch))
    return cls(per_epoch, total, eval_every)


def validate_config(config: ml_collections.ConfigDict,
                    layout: parallel.Layout) -> None:
  """Refuses a config that cannot run, naming the field and the fix."""
  positive = ['batch_size', 'eval_batch_size', 'checkpoint_every_steps',
              'log_every_steps', 'keep_checkpoints', 'eval_every_epochs',
              'learning_rate', 'width', 'flat_loss_evals']
  for field in positive:
    if not config[field] > 0:
      raise ConfigError(f'config.{field}={config[field]} must be positive.')
  if not (config.num_epochs > 0 or config.num_train_steps > 0):
    raise ConfigError('Set a positive config.num_epochs or '
                      'config.num_train_steps.')
  smallest = model_lib.smallest_image_size()
  if config.image_size < smallest:
    raise ConfigError(
        f'config.image_size={config.image_size} is too small for the five '
        f'conv layers and three pools; use at least {smallest}.')
  if config.resize_size < config.image_size:
    raise ConfigError(f'config.resize_size={config.resize_size} must be at '
                      f'least config.image_size={config.image_size}.')
  for field in ('batch_size', 'eval_batch_size'):
    share = layout.num_replicas
    if config[field] % share:
      raise ConfigError(
          f'config.{field}={config[field]} must be divisible by the '
          f'{share} data-parallel replicas ({layout.num_devices} devices, '
          f'{layout.towers_per_device} tower(s) each); e.g. '
          f'--config.{field}={share * max(1, config[field] // share)}.')
  choices = {'init_scheme': tuple(model_lib.INITIALIZATIONS),
             'dtype': ('float32', 'bfloat16'), 'mean': ('pixel', 'channel'),
             'pca_stats': ('dataset', 'imagenet'),
             'plateau_split': ('eval', 'minival')}
  for field, allowed in choices.items():
    if config[field] not in allowed:
      raise ConfigError(f'config.{field}={config[field]!r}: choose one of '
                        f'{allowed}.')
  if config.plateau_split == 'minival' and not config.minival_split:
    raise ConfigError("config.plateau_split='minival' needs "
                      "config.minival_split, e.g. 'train[99%:]'.")


def _shape_signature(config: ml_collections.ConfigDict,
                     num_classes: int) -> dict[str, Any]:
  """The settings that fix parameter shapes: a checkpoint must match them."""
  return {'num_classes': num_classes, 'width': config.width,
          'image_size': config.image_size}


def _prefetch(batches: Iterator[PyTree], layout: parallel.Layout,
              size: int = 2) -> Iterator[PyTree]:
  """Keeps `size` batches on their way to the devices."""
  queue = collections.deque()
  for batch in batches:
    queue.append(layout.shard_batch(batch))
    if len(queue) == size:
      yield queue.popleft()


def _local_replicas(layout: parallel.Layout) -> list[int]:
  """Global indices of this process's data-parallel replicas, in order."""
  per = layout.devices_per_replica
  return sorted({i // per for i, device in enumerate(layout.devices)
                 if device.process_index == jax.process_index()})


def _train_batches(config: ml_collections.ConfigDict, layout: parallel.Layout,
                   start_step: int) -> Iterator[PyTree]:
  """This process's training batches, [local replicas, per replica, ...].

  Every data-parallel replica reads its own slice of the training split
  with its own random draws (the input pipeline's per-process sharding,
  applied per replica), so replica r sees the same images whether it runs
  in this process or another: the run does not depend on how the replicas
  are spread over processes. config.shuffle_buffer is shared out among all
  replicas (a layout-independent share), so all buffers together hold at
  most that many examples.
  """
  replicas = _local_replicas(layout)
  config = config.copy_and_resolve_references()
  config.shuffle_buffer = max(1, config.shuffle_buffer // layout.num_replicas)
  iterators = [input_pipeline.create_train_iterator(
      config, num_shards=1, start_step=start_step, process_index=replica,
      process_count=layout.num_replicas) for replica in replicas]
  while True:
    parts = [next(iterator) for iterator in iterators]
    yield jax.tree.map(lambda *x: np.concatenate(x), *parts)


def _create_layout(config: ml_collections.ConfigDict) -> parallel.Layout:
  """The device layout, with config errors named as such."""
  devices = jax.devices()
  if config.num_devices:
    if not 0 < config.num_devices <= jax.local_device_count():
      raise ConfigError(
          f'config.num_devices={config.num_devices}, but this process has '
          f'{jax.local_device_count()} devices; 0 uses them all.')
    if jax.process_count() > 1:
      raise ConfigError('config.num_devices must be 0 (all devices) with '
                        'several processes.')
    devices = jax.local_devices()[:config.num_devices]
  try:
    return parallel.Layout.create(config.model_parallel, devices,
                                  towers=config.towers)
  except errors.ConfigError as error:
    # Until this module raises errors.ConfigError itself.
    raise ConfigError(str(error)) from None


class FlatLossMonitor:
  """Notices a validation loss stuck at chance, ln(num_classes).

  That is the widely reported "flat loss" of the paper's initialisation
  (biases 1, weights N(0, 0.01)) when inputs are not mean-subtracted 0-255
  pixels or are tiny (REFERENCE.md): the net learns only the class prior.
  """

  def __init__(self, num_classes: int, patience: int, init_scheme: str):
    self._chance = math.log(num_classes)
    self._num_classes, self._patience = num_classes, patience
    self._init_scheme = init_scheme
    self._flat = 0

  def update(self, loss: float) -> str | None:
    """The warning, once, when the loss has been flat `patience` times."""
    flat = abs(loss - self._chance) < 0.01 * self._chance
    self._flat = self._flat + 1 if flat else 0
    if self._flat != self._patience:
      return None
    return (f'The validation loss has stayed at ln({self._num_classes}) = '
            f'{self._chance:.3f} (chance) for {self._patience} evaluations: '
            "the net is not learning. A known cause is the paper's "
            'initialisation (biases 1, weights N(0, 0.01)) with inputs that '
            'are not mean-subtracted 0-255 pixels, or tiny inputs such as the '
            'digits; try --config.init_scheme=caffe (config.init_scheme is '
            f'now {self._init_scheme!r}).')


class _Run:
  """The state and helpers of one `train_and_evaluate` call."""

  def __init__(self, config, workdir):
    self.config = config
    self.workdir = os.path.abspath(workdir)
    self.layout = _create_layout(config)
    validate_config(config, self.layout)
    self.info = input_pipeline.get_dataset_info(config)
    self.schedule = Schedule.create(config, self.info,
                                    self.layout.num_replicas)
    self.signature = _shape_signature(config, self.info.num_classes)
    self.model = create_model(config, self.info.num_classes,
                              self.layout.exchange)
    self.checkpoints = checkpoints.Checkpoints(
        os.path.join(self.workdir, 'checkpoints'),
        keep=config.keep_checkpoints)
    self.flat_loss = FlatLossMonitor(self.info.num_classes,
                                     config.flat_loss_evals,
                                     config.init_scheme)

  def restore_or_init(self) -> TrainState:
    """The latest checkpoint in the workdir, or a fresh state."""
    # Refuses an incompatible or unshared workdir before any work.
    step = self.checkpoints.check_latest(self.signature)
    state = create_train_state(
        self.config, create_model(self.config, self.info.num_classes))
    like = {'params': state.params, 'opt_state': state.opt_state,
            'plateau': state.plateau}
    if step is None:
      logging.info('Starting from scratch in %s.', self.workdir)
      return state
    tree, meta = self.checkpoints.restore(like, self.signature, step)
    logging.info('Resuming from step %d in %s.', meta['step'], self.workdir)
    return TrainState(step=meta['step'], **tree)

  def save(self, state: TrainState, error: float | None = None) -> None:
    tree = {'params': state.params, 'opt_state': state.opt_state,
            'plateau': state.plateau}
    if not all(np.isfinite(x).all() for x in jax.tree.leaves(state.params)):
      raise FloatingPointError(self._non_finite_message(state.step))
    meta = {'step': state.step, 'seed': self.config.seed,
            'shape': self.signature}
    self.checkpoints.save(state.step, tree, meta, error)

  def _non_finite_message(self, step: int) -> str:
    return (f'Training diverged: non-finite loss or parameters by step '
            f'{step}. The last good checkpoint (step '
            f'{self.checkpoints.latest_step()}) is kept in {self.workdir}; '
            'lower --config.learning_rate or check the input scale.')

  def learning_rate(self, plateau: contrib.ReduceLROnPlateauState) -> float:
    return self.config.learning_rate * float(plateau.scale)


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> TrainState:
  """Trains, evaluates and checkpoints; resumes from `workdir` if possible.

  Args:
    config: the experiment config (configs/alexnet.py).
    workdir: where checkpoints, TensorBoard files and pictures go.

  Returns:
    The final state (host copy).
  """
  run = _Run(config, workdir)
  state = run.restore_or_init()
  writer = metric_writers.create_default_writer(
      run.workdir, just_logging=jax.process_index() > 0)
  if state.step == 0:
    writer.write_hparams(config.to_dict())
  try:
    with distributed.StopSignal() as stop:
      state = _train_loop(run, state, writer, stop)
  finally:
    run.checkpoints.wait()
    writer.flush()
  run.checkpoints.close()
  return state


def _train_loop(run: _Run, state: TrainState,
                writer: metric_writers.MetricWriter,
                stop: distributed.StopSignal) -> TrainState:
  config, layout, schedule = run.config, run.layout, run.schedule
  p_train_step = layout.pmap(
      functools.partial(train_step, model=run.model, layout=layout,
                        config=config),
      in_axes=(0, 0, None, None), out_axes=(0, None), donate_argnums=(0,))
  p_eval_step = layout.pmap(
      functools.partial(eval_step, model=run.model, layout=layout),
      out_axes=None)
  towers = layout.shard_towers({'params': state.params,
                                'opt_state': state.opt_state})
  batches = _prefetch(_train_batches(config, layout, state.step), layout)
  eval_sets = {split: input_pipeline.create_eval_iterable(
      config, split, num_shards=layout.num_local_replicas)
               for split in run.info.num_eval_examples}
  progress = _Progress(config, schedule, state.step, writer)
  logging.info('%s; %d steps of %d images (%d per epoch), evaluating every '
               '%d.', _describe(layout), schedule.total_steps,
               config.batch_size, schedule.steps_per_epoch,
               schedule.eval_every)

  def host_state(step):
    tree = layout.gather_towers(towers)
    return state.replace(step=step, params=tree['params'],
                         opt_state=tree['opt_state'])

  step = state.step
  plateau = state.plateau
  stopping = False
  while step < schedule.total_steps and not stopping:
    lr = run.learning_rate(plateau)
    towers, metrics = p_train_step(towers, next(batches), lr, step)
    step += 1
    progress.record(metrics)
    # Asked once after every step: with several processes this is JAX's
    # preemption sync point, which all of them must reach together.
    stopping = stop.should_stop(step)
    is_eval = step % schedule.eval_every == 0
    is_last = step == schedule.total_steps
    must_save = (is_eval or is_last or stopping
                 or step % config.checkpoint_every_steps == 0)
    if step % config.log_every_steps == 0 or must_save:
      if not progress.flush(step, lr):
        raise FloatingPointError(run._non_finite_message(step))
    if not must_save:
      continue
    state = host_state(step).replace(plateau=plateau)
    error = None
    if is_eval or is_last:
      results = {split: evaluate(p_eval_step, towers['params'], batches_,
                                 layout)
                 for split, batches_ in eval_sets.items()}
      error = results[config.plateau_split]['centre_top1_error']
      if is_eval:  # Only scheduled evaluations move the schedule, so that
        # a run's length does not change its learning rates.
        plateau = _update_plateau(run, plateau, error, step)
        state = state.replace(plateau=plateau)
      _write_eval(run, writer, step, results, state)
    run.save(state, error)
  if stopping:
    logging.warning('Stopped after step %d on request; its checkpoint is '
                    'being written. Run the same command to resume.', step)
  return host_state(step).replace(plateau=plateau)


def _update_plateau(run: _Run, plateau: contrib.ReduceLROnPlateauState,
                    error: float, step: int) -> contrib.ReduceLROnPlateauState:
  drops = plateau_drops(run.config, plateau)
  _, plateau = make_plateau(run.config).update({}, plateau, value=error)
  plateau = jax.device_get(plateau)
  if plateau_drops(run.config, plateau) > drops:
    logging.info('Step %d: validation error stopped improving; learning rate '
                 'divided (drop %d), now %g.', step,
                 plateau_drops(run.config, plateau),
                 run.learning_rate(plateau))
  return plateau


def _write_eval(run: _Run, writer: metric_writers.MetricWriter, step: int,
                results: dict[str, dict[str, float]],
                state: TrainState) -> None:
  scalars = {f'{split}/{name}': value for split, metrics in results.items()
             for name, value in metrics.items()}
  scalars['train/lr_drops'] = plateau_drops(run.config, state.plateau)
  writer.write_scalars(step, scalars)
  warning = run.flat_loss.update(results['eval']['centre_loss'])
  if warning:
    logging.warning(warning)
  picture = pictures.kernel_grid(np.asarray(state.params['conv1']['kernel']))
  writer.write_images(step, {'conv1_kernels': picture[None]})
  if jax.process_index() == 0:
    pictures.save_png(picture, os.path.join(run.workdir, 'conv1_kernels.png'))


def _describe(layout: parallel.Layout) -> str:
  if layout.towers_per_device == 1:
    return (f'{layout.num_devices} devices: {layout.num_replicas} replica(s) '
            'of a tower pair, one tower per device')
  return (f'{layout.num_devices} device(s), both towers on each, '
          f'{layout.num_replicas} data-parallel replica(s)')


class _Progress:
  """Averages train metrics; writes them with throughput and an ETA."""

  def __init__(self, config, schedule: Schedule, step: int,
               writer: metric_writers.MetricWriter):
    self._config, self._schedule, self._writer = config, schedule, writer
    self._pending = []
    self._since = (step, time.perf_counter())

  def record(self, metrics: dict[str, jax.Array]) -> None:
    self._pending.append(metrics)

  def flush(self, step: int, lr: float) -> bool:
    """Writes the averages; False if the loss went non-finite."""
    if not self._pending:
      return True
    metrics = jax.device_get(self._pending)
    self._pending = []
    mean = {k: float(np.mean([m[k] for m in metrics])) for k in metrics[0]}
    start_step, start_time = self._since
    seconds = time.perf_counter() - start_time
    self._since = (step, time.perf_counter())
    steps_per_s = (step - start_step) / max(seconds, 1e-9)
    total = self._schedule.total_steps
    self._writer.write_scalars(step, {
        'train/loss': mean['loss'], 'train/accuracy': mean['accuracy'],
        'train/lr': lr, 'train/images_per_s':
            steps_per_s * self._config.batch_size,
        'train/step_time_s': 1 / max(steps_per_s, 1e-9)})
    eta = (total - step) / max(steps_per_s, 1e-9)
    logging.info(
        'step %d/%d (%.1f%%, epoch %.2f) | loss %.4f | accuracy %.2f%% | lr %g'
        ' | %.1f images/s | ETA %s', step, total, 100 * step / total,
        step / self._schedule.steps_per_epoch, mean['loss'],
        100 * mean['accuracy'], lr, steps_per_s * self._config.batch_size,
        time.strftime('%H:%M:%S', time.gmtime(eta)))
    return math.isfinite(mean['loss'])
