"""fc7 features of a split from a saved checkpoint (main.py --mode=features).

    python main.py --config=configs/alexnet.py:fashion_mnist \
        --workdir=runs/fashion_mnist --mode=features --split=eval

writes `<workdir>/features/<split>_fc7.npy` (float32 [N, 4096] at width 1:
both towers' fc7 units after the ReLU, tower 0 first) and
`<split>_labels.npy` (int32 [N]), row i being example i of the split in its
order (config.eval_split, config.minival_split or config.train_split, with
config.classes and config.train_examples_per_class applied). Images are
centre-cropped as in evaluation, on one device. The computation is
`alexnet/features.py`; experiments/figure4.py draws the paper's Figure 4
from it.
"""

import dataclasses
import functools
import os
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from alexnet import checkpoints
from alexnet import features as features_lib
from alexnet import steps
import input_pipeline

PyTree = Any
SPLITS = ('eval', 'minival', 'train')


@dataclasses.dataclass(frozen=True)
class Features:
  """One split's fc7 features, with the labels and logits of its examples."""
  step: int
  fc7: np.ndarray
  labels: np.ndarray
  logits: np.ndarray


def restore_params(config: ml_collections.ConfigDict, workdir: str,
                   checkpoint: str = 'latest') -> tuple[int, PyTree]:
  """(step, parameters) of a saved checkpoint; reads the workdir only.

  Raises:
    errors.UserError: no such checkpoint, or a config that does not fit.
  """
  num_classes = input_pipeline.get_dataset_info(config).num_classes
  model = steps.create_model(config, num_classes)
  store = checkpoints.Checkpoints(
      os.path.join(os.path.abspath(workdir), 'checkpoints'),
      keep=config.keep_checkpoints, read_only=True)
  try:
    step = store.find(checkpoint)
    like = jax.eval_shape(functools.partial(steps.initial_tree, config,
                                            model))
    tree, _ = store.restore(
        like, steps.shape_signature(config, num_classes), step)
  finally:
    store.close()
  return step, tree['params']


def _squares(config: ml_collections.ConfigDict,
             split: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(uint8 squares, labels) of a split in order, padding dropped."""
  batches = input_pipeline.create_eval_iterable(config, split, replicas=[0],
                                                num_replicas=1)
  for batch in batches:
    mask = batch['mask'][0]
    yield batch['image'][0][mask], batch['label'][0][mask]


def extract(config: ml_collections.ConfigDict, workdir: str, split: str,
            checkpoint: str = 'latest', limit: int = 0) -> Features:
  """fc7 features, labels and logits of every example of a split.

  Args:
    config: the config the checkpoint was trained with.
    workdir: the run's workdir.
    split: 'eval', 'minival' or 'train' (the config's splits).
    checkpoint: 'latest', 'best' or a step number.
    limit: stop after this many examples (whole batches); 0: all.

  Returns:
    The split's `Features`, in the split's order.
  """
  step, params = restore_params(config, workdir, checkpoint)
  num_classes = input_pipeline.get_dataset_info(config).num_classes
  extractor = features_lib.make_extractor(
      steps.create_model(config, num_classes),
      input_pipeline.mean_image(config), config.image_size)
  fc7, labels, logits = [], [], []
  for squares, batch_labels in _squares(config, split):
    batch_fc7, batch_logits = jax.device_get(extractor(params, squares))
    fc7.append(batch_fc7)
    logits.append(batch_logits)
    labels.append(batch_labels)
    if limit and sum(map(len, labels)) >= limit:
      break
  return Features(step, np.concatenate(fc7), np.concatenate(labels),
                  np.concatenate(logits))


def images_at(config: ml_collections.ConfigDict, split: str,
              indices: Sequence[int]) -> np.ndarray:
  """The uint8 resized squares of some examples of a split, in that order."""
  wanted = {int(i): None for i in indices}
  start = 0
  for squares, _ in _squares(config, split):
    for i in range(start, start + len(squares)):
      if i in wanted:
        wanted[i] = squares[i - start]
    start += len(squares)
    if all(image is not None for image in wanted.values()):
      break
  return np.stack([wanted[int(i)] for i in indices])


def write(config: ml_collections.ConfigDict, workdir: str, split: str,
          checkpoint: str = 'latest') -> tuple[int, list[str]]:
  """Writes a split's fc7 features and labels as .npy in the workdir.

  Returns:
    (the checkpoint's step, the two paths written).
  """
  found = extract(config, workdir, split, checkpoint)
  directory = os.path.join(workdir, 'features')
  os.makedirs(directory, exist_ok=True)
  paths = [os.path.join(directory, f'{split}_{name}.npy')
           for name in ('fc7', 'labels')]
  np.save(paths[0], found.fc7)
  np.save(paths[1], found.labels.astype(np.int32))
  return found.step, paths
