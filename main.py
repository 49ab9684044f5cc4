"""Trains and evaluates the paper's AlexNet.

    python main.py --config=configs/alexnet.py:digits --workdir=runs/digits

Override any config field with --config.FIELD=VALUE. Running the same command
again resumes from the last checkpoint in --workdir; adding --mode=eval
evaluates a checkpoint there (--checkpoint=latest, best or a step) without
training; --mode=features --split=eval|train writes a checkpoint's fc7
features (features.py); --mode=prepare writes the pre-resized shards that
--config.use_shards=True then reads (no --workdir needed); --mode=import
--weights=FILE writes published weights (bvlc_alexnet.caffemodel or its
.npy port, with --config=configs/alexnet.py:caffe) as the step-0
checkpoint of --workdir; --mode=compile --topology=v5e:2x2 (a TPU slice)
or --topology=h100:8 (a GPU host) compiles the train and eval steps for
those devices, with none here (alexnet/compile_only.py), and prints their
per-device memory and roofline. Several processes (one per host)
start through jax.distributed, see alexnet/distributed.py; SIGTERM or SIGINT
checkpoints and exits 0.
"""

import difflib
import logging as python_logging
import re

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags
import tensorflow as tf

from alexnet import backend
from alexnet import compile_only
from alexnet import distributed
from alexnet import errors
from alexnet import gpu
from alexnet import roofline
from alexnet import tpu
from alexnet import workdir as workdir_lib
from alexnet.data import shards
from alexnet.importers import checkpoint as importer
import features
import train

FLAGS = flags.FLAGS

flags.DEFINE_string('workdir', None, 'Directory for checkpoints, TensorBoard '
                    'metrics and pictures; re-running resumes from it.')
config_flags.DEFINE_config_file(
    'config', None, 'A config file, e.g. configs/alexnet.py (the paper) or '
    'configs/alexnet.py:digits (offline).', lock_config=True)
flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'features', 'prepare',
                                    'import', 'compile'],
                  'train: train (or resume) and evaluate; eval: only '
                  'evaluate a checkpoint of --workdir, chosen by '
                  '--checkpoint; features: write the fc7 features and labels '
                  'of --split to <workdir>/features/ (see features.py); '
                  'prepare: write the resize_size shards of the splits the '
                  'config reads (resumable); import: write --weights as the '
                  'step-0 checkpoint of --workdir; compile: compile the '
                  'steps for --topology (needs libtpu or the CUDA plugin, no '
                  'TPU or GPU).')
flags.DEFINE_enum('split', 'eval', list(features.SPLITS),
                  'With --mode=features: the config split to read.')
flags.DEFINE_string('weights', None, 'With --mode=import: a .caffemodel '
                    '(bvlc_alexnet, either Caffe format) or a .npy dict '
                    '(its NumPy port).')
flags.DEFINE_string('topology', None, 'With --mode=compile: a TPU slice, '
                    'GENERATION:AxB[xC], e.g. v5e:2x2, v4:2x2x1, or GPUs of '
                    'one host, GPU:COUNT, e.g. h100:8, a100:8, a100-40gb:8.')
flags.DEFINE_string('checkpoint', 'latest', "With --mode=eval|features: "
                    "'latest', 'best' (lowest validation error) or a step "
                    'number.')
flags.register_validator(
    'checkpoint', lambda value: value in ('latest', 'best') or value.isdigit(),
    message="--checkpoint must be 'latest', 'best' or a step number.")
flags.mark_flags_as_required(['config'])
flags.register_multi_flags_validator(
    ['mode', 'workdir'],
    lambda values: (values['mode'] in ('prepare', 'compile')
                    or bool(values['workdir'])),
    message='--workdir is required with --mode=train, eval, features or '
    'import.')
flags.register_multi_flags_validator(
    ['mode', 'weights'],
    lambda values: (values['mode'] == 'import') == bool(values['weights']),
    message='--weights goes with --mode=import, and --mode=import needs it.')
flags.register_multi_flags_validator(
    ['mode', 'topology'],
    lambda values: values['mode'] != 'compile' or bool(values['topology']),
    message='--mode=compile needs --topology, e.g. --topology=v5e:2x2.')

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


def _import(config: ml_collections.ConfigDict, weights: str,
            workdir: str) -> None:
  imported = importer.import_weights(config, weights, workdir)
  if jax.process_index():
    return
  print(f'{weights}: sha1 {imported.sha1}')
  if imported.published:
    print('  the published bvlc_alexnet.caffemodel (57.1% top-1, 80.2% '
          'top-5 on ILSVRC-2012 val, centre crop)')
  else:
    print('  not the published bvlc_alexnet.caffemodel (sha1 '
          f'{importer.PUBLISHED_SHA1})')
  print(f'Imported {imported.num_classes} classes ({imported.file_format} '
        f'layout) as the step-0 checkpoint in {imported.directory}.')


def _compile_target(topology: str) -> compile_only.Target:
  """The devices --topology names: a TPU slice or a GPU host."""
  kind = topology.partition(':')[0]
  if kind in gpu.GPUS:
    return gpu.target(topology)
  if kind in roofline.CHIPS:
    return tpu.target(topology)
  raise compile_only.TopologyError(
      f'--topology={topology!r} names no TPU or GPU this code knows: give a '
      f'TPU slice, GENERATION:AxB[xC] with GENERATION one of '
      f'{list(roofline.CHIPS)} (e.g. v5e:2x2), or GPUs of one host, '
      f'GPU:COUNT with GPU one of {list(gpu.GPUS)} (e.g. h100:8).')


def run(config: ml_collections.ConfigDict, workdir: str, mode: str = 'train',
        *, checkpoint: str = 'latest', split: str = 'eval',
        weights: str | None = None, topology: str | None = None) -> None:
  """Everything main() does once flags are parsed.

  Args:
    config: the experiment config.
    workdir: where the run lives.
    mode: 'train' (or resume), 'eval' to evaluate a checkpoint, 'features'
      to write the fc7 features of a checkpoint, 'prepare' to write the
      pre-resized shards, 'import' to write `weights` as a step-0
      checkpoint, or 'compile' to compile the steps for `topology`.
    checkpoint: with mode 'eval' or 'features': 'latest', 'best' or a step
      number.
    split: with mode 'features': 'eval', 'minival' or 'train'.
    weights: with mode 'import': the weights file.
    topology: with mode 'compile': a TPU slice or GPU host, e.g. 'v5e:2x2'
      or 'h100:8'.

  Raises:
    SystemExit: 'error: ...' (exit status 1) for a config, dataset or
      workdir that cannot run, or a run that diverged, with no traceback.
  """
  try:
    # Before anything touches a device: the backend JAX starts on.
    backend.start(need_gpus=mode != 'compile')
    if mode == 'compile':  # One process, compile-only devices: no cluster.
      report = compile_only.compile_steps(config, _compile_target(topology))
      print('\n'.join(report.lines()))
      return
    if mode != 'prepare':
      workdir_lib.check_path(workdir)
    # Also before: JAX's backend must start knowing all processes.
    distributed.initialize(config)
    backend.check_started()
    logging.info('JAX process %d of %d; local devices: %s',
                 jax.process_index(), jax.process_count(),
                 backend.describe_devices(jax.local_devices()))
    if mode == 'prepare':
      logging.info('Shards are in %s.', shards.prepare(config))
    elif mode == 'import':
      _import(config, weights, workdir)
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


# A --config.FIELD override (or --noconfig.FIELD for a boolean).
_OVERRIDE = re.compile(r'--?(?:no)?config\.([^=]+)')


def _unknown_field(argv: list[str]) -> str | None:
  """The first --config.FIELD of `argv` the config lacks, with close names."""
  given = [arg.split('=', 1)[1] for arg in argv
           if re.match(r'--?config=', arg)]
  if not given:
    return None
  config = FLAGS['config'].parser.parse(given[-1])  # With no overrides.
  for match in filter(None, map(_OVERRIDE.match, argv)):
    path, node = match[1].split('.'), config
    for depth, name in enumerate(path):
      fields = list(node) if isinstance(node, ml_collections.ConfigDict) else []
      if name not in fields:
        where = '.'.join(['config'] + path[:depth])
        close = [f'--{where}.{field}'
                 for field in difflib.get_close_matches(name, fields)]
        return (f'--config.{match[1]}: {where} has no field {name!r}'
                + (f'; did you mean {" or ".join(close)}?' if close else '.'))
      node = node[name]
  return None


def _flag_error(argv: list[str], error: Exception) -> str:
  """One line for an error raised while parsing the flags."""
  try:
    unknown = _unknown_field(argv)
  except Exception:  # pylint: disable=broad-exception-caught
    unknown = None  # The config file itself fails: `error` says how.
  if unknown:
    return unknown
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  if isinstance(error, flags.Error) and 'Traceback' not in str(error):
    return f'{lines[0]} (--helpshort lists the flags).'
  # The config file failed to load; ml_collections reports it with a
  # traceback, whose last line says what went wrong.
  last = lines[-1] if lines else ''
  if not re.match(r'\w+(Error|Exception)\b', last):
    last = f'{type(error).__name__}: {last}'
  return f'--config: cannot load the config file ({last}).'


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, where every refusal is one `error:` line.

  Passed to `app.run`: a misspelt --config.FIELD, a bad value or a config
  file that cannot load would otherwise end in a traceback (the overrides
  are applied while the flags are parsed, before `main` runs).

  Args:
    argv: the command line.

  Returns:
    The arguments that are not flags.

  Raises:
    SystemExit: 'error: ...' (exit status 1).
  """
  try:
    remaining = FLAGS(argv)
    # A config file that failed to load raises only when first used.
    FLAGS.config.keys()
  except Exception as error:  # pylint: disable=broad-exception-caught
    raise SystemExit(f'error: {_flag_error(argv, error)}') from None
  return remaining


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise SystemExit(f'error: unexpected arguments {argv[1:]}: give every '
                     'setting as a flag, e.g. --config.batch_size=128.')
  logging.get_absl_handler().python_handler.addFilter(_quiet_library_info)
  # TensorFlow only feeds data: keep it off the accelerators JAX uses.
  tf.config.set_visible_devices([], 'GPU')
  run(FLAGS.config, FLAGS.workdir, FLAGS.mode, checkpoint=FLAGS.checkpoint,
      split=FLAGS.split, weights=FLAGS.weights, topology=FLAGS.topology)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
