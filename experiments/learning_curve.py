"""Top-1 error per epoch of one or more training runs, from TensorBoard.

Reads what `train.train_and_evaluate` wrote to each --workdirs run's event
files: the centre-crop top-1 error of every evaluation of the eval split
and, when the run had one, of the held-out minival split, and the training
error (1 - train/accuracy, over the images since the previous log line, so
on augmented crops with dropout on). Draws them against epochs into one PNG,
every run (e.g. every seed) a thin line of its split's colour, and prints the
evaluations as a table with the mean and spread over the runs.

    python -m experiments.learning_curve \
        --config=configs/alexnet.py:fashion_mnist \
        --workdirs=runs/fashion_mnist --out=runs/fashion_mnist/curve.png

--config (with the same --config.FIELD overrides as the runs) gives the
epoch length: the whole batches of its train_split.
"""

from collections.abc import Sequence

from absl import app
from absl import flags
import ml_collections
from ml_collections import config_flags
import numpy as np

from alexnet import errors
from alexnet import reporting
from experiments import plots
import input_pipeline

# (split, TensorBoard tag, colour): the curves, in drawing order.
CURVES = (('train', 'train/accuracy', 'tab:grey'),
          ('minival', 'minival/centre_top1_error', 'tab:orange'),
          ('eval', 'eval/centre_top1_error', 'tab:blue'))


def read_curves(workdir: str, steps_per_epoch: int
                ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{split: (epochs, top-1 error)} of one run; splits it never wrote are
  left out."""
  curves = {}
  for split, tag, _ in CURVES:
    values = reporting.logged_scalars(workdir, tag)
    if not values:
      continue
    steps = np.array(sorted(values))
    error = np.array([values[s] for s in steps])
    if split == 'train':
      error = 1 - error
    curves[split] = (steps / steps_per_epoch, error)
  return curves


def draw(runs: Sequence[dict[str, tuple[np.ndarray, np.ndarray]]],
         title: str):
  """The runs' curves, as percentages, one legend entry per split."""
  lines = []
  for split, _, colour in CURVES:
    for index, curves in enumerate(runs):
      if split in curves:
        epochs, error = curves[split]
        lines.append(plots.Line(epochs, 100 * error, colour,
                                label=None if index else split,
                                dashed=split == 'train'))
  return plots.line_chart(lines, x_label='epoch',
                          y_label='top-1 error, centre crop (%)',
                          title=title)


def table(runs: Sequence[dict[str, tuple[np.ndarray, np.ndarray]]]) -> str:
  """Each evaluation's error per run, and the mean +- std over runs."""
  rows = []
  for split in ('minival', 'eval'):
    columns = [curves[split] for curves in runs if split in curves]
    if not columns:
      continue
    rows.append(f'{split}: top-1 error (%) by epoch, one column per run')
    length = min(len(epochs) for epochs, _ in columns)
    for i in range(length):
      errors = np.array([100 * error[i] for _, error in columns])
      spread = (f'   mean {errors.mean():6.2f} +- {errors.std(ddof=1):.2f}'
                if len(errors) > 1 else '')
      rows.append(f'  epoch {columns[0][0][i]:5.2f}  '
                  + '  '.join(f'{e:6.2f}' for e in errors) + spread)
  return '\n'.join(rows)


def steps_per_epoch(config: ml_collections.ConfigDict) -> int:
  """Training's steps per epoch (whole batches of the train split), as one
  data-parallel replica counts them."""
  return input_pipeline.steps_per_epoch(
      config, input_pipeline.get_dataset_info(config), num_replicas=1)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = flags.FLAGS.config
  try:
    per_epoch = steps_per_epoch(config)
  except errors.UserError as error:
    raise SystemExit(f'error: {error}') from None
  runs = [read_curves(workdir, per_epoch) for workdir in flags.FLAGS.workdirs]
  if not all(runs):
    empty = [w for w, curves in zip(flags.FLAGS.workdirs, runs) if not curves]
    raise SystemExit(f'error: no TensorBoard scalars in {", ".join(empty)}.')
  print(table(runs))
  figure = draw(runs, f'{config.dataset}, {len(runs)} run(s)')
  plots.save_png(figure, flags.FLAGS.out)
  print(f'Wrote {flags.FLAGS.out}.')


if __name__ == '__main__':
  # Defined here, not on import, so that importing this module next to
  # main.py (which defines the same flags) cannot clash.
  config_flags.DEFINE_config_file(
      'config', None, 'The runs\' config, e.g. '
      'configs/alexnet.py:fashion_mnist, with their overrides.',
      lock_config=True)
  flags.DEFINE_list('workdirs', None, 'The runs, comma-separated.')
  flags.DEFINE_string('out', None, 'The PNG to write.')
  flags.mark_flags_as_required(['config', 'workdirs', 'out'])
  app.run(main)
