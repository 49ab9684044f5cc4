"""The settings that fix a run's data stream, checked when it resumes.

A checkpoint's step is also its position in the data: the input pipeline is
a deterministic function of the seed, the global batch size, the number of
data-parallel replicas (each reads its own slice of the training split),
the dataset, split, class subset and few-shot limit, and the image sizes.
Resuming with any of them changed would silently continue on another
stream, so a resume compares them with those the checkpoint was written with
(its meta['recipe']) and refuses a change in one line naming the fields and
how to go on on purpose.

Checkpoints written before the recipe was recorded carry none: they resume
with a warning that the recipe could not be checked. Refusing them would
strand every older workdir; they also predate the current data order, so
their run continues on a stream an uninterrupted run would not have seen.
"""

from typing import Any

import ml_collections

from alexnet import errors

# The checkpoint meta's key for the recipe.
KEY = 'recipe'


def recipe(config: ml_collections.ConfigDict,
           num_replicas: int) -> dict[str, Any]:
  """The run's settings that its data stream depends on.

  Args:
    config: the experiment config.
    num_replicas: data-parallel replicas over all processes (not the
      process layout, which the stream does not depend on).

  Returns:
    A JSON-serialisable dict, stored in every checkpoint's meta.
  """
  return {'seed': config.seed, 'batch_size': config.batch_size,
          'num_replicas': num_replicas, 'dataset': config.dataset,
          'train_split': config.train_split,
          'image_size': config.image_size,
          'resize_size': config.resize_size,
          # Lists, as JSON gives them back.
          'classes': list(config.classes),
          'train_examples_per_class': config.train_examples_per_class}


def check(meta: dict[str, Any], current: dict[str, Any], workdir: str,
          step: int) -> str | None:
  """Refuses to resume a checkpoint of another recipe.

  Args:
    meta: the checkpoint's meta.
    current: `recipe(...)` of the run that resumes.
    workdir: the run's workdir, for the message.
    step: the checkpoint's step, for the message.

  Returns:
    None, or a warning to log when the checkpoint records no recipe.

  Raises:
    errors.WorkdirError: a field differs; names each with its saved and new
      values, and the ways to continue.
  """
  saved = meta.get(KEY)
  if saved is None:
    return (f'The checkpoint of step {step} in {workdir} records no data '
            f'recipe ({", ".join(current)}): it predates the recipe check '
            'and the current data order (docs/REFERENCE.md, Data order), so '
            'the examples from here on differ from an uninterrupted run\'s. '
            'Resuming with this config.')
  changed = [f'{name} {saved.get(name)!r} -> {value!r}'
             for name, value in current.items() if saved.get(name) != value]
  if changed:
    raise errors.WorkdirError(
        f'{workdir} holds a checkpoint (step {step}) of another recipe: '
        f'{", ".join(changed)}. Resuming would continue on a different data '
        'stream. Keep the saved values to resume; or start a new run with '
        'another --workdir, from these weights if you mean to: '
        f'--config.init_from={workdir}.')
  return None
