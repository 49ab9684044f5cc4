"""`--mode=import`: a weights file -> a step-0 checkpoint in a workdir.

The checkpoint is the one training itself would write at step 0, with the
file's parameters in place of the random ones: fresh optimizer state and
plateau schedule, and meta with the step, the seed and the shape signature
(`steps.shape_signature`), so that --mode=eval scores it and training (or
fine-tuning) starts from it with the same config.
"""

import contextlib
import dataclasses
import hashlib
import os

import jax
import ml_collections

from alexnet import checkpoints
from alexnet import errors
from alexnet import recipe
from alexnet import schedule as schedule_lib
from alexnet import steps
from alexnet.importers import caffe
from alexnet.importers import layout
from alexnet.importers import npy

# BVLC's bvlc_alexnet.caffemodel (its page in Caffe's model zoo):
# 57.1% top-1, 80.2% top-5 on ILSVRC-2012 val, centre crop.
PUBLISHED_SHA1 = '9116a64c0fbe4459d18f4bb6b56d647b63920377'
_READERS = {'.caffemodel': ('caffe', caffe.read_caffemodel),
            '.npy': ('npy', npy.read_npy)}


@dataclasses.dataclass(frozen=True)
class Imported:
  """What an import wrote.

  Attributes:
    sha1: hex SHA-1 of the weights file.
    published: whether it is BVLC's bvlc_alexnet.caffemodel.
    file_format: 'caffe' or 'npy'.
    num_classes: fc8's outputs.
    directory: the checkpoint directory written.
  """
  sha1: str
  published: bool
  file_format: str
  num_classes: int
  directory: str


@contextlib.contextmanager
def _reading(path: str):
  """Turns a file that cannot be read (permissions, a disk error) into one
  line naming it."""
  try:
    yield
  except OSError as error:
    raise errors.WeightsError(
        f'--weights={path}: cannot read it ({error.strerror or error}). '
        'Give a weights file you can read.') from None


def sha1_of(path: str) -> str:
  """Hex SHA-1 of a file, read in 16 MiB pieces."""
  digest = hashlib.sha1()
  with open(path, 'rb') as f:
    for piece in iter(lambda: f.read(1 << 24), b''):
      digest.update(piece)
  return digest.hexdigest()


def read_params(config: ml_collections.ConfigDict,
                path: str) -> tuple[dict, int, str]:
  """A weights file's parameters as the configured net's tower parameters.

  Args:
    config: the net to fit.
    path: a .caffemodel (either format) or a bvlc_alexnet.npy-style dict.

  Returns:
    (params with [2, ...] leaves, num_classes, file format).

  Raises:
    errors.WeightsError: an unknown suffix, an unreadable or unsafe file,
      or one that does not fit the net.
  """
  suffix = os.path.splitext(path)[1].lower()
  if suffix not in _READERS:
    raise errors.WeightsError(
        f'--weights={path}: use a .caffemodel (Caffe) or a .npy dict '
        '(the NumPy port of bvlc_alexnet).')
  if not os.path.isfile(path):
    raise errors.WeightsError(f'--weights={path}: no such file.')
  file_format, read = _READERS[suffix]
  with _reading(path):
    layers = read(path)
  params, num_classes = layout.tower_params(path, file_format, layers, config)
  return params, num_classes, file_format


def import_weights(config: ml_collections.ConfigDict, path: str,
                   workdir: str) -> Imported:
  """Writes the weights in `path` as the step-0 checkpoint of `workdir`.

  Args:
    config: the config the checkpoint will be evaluated or trained with.
    path: the weights file (see `read_params`).
    workdir: a workdir without checkpoints.

  Returns:
    What was written.

  Raises:
    errors.WeightsError: see `read_params`.
    errors.WorkdirError: the workdir already holds checkpoints.
  """
  params, num_classes, file_format = read_params(config, path)
  with _reading(path):
    digest = sha1_of(path)
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  store = checkpoints.Checkpoints(directory, keep=config.keep_checkpoints)
  try:
    if store.latest_step() is not None:
      raise errors.WorkdirError(
          f'{directory} already holds checkpoints (latest: step '
          f'{store.latest_step()}); import into a new --workdir.')
    state = {'params': params,
             'opt_state': steps.make_optimizer(config, 0.0).init(params),
             'plateau': schedule_lib.make_plateau(config).init(None)}
    meta = {'step': 0, 'seed': config.seed,
            'shape': steps.shape_signature(config, num_classes),
            'imported': {'file': os.path.abspath(path), 'sha1': digest},
            # No data stream led here: the first training run's is the one.
            recipe.KEY: recipe.NONE_YET}
    store.save(0, jax.device_get(state), meta)
    store.wait()
  finally:
    store.close()
  return Imported(digest, digest == PUBLISHED_SHA1, file_format, num_classes,
                  directory)
