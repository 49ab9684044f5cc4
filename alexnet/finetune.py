"""Fine-tuning: a new run whose parameters start from another run's.

`config.init_from` names a checkpoint: a workdir (its latest checkpoint), a
workdir's checkpoints/ folder, or one step of it, e.g.
`runs/pretrain/checkpoints/1200`. An imported model (`--mode=import`) is a
workdir with a step-0 checkpoint, so it is named the same way.

Only the parameters are taken. The step starts at 0 and the optimizer state
(the momentum) and the learning-rate schedule start fresh, as in Caffe's
fine-tuning. Layers listed in `config.reinit` keep their fresh
initialisation (e.g. fc8 for a new class count); every other layer must have
the checkpoint's shapes. `config.reinit_lr_multiplier` scales their learning
rate inside the optimizer (`steps.make_optimizer`).

The training loop calls `initial_state` only when its own workdir holds no
checkpoint: a fine-tuning run resumes from its own checkpoints, never
re-reading `init_from`.
"""

import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from alexnet import checkpoints
from alexnet import model as model_lib
from alexnet import steps
from alexnet.errors import ConfigError

PyTree = Any
CHECKPOINTS = 'checkpoints'
# The net's layers, the names config.reinit chooses from.
LAYERS = (*model_lib.TOWER_CHANNELS, 'fc8')


def validate(config: ml_collections.ConfigDict) -> None:
  """Refuses fine-tuning fields that cannot apply (checked before any work).

  Args:
    config: uses init_from, reinit and reinit_lr_multiplier.

  Raises:
    ConfigError: naming the field and the fix.
  """
  reinit = tuple(config.reinit)
  unknown = [name for name in reinit if name not in LAYERS]
  if unknown:
    raise ConfigError(f'config.reinit names {unknown}, not layers of this '
                      f'model; choose among {list(LAYERS)}.')
  if reinit and not config.init_from:
    raise ConfigError(f'config.reinit={reinit} re-initialises layers of a '
                      'checkpoint: set config.init_from, or config.reinit=().')
  if config.reinit_lr_multiplier <= 0:
    raise ConfigError(f'config.reinit_lr_multiplier='
                      f'{config.reinit_lr_multiplier} must be positive.')
  if config.reinit_lr_multiplier != 1.0 and not reinit:
    raise ConfigError('config.reinit_lr_multiplier applies to the layers of '
                      "config.reinit, which is empty: e.g. "
                      "--config.reinit=\"('fc8',)\".")


def locate(path: str) -> tuple[str, str]:
  """(checkpoints folder, 'latest' or a step) named by `path`.

  Args:
    path: a workdir, its checkpoints/ folder, or checkpoints/<step>.

  Raises:
    ConfigError: `path` is none of these.
  """
  path = os.path.abspath(path)
  name, parent = os.path.basename(path), os.path.dirname(path)
  if name.isdigit() and os.path.basename(parent) == CHECKPOINTS:
    return parent, name
  if name == CHECKPOINTS and os.path.isdir(path):
    return path, 'latest'
  if os.path.isdir(os.path.join(path, CHECKPOINTS)):
    return os.path.join(path, CHECKPOINTS), 'latest'
  raise ConfigError(
      f'config.init_from={path!r} is not a run: give a workdir holding '
      f'{CHECKPOINTS}/ (e.g. one trained or made by --mode=import), its '
      f'{CHECKPOINTS}/ folder, or one step, e.g. <workdir>/{CHECKPOINTS}/'
      '1200.')


def read_params(path: str) -> tuple[PyTree, int]:
  """The parameters (host numpy) and step of the checkpoint `path` names.

  Raises:
    ConfigError: `path` names no run.
    WorkdirError: no such checkpoint (the message lists the steps there).
  """
  directory, which = locate(path)
  store = checkpoints.Checkpoints(directory, keep=1, read_only=True)
  try:
    step = store.find(which)
  finally:
    store.close()
  # Restored as saved (no target): the source's shapes are not this run's.
  with ocp.StandardCheckpointer() as reader:
    state = reader.restore(os.path.join(directory, str(step), 'state'))
  return jax.tree.map(np.asarray, state['params']), step


def _shapes(tree: PyTree) -> str:
  """'bias (2, 5), kernel (2, 512, 5)': a layer's leaves and shapes."""
  return ', '.join(
      f'{jax.tree_util.keystr(path, simple=True, separator="/")} '
      f'{tuple(np.shape(leaf))}'
      for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0])


def merge(fresh: PyTree, source: PyTree, reinit: tuple[str, ...],
          where: str) -> PyTree:
  """`fresh` with every layer but those of `reinit` taken from `source`.

  Args:
    fresh: this run's initial parameters, {layer: {'kernel', 'bias'}}.
    source: the checkpoint's parameters.
    reinit: layers that keep their fresh values.
    where: the checkpoint, for messages.

  Returns:
    The merged parameters (this run's dtypes).

  Raises:
    ConfigError: a copied layer missing from the checkpoint or of other
      shapes, naming the layer, both shapes and the fix.
  """
  merged = {}
  for layer, values in fresh.items():
    if layer in reinit:
      merged[layer] = values
      continue
    ours = _shapes(values)
    theirs = _shapes(source[layer]) if layer in source else 'absent'
    if ours != theirs:
      raise ConfigError(
          f'config.init_from: layer {layer!r} is [{theirs}] in {where} '
          f'but [{ours}] in this model. Re-initialise it with --config.reinit='
          f"\"{tuple(reinit) + (layer,)}\" (e.g. a new class count), or use "
          'the checkpoint\'s model settings (width, towers, image_size, '
          'pooling).')
    merged[layer] = jax.tree.map(
        lambda new, old: np.asarray(old, np.asarray(new).dtype), values,
        source[layer])
  return merged


def initial_state(config: ml_collections.ConfigDict,
                  model: model_lib.AlexNet) -> steps.TrainState:
  """The step-0 state of a fine-tuning run (config.init_from set).

  Args:
    config: the new run's config.
    model: its net, both towers local.

  Returns:
    A fresh state (step 0, zero momentum, fresh schedule) whose parameters
    are the checkpoint's, except the layers of config.reinit.

  Raises:
    UserError: see `validate`, `read_params` and `merge`.
  """
  validate(config)
  state = steps.create_train_state(config, model)
  source, step = read_params(config.init_from)
  where = f'{config.init_from} (step {step})'
  params = merge(state.params, source, tuple(config.reinit), where)
  return state.replace(params=params)
