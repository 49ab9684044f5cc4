"""Training-error curves, where they cross target errors, and their table.

The Figure 1 experiment (`experiments/figure1.py`) records one `Curve` per
run; here are the pure functions that read curves: which learning rate was
fastest, the epoch at which each curve first reaches a target error, and
the ratios tanh / ReLU over seeds as a printed table.
"""

from collections.abc import Sequence
import dataclasses
import math
from typing import Any

import ml_collections
import numpy as np

ACTIVATIONS = ('relu', 'tanh')


@dataclasses.dataclass
class Curve:
  """Training error of one run, recorded at fractional epochs."""

  activation: str
  learning_rate: float
  seed: int
  epochs: list[float] = dataclasses.field(default_factory=list)
  errors: list[float] = dataclasses.field(default_factory=list)
  diverged: bool = False

  @property
  def name(self) -> str:
    return f'{self.activation}_lr{self.learning_rate:g}'

  def mean_error(self) -> float:
    """Mean recorded error; infinite once diverged (never the fastest)."""
    return math.inf if self.diverged else float(np.mean(self.errors))


def epochs_to_reach(curve: Curve, target: float) -> float | None:
  """The first recorded epoch at which training error is <= target.

  Args:
    curve: a recorded curve.
    target: training error rate, e.g. 0.25.

  Returns:
    The epoch, or None if the curve never gets there.
  """
  for epoch, error in zip(curve.epochs, curve.errors):
    if error <= target:
      return epoch
  return None


def fastest(curves: Sequence[Curve]) -> Curve:
  """The curve with the lowest mean training error (the fastest learner)."""
  return min(curves, key=lambda c: (c.mean_error(), c.learning_rate))


def spread(values: Sequence[float]) -> dict[str, float | int | None]:
  """Mean, sample standard deviation (0 for one value) and count."""
  if not values:
    return {'mean': None, 'std': None, 'n': 0}
  values = np.asarray(values, np.float64)
  std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
  return {'mean': float(values.mean()), 'std': std, 'n': len(values)}


def summarize(config: ml_collections.ConfigDict,
              chosen: Sequence[dict[str, Curve]]) -> dict[str, Any]:
  """Crossing epochs of each target error, and their ratio tanh / ReLU.

  Args:
    config: uses target_errors.
    chosen: per seed, {activation: curve} from `train_seed`.

  Returns:
    {'seeds', 'learning_rates': {activation: [lr per seed]}, 'targets':
    [{'error', 'epochs': {activation: [epoch or None per seed]}, 'ratios':
    [tanh / relu or None per seed], 'ratio': spread of the ratios that
    exist}]}.
  """
  targets = []
  for target in config.target_errors:
    epochs = {a: [epochs_to_reach(seed[a], target) for seed in chosen]
              for a in ACTIVATIONS}
    ratios = [tanh / relu if None not in (relu, tanh) else None
              for relu, tanh in zip(epochs['relu'], epochs['tanh'])]
    targets.append({'error': target, 'epochs': epochs, 'ratios': ratios,
                    'ratio': spread([r for r in ratios if r is not None])})
  return {'seeds': [seed['relu'].seed for seed in chosen],
          'learning_rates': {a: [seed[a].learning_rate for seed in chosen]
                             for a in ACTIVATIONS},
          'targets': targets}


def format_epochs(values: Sequence[float | None], missing: str) -> str:
  """'1.00, 2.50' with `missing` in place of None."""
  return ', '.join(missing if v is None else f'{v:.2f}' for v in values)


def seed_line(config: ml_collections.ConfigDict,
              chosen: dict[str, Curve]) -> str:
  """One seed's chosen learning rates and crossing epochs, on one line.

  Args:
    config: uses target_errors.
    chosen: {activation: curve} of one seed.

  Returns:
    e.g. 'seed 0: relu lr 0.01, 25% at 0.92, 10% at -; tanh lr ...'.
  """
  seed = next(iter(chosen.values())).seed
  return f'seed {seed}: ' + '; '.join(
      f'{a} lr {c.learning_rate:g}, ' + ', '.join(
          f'{t:.0%} at {format_epochs([epochs_to_reach(c, t)], "-")}'
          for t in config.target_errors)
      for a, c in chosen.items())


def report(config: ml_collections.ConfigDict, num_train: int,
           summary: dict[str, Any]) -> str:
  """The printed result: the setting, learning rates and a Markdown table.

  Args:
    config: the Figure 1 config.
    num_train: number of training images used.
    summary: from `summarize`.

  Returns:
    Lines of text.
  """
  seeds = summary['seeds']
  lines = [f'Fashion-MNIST training set, {num_train} images, batch '
           f'{config.batch_size}, {config.num_epochs} epochs, seeds '
           f'{", ".join(map(str, seeds))}, no regularisation; training '
           'error = running minibatch error.']
  for activation, rates in summary['learning_rates'].items():
    lines.append(f'{activation}: learning rates {", ".join(map(str, rates))}'
                 f' (fastest of {tuple(config.learning_rates)} over '
                 f'{config.sweep_epochs} epoch(s), per seed)')
  lines += ['', '| training error | ReLU epochs (per seed) | tanh epochs (per '
            'seed) | tanh / ReLU (per seed) | tanh / ReLU, mean ± std |',
            '|---|---|---|---|---|']
  never = f'>{config.num_epochs:g}'
  for target in summary['targets']:
    ratio = target['ratio']
    overall = ('n/a' if ratio['n'] == 0 else
               f'**{ratio["mean"]:.2f} ± {ratio["std"]:.2f}** '
               f'({ratio["n"]} of {len(seeds)} seeds)')
    lines.append(
        f'| {target["error"]:.0%} '
        f'| {format_epochs(target["epochs"]["relu"], never)} '
        f'| {format_epochs(target["epochs"]["tanh"], never)} | '
        f'{format_epochs(target["ratios"], "n/a")} | {overall} |')
  return '\n'.join(lines)
