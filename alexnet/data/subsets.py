"""Class subsets and few-shot training sets of any source.

`subset_source` turns a `sources.Source` (TFDS, offline builders, image
folders, pre-resized shards) into the source of some of its classes, their
labels remapped to 0..K-1 (config.classes), optionally keeping only the
first N examples of each class of some splits
(config.train_examples_per_class, on the split(s) config.train_split
reads). The result is a `Source` itself, so split slices, per-replica
splits, colour statistics (cached under its own tag) and resuming work
unchanged; its order is the original order, so the stream stays
deterministic.
"""

import collections
import dataclasses
import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from alexnet.data.sources import Source
from alexnet.data.sources import SplitSize
from alexnet.data.sources import absolute_ranges
from alexnet.errors import ConfigError

# (source tag, split name) -> the split's labels, read once per process.
_LABELS: dict[tuple[str, str], np.ndarray] = {}


def split_labels(source: Source, split: str) -> np.ndarray:
  """The int32 labels of a whole named split, in the source's order.

  Read once per (source, split) and process: a pass over the records that
  decodes no image (cheap for paths and encoded bytes alike).
  """
  key = (source.tag, split)
  if key not in _LABELS:
    labels = source.examples(split).map(lambda data, label: label)
    _LABELS[key] = np.fromiter(labels.as_numpy_iterator(), np.int32)
  return _LABELS[key]


def kept_indices(labels: np.ndarray, classes: tuple[int, ...],
                 per_class: int = 0) -> np.ndarray:
  """Indices of the examples a subset keeps, in the split's order.

  Args:
    labels: the split's labels.
    classes: the labels kept.
    per_class: keep only the first this many examples of each kept class
      (in the split's order, so the choice depends on no seed); 0 keeps all.

  Returns:
    Increasing int64 indices into `labels`.
  """
  kept = np.flatnonzero(np.isin(labels, classes))
  if per_class:
    rank = np.zeros(len(kept), np.int64)
    for c in classes:
      members = labels[kept] == c
      rank[members] = np.arange(members.sum())
    kept = kept[rank < per_class]
  return kept


def _check_subset(source: Source, classes: tuple[int, ...],
                  per_class: int) -> None:
  if len(set(classes)) != len(classes) or not all(
      0 <= c < source.num_classes for c in classes):
    raise ConfigError(
        f'config.classes={tuple(classes)} must be distinct labels of '
        f'{source.tag} in [0, {source.num_classes}), e.g. (5, 6, 7, 8, 9); '
        '() keeps every class.')
  if per_class < 0:
    raise ConfigError(f'config.train_examples_per_class={per_class} must be '
                      '>= 0 (0 keeps every example).')


def subset_source(source: Source, classes: tuple[int, ...] = (),
                  per_class: int = 0,
                  limited_splits: tuple[str, ...] = ()) -> Source:
  """The examples of some classes, labels remapped to 0..len(classes)-1.

  The subset is a source of its own: its splits have the kept examples'
  sizes, so split specs ('train[:90%]', `tfds.split_for_jax_process`) slice
  the kept examples, and its order is the original order (deterministic).

  Args:
    source: the full data.
    classes: the original labels kept; classes[i] becomes label i. () keeps
      every class (labels unchanged).
    per_class: with `limited_splits`, the first this many examples of each
      kept class in those splits (e.g. a few-shot training set); 0: all.
    limited_splits: the split names `per_class` applies to (e.g. 'train').

  Returns:
    `source` itself when nothing is restricted, else the subset.

  Raises:
    ConfigError: labels outside the source's classes, repeated labels or a
      negative per-class count.
  """
  _check_subset(source, classes, per_class)
  if not classes and not per_class:
    return source
  classes = tuple(classes) or tuple(range(source.num_classes))
  limited = set(limited_splits) if per_class else set()
  kept = {}

  def indices(split):
    if split not in kept:
      kept[split] = kept_indices(split_labels(source, split), classes,
                                 per_class if split in limited else 0)
    return kept[split]

  remap = np.full(source.num_classes, -1, np.int32)
  remap[list(classes)] = np.arange(len(classes))
  sizes = _SubsetSizes(source.split_sizes, indices)
  tag = f'{source.tag}-classes{"_".join(map(str, classes))}'
  if limited:
    tag += f'-{per_class}per{"_".join(sorted(limited))}'
  return dataclasses.replace(
      source, tag=tag, num_classes=len(classes), split_sizes=sizes,
      examples=functools.partial(_subset_examples, source, sizes, indices,
                                 tf.constant(remap)))


class _SubsetSizes(collections.abc.Mapping):
  """Split name -> size of the kept examples (counted when first asked)."""

  def __init__(self, full: Mapping[str, Any],
               indices: Callable[[str], np.ndarray]):
    self._full, self._indices = full, indices

  def __getitem__(self, split: str) -> SplitSize:
    if split not in self._full:
      raise KeyError(split)
    return SplitSize(len(self._indices(split)))

  def __iter__(self) -> Iterator[str]:
    return iter(self._full)

  def __len__(self) -> int:
    return len(self._full)


def _subset_examples(source: Source, sizes: _SubsetSizes,
                     indices: Callable[[str], np.ndarray], remap: tf.Tensor,
                     split: Any) -> tf.data.Dataset:
  """(data, remapped label) of a split spec over the kept examples."""
  parts = []
  for name, start, stop in absolute_ranges(sizes, split, source.tag):
    chosen = indices(name)[start:stop]
    if not len(chosen):
      continue
    # Read the original range the chosen examples span, keep the chosen.
    low, high = int(chosen[0]), int(chosen[-1]) + 1
    keep = np.zeros(high - low, bool)
    keep[chosen - low] = True
    keep = tf.constant(keep)
    parts.append(
        source.examples(f'{name}[{low}:{high}]').enumerate()
        .filter(lambda i, example, keep=keep: tf.gather(keep, i))
        .map(lambda i, example: (example[0], tf.gather(remap, example[1]))))
  if not parts:
    return source.examples(split).take(0)
  ds = parts[0]
  for part in parts[1:]:
    ds = ds.concatenate(part)
  return ds
