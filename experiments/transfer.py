"""Transfer on Fashion-MNIST: fine-tuning against training from scratch.

Pretrains once on the full training set of classes 0-4 (30,000 images),
then, for each seed, trains on a few-shot set of classes 5-9 (the first
--per_class training images of each class in the files' order: the same
images for every seed) twice: fine-tuned from the pretrained net (fc8
re-initialised; Caffe's recipe: a tenth of the base rate, fc8's times 10)
and from scratch (the base rate), with the same steps and drops. Prints the
centre-crop top-1 accuracy on the 5,000 test images of classes 5-9, mean and
standard deviation over seeds.

    python -m experiments.transfer --workdir=runs/transfer

Runs live in <workdir>/pretrain and <workdir>/{finetune,scratch}/seed<k>.
A finished run holds result.json and is skipped; an interrupted one resumes
from its checkpoints, so the study can be run in several sittings (e.g. one
--seeds at a time, or two processes with disjoint --seeds once the
pretraining is done) and the table re-printed for free.

Measured (docs/results.md, Transfer): fine-tuned 76.1 +- 5.1% against
40.9 +- 1.4% from scratch (3 seeds, chance 20%). Cost on the 2-core
development CPU, shared with other jobs: the pretraining about 35 minutes,
each of the six other runs 15-25 minutes.
"""

import argparse
import json
import os

import ml_collections
import numpy as np
import tensorflow as tf

from alexnet import reporting
from configs import alexnet as alexnet_configs
import train

PRETRAIN_CLASSES = (0, 1, 2, 3, 4)
TRANSFER_CLASSES = (5, 6, 7, 8, 9)
METRIC = 'eval/centre_top1_error'


def fashion_mnist_config() -> ml_collections.ConfigDict:
  """The fashion_mnist variant with the settings this study was measured
  with: the whole training split, no held-out slice, batch 64 at rate
  0.01, the plateau rule with patience 1 (the variant's recipe has moved
  on since)."""
  config = alexnet_configs.get_config('fashion_mnist')
  config.update(dict(train_split='train', minival_split='',
                     plateau_split='eval', batch_size=64,
                     learning_rate=0.01, lr_drop_epochs=()))
  config.plateau.patience = 1
  return config


def pretrain_config(epochs: float) -> ml_collections.ConfigDict:
  """Fashion-MNIST classes 0-4, the whole training set, constant rate."""
  config = fashion_mnist_config()
  config.classes = PRETRAIN_CLASSES
  config.num_epochs = epochs
  return config


def transfer_config(args: argparse.Namespace, seed: int,
                    init_from: str) -> ml_collections.ConfigDict:
  """Classes 5-9, --per_class images each; fine-tuned if `init_from`."""
  config = fashion_mnist_config()
  config.classes = TRANSFER_CLASSES
  config.train_examples_per_class = args.per_class
  config.num_epochs = args.epochs
  # One evaluation, at the end: the compared runs share one fixed schedule.
  config.eval_every_epochs = args.epochs
  config.lr_drop_epochs = tuple(args.lr_drop_epochs)
  config.learning_rate = args.learning_rate
  config.seed = seed
  if init_from:
    config.learning_rate = args.finetune_learning_rate
    config.init_from = init_from
    config.reinit = ('fc8',)
    config.reinit_lr_multiplier = args.fc8_multiplier
  return config


def final_scalar(workdir: str, tag: str = METRIC) -> tuple[int, float]:
  """(step, value) of a scalar's last logged value in a workdir's events."""
  values = reporting.logged_scalars(workdir, tag)
  if not values:
    raise SystemExit(f'No {tag!r} logged in {workdir}.')
  step = max(values)
  return step, values[step]


def run(config: ml_collections.ConfigDict, workdir: str) -> float:
  """Trains (or resumes) a run unless finished; its test top-1 accuracy."""
  done = os.path.join(workdir, 'result.json')
  if not os.path.exists(done):
    print(f'Training {workdir} ...', flush=True)
    state = train.train_and_evaluate(config, workdir)
    planned = train.planned_steps(config)
    if state.step < planned:
      raise SystemExit(f'{workdir} stopped at step {state.step} of '
                       f'{planned}; run the same command to resume.')
    step, error = final_scalar(workdir)
    with open(done, 'w') as f:
      json.dump({'step': step, 'accuracy': 1.0 - error}, f)
  with open(done) as f:
    return json.load(f)['accuracy']


def _row(name: str, accuracies: list[float]) -> str:
  values = 100 * np.asarray(accuracies)
  spread = values.std(ddof=1) if len(values) > 1 else 0.0
  runs = ', '.join(f'{v:.2f}' for v in values)
  return f'| {name} | {values.mean():.2f} ± {spread:.2f} | {runs} |'


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', default='runs/transfer')
  parser.add_argument('--seeds', default='0,1,2', help='comma-separated')
  parser.add_argument('--pretrain_epochs', type=float, default=1.0)
  parser.add_argument('--per_class', type=int, default=100)
  parser.add_argument('--epochs', type=float, default=15.0)
  # From scratch: the Fashion-MNIST config's rate. Fine-tuning: Caffe's
  # recipe, a tenth of it for the pretrained layers and the full rate
  # (x --fc8_multiplier) for the new fc8.
  parser.add_argument('--learning_rate', type=float, default=0.01)
  parser.add_argument('--finetune_learning_rate', type=float, default=0.001)
  parser.add_argument('--lr_drop_epochs', type=float, nargs='*',
                      default=[12.0])
  parser.add_argument('--fc8_multiplier', type=float, default=10.0)
  args = parser.parse_args()
  # TensorFlow only feeds data: keep it off the accelerators JAX uses.
  tf.config.set_visible_devices([], 'GPU')
  pretrained = os.path.join(args.workdir, 'pretrain')
  pretrain = run(pretrain_config(args.pretrain_epochs), pretrained)
  results = {'finetune': [], 'scratch': []}
  for seed in [int(s) for s in args.seeds.split(',')]:
    for name, init_from in (('finetune', pretrained), ('scratch', '')):
      results[name].append(run(
          transfer_config(args, seed, init_from),
          os.path.join(args.workdir, name, f'seed{seed}')))
  print(f'Pretrained on classes 0-4: {100 * pretrain:.2f}% test accuracy '
        'on their 5,000 test images.')
  print(f'Classes 5-9, {args.per_class} training images each, '
        f'{args.epochs:g} epochs; test accuracy (%) on their 5,000 test '
        'images, mean ± std over seeds:')
  print('| start | mean ± std | per seed |\n|---|---|---|')
  for name, accuracies in results.items():
    print(_row(name, accuracies))


if __name__ == '__main__':
  main()
