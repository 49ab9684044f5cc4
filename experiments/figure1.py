"""Figure 1 of the paper: epochs to 25% training error, ReLU against tanh.

    python -m experiments.figure1 --config=configs/figure1.py \
        --workdir=runs/figure1

For every seed and activation, each candidate learning rate trains for a
short sweep; the fastest learner (lowest mean training error over the sweep)
trains on, from where it stopped, to the full length. Writes into the
workdir: `figure1.png` (training error per epoch, one line per seed, ReLU
solid blue, tanh dashed red), `figure1.json` (every curve, the chosen
learning rates, the crossing epochs and their ratios) and TensorBoard
scalars, one run per (seed, activation, learning rate). Prints a table of
the epochs each activation needs to reach every target error, and of the
ratio tanh / ReLU as mean ± standard deviation over the seeds.

A finished seed leaves `seed<k>/curves.json`; running the command again
reads it instead of training that seed again.
"""

from collections.abc import Sequence
import dataclasses
import functools
import json
import math
import os
from typing import Any

from absl import app
from absl import flags
from absl import logging
from clu import metric_writers
import flax.linen as nn
import jax
import jax.numpy as jnp
from matplotlib import figure as figure_lib
import ml_collections
from ml_collections import config_flags
import numpy as np
import optax

from alexnet import backend
from alexnet import errors
from alexnet import steps
from alexnet.data import fashion_mnist
from experiments import crossings
from experiments import plots

ACTIVATIONS = crossings.ACTIVATIONS
NAMES = {'relu': 'ReLU', 'tanh': 'tanh'}
# The paper's Figure 1: ReLU solid, tanh dashed.
STYLES = {'relu': ('tab:blue', False), 'tanh': ('tab:red', True)}


class SmallConvNet(nn.Module):
  """Convolutions, each followed by the activation and a 3x3/2 max-pool."""

  features: Sequence[int]
  activation: str
  num_classes: int = fashion_mnist.NUM_CLASSES

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    act = {'relu': nn.relu, 'tanh': jnp.tanh}[self.activation]
    x = images
    for features in self.features:
      x = act(nn.Conv(features, (5, 5))(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
    return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


def load_data(config: ml_collections.ConfigDict
              ) -> tuple[np.ndarray, np.ndarray]:
  """The training images, standardised, and their labels.

  Args:
    config: uses idx_dir and num_train.

  Returns:
    (float32 [n, 28, 28, 1] with zero mean and unit variance, int32 [n]).

  Raises:
    DatasetError: missing or bad IDX files.
    ConfigError: num_train larger than the data.
  """
  images, labels = fashion_mnist.read_split(config.idx_dir, 'train')
  if config.num_train > len(images):
    raise errors.ConfigError(
        f'config.num_train={config.num_train} but {config.idx_dir} holds '
        f'{len(images)} training images; lower it (0 uses them all).')
  if config.num_train:
    images, labels = images[:config.num_train], labels[:config.num_train]
  images = images[..., None].astype(np.float32)
  images = (images - images.mean()) / images.std()
  return images, labels.astype(np.int32)


def _train_step(params, opt_state, images, labels, learning_rate, *, model,
                config):
  """One momentum-SGD step; also returns the loss and the misclassified."""
  def loss_fn(params):
    logits = model.apply({'params': params}, images)
    loss = steps.cross_entropy(logits, labels).mean()
    return loss, logits

  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  updates, opt_state = steps.make_optimizer(config, learning_rate).update(
      grads, opt_state, params)
  wrong = jnp.sum(jnp.argmax(logits, axis=-1) != labels)
  return optax.apply_updates(params, updates), opt_state, loss, wrong


@dataclasses.dataclass(frozen=True)
class Net:
  """A net's initial parameters and compiled step, shared by its runs."""

  activation: str
  seed: int
  params: Any
  step_fn: Any

  @classmethod
  def create(cls, config: ml_collections.ConfigDict, activation: str,
             seed: int, example: np.ndarray) -> 'Net':
    """The net of `config.features` with this activation.

    Args:
      config: uses features, momentum and weight_decay.
      activation: 'relu' or 'tanh'.
      seed: seeds the initial weights; both activations of a seed start
        from the same key.
      example: one input batch, for the shapes.

    Returns:
      The net.
    """
    model = SmallConvNet(features=tuple(config.features),
                         activation=activation)
    params = model.init(jax.random.key(seed), example)['params']
    step_fn = jax.jit(functools.partial(_train_step, model=model,
                                        config=config))
    return cls(activation, seed, params, step_fn)


class Run:
  """One net at one learning rate; trains on in stretches, recording."""

  def __init__(self, config: ml_collections.ConfigDict, net: Net,
               learning_rate: float, data: tuple[np.ndarray, np.ndarray],
               workdir: str):
    self._config = config
    self._images, self._labels = data
    self.steps_per_epoch = len(self._labels) // config.batch_size
    self._steps_per_record = self.steps_per_epoch // config.records_per_epoch
    self._params = net.params
    self._opt_state = steps.make_optimizer(config, 0.0).init(self._params)
    self._step_fn = net.step_fn
    self.step = 0
    self.curve = crossings.Curve(net.activation, learning_rate, net.seed)
    # TensorBoard only: the log gets one line per epoch (see _record).
    self._writer = metric_writers.SummaryWriter(
        os.path.join(workdir, self.curve.name))

  def _batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    # Both activations of a seed see the same data order: a permutation per
    # epoch, seeded by (seed, epoch); an epoch's last partial batch is
    # dropped.
    epoch, index = divmod(step, self.steps_per_epoch)
    order = np.random.default_rng([self.curve.seed, epoch]).permutation(
        len(self._labels))
    take = order[index * self._config.batch_size:
                 (index + 1) * self._config.batch_size]
    return self._images[take], self._labels[take]

  def train_to(self, num_epochs: float) -> None:
    """Trains until `num_epochs` (or divergence), recording the error."""
    last = round(num_epochs * self.steps_per_epoch)
    wrong, losses = [], []
    while self.step < last and not self.curve.diverged:
      images, labels = self._batch(self.step)
      self._params, self._opt_state, loss, w = self._step_fn(
          self._params, self._opt_state, images, labels,
          self.curve.learning_rate)
      wrong.append(w)
      losses.append(loss)
      self.step += 1
      if self.step % self._steps_per_record == 0:
        self._record(jax.device_get(wrong), jax.device_get(losses))
        wrong, losses = [], []
    self._writer.flush()

  def _record(self, wrong: list[Any], losses: list[Any]) -> None:
    error = float(np.sum(wrong)) / (len(wrong) * self._config.batch_size)
    loss = float(np.mean(losses))
    self.curve.diverged = not math.isfinite(loss)
    if self.curve.diverged:
      return
    self.curve.epochs.append(self.step / self.steps_per_epoch)
    self.curve.errors.append(error)
    self._writer.write_scalars(self.step, {'train/error': error,
                                           'train/loss': loss})
    if self.step // self.steps_per_epoch > (
        self.step - self._steps_per_record) // self.steps_per_epoch:
      logging.info('seed %d, %s: epoch %.2f, training error %.4f, loss %.4f',
                   self.curve.seed, self.curve.name, self.curve.epochs[-1],
                   error, loss)


def validate_config(config: ml_collections.ConfigDict, num_train: int
                    ) -> None:
  """Refuses settings that cannot record a curve, before any training.

  Args:
    config: the Figure 1 config.
    num_train: number of training images used.

  Raises:
    ConfigError: naming the field and the fix.
  """
  steps_per_epoch = num_train // config.batch_size
  if steps_per_epoch < config.records_per_epoch:
    raise errors.ConfigError(
        f'config.records_per_epoch={config.records_per_epoch} is more than '
        f'the {steps_per_epoch} steps of an epoch ({num_train} images, '
        f'batch {config.batch_size}); lower it or config.batch_size.')
  if not 0 < config.sweep_epochs <= config.num_epochs:
    raise errors.ConfigError(
        f'config.sweep_epochs={config.sweep_epochs} must be in '
        f'(0, config.num_epochs={config.num_epochs}].')
  for field in ('learning_rates', 'seeds', 'target_errors'):
    if not config[field]:
      raise errors.ConfigError(f'config.{field} is empty; give at least one '
                               'value.')


def train_seed(config: ml_collections.ConfigDict, seed: int,
               data: tuple[np.ndarray, np.ndarray], workdir: str
               ) -> tuple[dict[str, crossings.Curve], list[crossings.Curve]]:
  """Sweeps the learning rates of each activation; trains the fastest on.

  Args:
    config: the Figure 1 config.
    seed: seeds the initial weights and the data order.
    data: (images, labels) from `load_data`.
    workdir: TensorBoard runs go in `<workdir>/<activation>_lr<rate>`.

  Returns:
    ({activation: the chosen run's full curve}, every sweep curve).

  Raises:
    DivergedError: every learning rate of an activation diverged.
  """
  chosen, swept = {}, []
  for activation in ACTIVATIONS:
    net = Net.create(config, activation, seed, data[0][:config.batch_size])
    runs = [Run(config, net, lr, data, workdir)
            for lr in config.learning_rates]
    for run in runs:
      run.train_to(config.sweep_epochs)
      logging.info('seed %d, %s: mean training error %.4f over the sweep.',
                   seed, run.curve.name, run.curve.mean_error())
    # Copies: the chosen run's curve grows on.
    swept += [dataclasses.replace(run.curve, epochs=list(run.curve.epochs),
                                  errors=list(run.curve.errors))
              for run in runs]
    best_curve = crossings.fastest([run.curve for run in runs])
    best = next(run for run in runs if run.curve is best_curve)
    if best.curve.diverged:
      raise errors.DivergedError(
          f'Every learning rate in config.learning_rates='
          f'{tuple(config.learning_rates)} diverged with {activation} '
          f'(seed {seed}); try smaller ones.')
    best.train_to(config.num_epochs)
    chosen[activation] = best.curve
  return chosen, swept


def train_or_load_seed(
    config: ml_collections.ConfigDict, seed: int,
    data: tuple[np.ndarray, np.ndarray], workdir: str
) -> tuple[dict[str, crossings.Curve], list[crossings.Curve]]:
  """`train_seed`, or what a finished earlier run saved for this seed."""
  seed_dir = os.path.join(workdir, f'seed{seed}')
  saved = os.path.join(seed_dir, 'curves.json')
  if os.path.exists(saved):
    with open(saved) as f:
      curves = json.load(f)
    return ({a: crossings.Curve(**c) for a, c in curves['chosen'].items()},
            [crossings.Curve(**c) for c in curves['sweep']])
  chosen, swept = train_seed(config, seed, data, seed_dir)
  with open(saved, 'w') as f:
    json.dump({'chosen': {a: dataclasses.asdict(c) for a, c in chosen.items()},
               'sweep': [dataclasses.asdict(c) for c in swept]}, f)
  return chosen, swept


def draw(config: ml_collections.ConfigDict,
         chosen: Sequence[dict[str, crossings.Curve]]
         ) -> figure_lib.Figure:
  """Training error per epoch: one line per seed, one colour per activation."""
  lines = []
  for activation in ACTIVATIONS:
    colour, dashed = STYLES[activation]
    for i, seed in enumerate(chosen):
      curve = seed[activation]
      seeds = f'{len(chosen)} seed' + ('s' if len(chosen) > 1 else '')
      label = f'{NAMES[activation]} ({seeds})' if i == 0 else None
      lines.append(plots.Line(curve.epochs, curve.errors, colour, label,
                              dashed))
  return plots.line_chart(lines, x_label='Epochs',
                          y_label='Training error rate',
                          hlines=config.target_errors,
                          title='Figure 1 on Fashion-MNIST: ReLU vs tanh')


def run_figure1(config: ml_collections.ConfigDict,
                workdir: str) -> dict[str, Any]:
  """Trains every seed's nets; writes the figure, its data and TensorBoard.

  Args:
    config: the Figure 1 config (configs/figure1.py).
    workdir: output directory (created if missing).

  Returns:
    What `figure1.json` holds: the summary plus every curve.
  """
  data = load_data(config)
  validate_config(config, len(data[1]))
  chosen, swept = [], []
  for seed in config.seeds:
    os.makedirs(os.path.join(workdir, f'seed{seed}'), exist_ok=True)
    seed_chosen, seed_swept = train_or_load_seed(config, seed, data, workdir)
    chosen.append(seed_chosen)
    swept += seed_swept
    print(crossings.seed_line(config, seed_chosen), flush=True)
  result = crossings.summarize(config, chosen)
  result['curves'] = [{a: dataclasses.asdict(c) for a, c in seed.items()}
                      for seed in chosen]
  result['sweep'] = [dataclasses.asdict(c) for c in swept]
  with open(os.path.join(workdir, 'figure1.json'), 'w') as f:
    json.dump(result, f, indent=1)
  figure = draw(config, chosen)
  plots.save_png(figure, os.path.join(workdir, 'figure1.png'))
  writer = metric_writers.SummaryWriter(workdir)
  writer.write_images(0, {'figure1': plots.to_rgb(figure)[None]})
  writer.flush()
  print(crossings.report(config, len(data[1]), result))
  return result


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  try:
    backend.start()  # As main.py does: the backend and its CPU options.
    run_figure1(flags.FLAGS.config, flags.FLAGS.workdir)
  except errors.UserError as error:
    raise SystemExit(f'error: {error}') from None


if __name__ == '__main__':
  # Defined here, not on import, so that importing this module next to
  # main.py (which defines the same flags) cannot clash.
  config_flags.DEFINE_config_file(
      'config', None, 'configs/figure1.py', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Output directory.')
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)
