"""The settings that fix a run's data stream, checked when it resumes.

A checkpoint's step is also its position in the data: the input pipeline is
a deterministic function of the seed, the global batch size, the number of
data-parallel replicas (each reads its own slice of the training split),
the dataset, split, class subset and few-shot limit, and the image sizes.
Resuming with any of them changed would silently continue on another
stream, so a resume compares them with those the checkpoint was written with
(its meta['recipe']) and refuses a change in one line naming the fields and
how to go on on purpose. What is compared is what sets the stream, not the
text of a field: the examples a train_split selects ('train[:90%]' is
'train[0%:90%]'), and the shuffle window config.shuffle_buffer gives each
replica (alexnet/data/epochs.py), which with the seed sets every epoch's
order; a buffer at or past the slice's size gives the same window as any
other such buffer.

A checkpoint written by --mode=import records an empty recipe: its
weights come from no data stream, and the first training run continues
from it with its own recipe, silently.

Checkpoints written before the recipe was recorded carry none: they resume
with a warning that the recipe could not be checked. Refusing them would
strand every older workdir; they also predate the current data order, so
their run continues on a stream an uninterrupted run would not have seen.
"""

from typing import Any

import ml_collections

from alexnet import errors
from alexnet.data import epochs
from alexnet.data import sources

# The checkpoint meta's key for the recipe.
KEY = 'recipe'
# The recipe of a start that no data stream produced (imported weights).
NONE_YET: dict[str, Any] = {}


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
          'shuffle_buffer': config.shuffle_buffer,
          'image_size': config.image_size,
          'resize_size': config.resize_size,
          # Lists, as JSON gives them back.
          'classes': list(config.classes),
          'train_examples_per_class': config.train_examples_per_class}


def _effective(name: str, recipe_: dict[str, Any],
               source: sources.Source) -> Any:
  """What field `name` of `recipe_` does to the stream, where text or raw
  numbers would differ for the same stream; else its value."""
  try:
    if name == 'train_split':
      return sources.absolute_ranges(source.split_sizes, recipe_[name],
                                     source.tag)
    if name == 'shuffle_buffer':
      replicas = recipe_['num_replicas']
      return epochs.window_size(
          source, epochs.replica_examples(source, recipe_['train_split'],
                                          replicas),
          recipe_[name], replicas)
  except (errors.UserError, KeyError, TypeError, ValueError):
    pass  # A split this data cannot resolve: compared as written.
  return recipe_[name]


def _change(name: str, saved: dict[str, Any], current: dict[str, Any],
            source: sources.Source) -> str | None:
  """'name saved -> current' if the field changes the stream, else None."""
  if name not in saved:
    return None  # Recorded only since this field was; cannot be checked.
  before, after = (_effective(name, saved, source),
                   _effective(name, current, source))
  if before == after:
    return None
  change = f'{name} {saved[name]!r} -> {current[name]!r}'
  if name == 'shuffle_buffer':
    change += f' (windows of {before} -> {after} examples per replica)'
  return change


def check(meta: dict[str, Any], current: dict[str, Any], workdir: str,
          step: int, source: sources.Source) -> str | None:
  """Refuses to resume a checkpoint of another recipe.

  Args:
    meta: the checkpoint's meta.
    current: `recipe(...)` of the run that resumes.
    workdir: the run's workdir, for the message.
    step: the checkpoint's step, for the message.
    source: the run's data, which resolves train_split into examples and
      shuffle_buffer into windows.

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
  if saved == NONE_YET:
    return None  # Imported weights: this run's recipe is the first.
  changed = [change for change in (_change(name, saved, current, source)
                                   for name in current) if change]
  if changed:
    raise errors.WorkdirError(
        f'{workdir} holds a checkpoint (step {step}) of another recipe: '
        f'{", ".join(changed)}. Resuming would continue on a different data '
        'stream. Keep the saved values to resume; or start a new run with '
        'another --workdir, from these weights if you mean to: '
        f'--config.init_from={workdir}.')
  return None
