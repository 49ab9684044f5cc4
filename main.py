"""Trains and evaluates the paper's AlexNet.

    python main.py --config=configs/alexnet.py:digits --workdir=runs/digits

Override any config field with --config.FIELD=VALUE. Running the same command
again resumes from the last checkpoint in --workdir; adding --mode=eval
evaluates a checkpoint there (--checkpoint=latest, best or a step) without
training; --mode=features --split=eval|train writes a checkpoint's fc7
features (features.py); --mode=prepare writes the pre-resized shards that
--config.use_shards=True then reads (no --workdir needed). Several processes (one per host) start through jax.distributed,
see alexnet/distributed.py; SIGTERM or SIGINT checkpoints and exits 0.
"""

import logging as python_logging

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags
import tensorflow as tf

from alexnet import distributed
from alexnet import errors
from alexnet.data import shards
import features
import train

FLAGS = flags.FLAGS

flags.DEFINE_string('workdir', None, 'Directory for checkpoints, TensorBoard '
                    'metrics and pictures; re-running resumes from it.')
config_flags.DEFINE_config_file(
    'config', None, 'A config file, e.g. configs/alexnet.py (the paper) or '
    'configs/alexnet.py:digits (offline).', lock_config=True)
flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'prepare', 'features'],
                  'train: train (or resume) and evaluate; eval: only '
                  'evaluate a checkpoint of --workdir, chosen by '
                  '--checkpoint; prepare: write the resize_size shards of '
                  'the splits the config reads (resumable); features: write '
                  'the fc7 features and labels of --split to '
                  '<workdir>/features/ (see features.py).')
flags.DEFINE_enum('split', 'eval', list(features.SPLITS),
                  'With --mode=features: the config split to read.')
flags.DEFINE_string('checkpoint', 'latest', "With --mode=eval|features: "
                    "'latest', 'best' (lowest validation error) or a step "
                    'number.')
flags.register_validator(
    'checkpoint', lambda value: value in ('latest', 'best') or value.isdigit(),
    message="--checkpoint must be 'latest', 'best' or a step number.")
flags.mark_flags_as_required(['config'])
flags.register_multi_flags_validator(
    ['mode', 'workdir'],
    lambda values: values['mode'] == 'prepare' or bool(values['workdir']),
    message='--workdir is required with --mode=train, eval or features.')

# Libraries that log every checkpoint write or dataset read at INFO; their
# warnings and errors still show.
_QUIET_LIBRARIES = ('/orbax/', '/tensorflow_datasets/')
# Orbax's warning for every checkpoint saved between evaluations, which has
# no validation error to be ranked by: expected, see alexnet/checkpoints.py.
_EXPECTED_WARNING = 'Requested `tracked_metric`; did not provide metrics.'


def _quiet_library_info(record: python_logging.LogRecord) -> bool:
  if record.getMessage() == _EXPECTED_WARNING:
    return False
  return record.levelno >= python_logging.WARNING or not any(
      part in record.pathname for part in _QUIET_LIBRARIES)


def _print_results(workdir: str, step: int,
                   results: dict[str, dict[str, float]]) -> None:
  print(f'Checkpoint of step {step} in {workdir}:')
  for split, metrics in results.items():
    for crop in ('centre', 'ten_crop'):
      if f'{crop}_loss' in metrics:
        print(f'  {split:8s} {crop:8s} top-1 error '
              f'{100 * metrics[f"{crop}_top1_error"]:6.2f}%  top-5 error '
              f'{100 * metrics[f"{crop}_top5_error"]:6.2f}%  loss '
              f'{metrics[f"{crop}_loss"]:.4f}')


def run(config: ml_collections.ConfigDict, workdir: str, mode: str = 'train',
        checkpoint: str = 'latest', split: str = 'eval') -> None:
  """Everything main() does once flags are parsed.

  Args:
    config: the experiment config.
    workdir: where the run lives.
    mode: 'train' (or resume), 'eval' to evaluate a checkpoint, 'features'
      to write fc7 features of a checkpoint, or
      'prepare' to write the pre-resized shards.
    checkpoint: with mode 'eval' or 'features': 'latest', 'best' or a step
      number.
    split: with mode 'features': 'eval', 'minival' or 'train'.

  Raises:
    SystemExit: 'error: ...' (exit status 1) for a config, dataset or
      workdir that cannot run, or a run that diverged, with no traceback.
  """
  try:
    # First, before anything touches a device: JAX's backend must start
    # knowing all processes.
    distributed.initialize(config)
    logging.info('JAX process %d of %d; local devices: %s',
                 jax.process_index(), jax.process_count(), jax.local_devices())
    if mode == 'prepare':
      logging.info('Shards are in %s.', shards.prepare(config))
    elif mode == 'features':
      step, paths = features.write(config, workdir, split, checkpoint)
      print(f'fc7 features of {split} from step {step}: {", ".join(paths)}')
    elif mode == 'eval':
      step, results = train.evaluate_checkpoint(config, workdir, checkpoint)
      if jax.process_index() == 0:
        _print_results(workdir, step, results)
    else:
      train.train_and_evaluate(config, workdir)
  except errors.UserError as error:
    raise SystemExit(f'error: {error}') from None


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().python_handler.addFilter(_quiet_library_info)
  # TensorFlow only feeds data: keep it off the accelerators JAX uses.
  tf.config.set_visible_devices([], 'GPU')
  run(FLAGS.config, FLAGS.workdir, FLAGS.mode, FLAGS.checkpoint, FLAGS.split)


if __name__ == '__main__':
  app.run(main)
