"""Where examples come from: TFDS builders, offline builders, image folders.

A `Source` turns a split spec ('train', 'train[:99%]', or a
`tfds.split_for_jax_process` result) into a fixed-order dataset of
(data, int32 label); `read` turns data into encoded image bytes.

* Offline builders (`OFFLINE_BUILDERS`, e.g. 'digits') are prepared into
  `config.data_dir` at first use, without network.
* 'fashion_mnist' with `config.fashion_mnist_dir`: the original IDX files
  (e.g. Debian's dataset-fashion-mnist), prepared offline at first use.
* 'folder': images laid out `config.folder/<split>/<class>/<image>`.
  Undecodable files are found once per process (every file is decoded
  once), skipped, and reported in one warning.
* Any other TFDS name, optionally 'name:version'. Nothing is ever
  downloaded: an unprepared dataset raises `DatasetError` saying how to get
  it; imagenet2012 is prepared from its tars in `<data_dir>/downloads/manual`.
"""

import collections
import dataclasses
import functools
import hashlib
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from absl import logging
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from alexnet.data import digits
from alexnet.data import fashion_mnist
from alexnet.data import ops
from alexnet.errors import DatasetError

Config = ml_collections.ConfigDict

# TFDS builders this code prepares offline on first use: name -> builder.
OFFLINE_BUILDERS: dict[str, Callable[[Config], tfds.core.DatasetBuilder]] = {
    'digits': lambda config: digits.prepare(config.data_dir or None),
}
# File types a folder dataset reads (lower-case suffixes).
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif')
# ImageNet's manual-download files (TFDS imagenet2012).
IMAGENET_TARS = ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar')
FOLDER_LAYOUT = '<root>/<split>/<class>/<image>'


@dataclasses.dataclass(frozen=True)
class Source:
  """Where the examples come from.

  Attributes:
    tag: names the data for the colour-statistics cache.
    num_classes: number of labels.
    split_sizes: split name -> object with `.num_examples` (may be lazy).
    examples: split spec -> dataset of (data, int32 label), fixed order.
    read: data -> encoded image bytes (identity, or `tf.io.read_file` for a
      folder whose elements are paths, so shuffling and skipping are cheap).
    cheap_elements: whether elements are small (paths), so the whole split
      can sit in the shuffle buffer.
  """
  tag: str
  num_classes: int
  split_sizes: Mapping[str, Any]
  examples: Callable[[Any], tf.data.Dataset]
  read: Callable[[tf.Tensor], tf.Tensor]
  cheap_elements: bool = False


def absolute_ranges(split_sizes: Mapping[str, Any], split: Any,
                    tag: str) -> list[tuple[str, int, int]]:
  """Resolves a split spec into (split name, start, stop) ranges.

  Args:
    split_sizes: split name -> object with `.num_examples`.
    split: a split spec (string or `tfds.core.ReadInstruction`).
    tag: the dataset's name, for the error message.

  Returns:
    One (name, start, stop) per part of the spec.

  Raises:
    DatasetError: the spec names a missing split or a bad slice.
  """
  if isinstance(split, str):
    split = tfds.core.ReadInstruction.from_spec(split)
  try:
    instructions = split.to_absolute(split_sizes)
  except (KeyError, ValueError) as e:
    raise DatasetError(
        f'Bad split {split!r} for dataset {tag}: {e}. Available splits: '
        f'{sorted(split_sizes)}.') from e
  ranges = []
  for instruction in instructions:
    size = split_sizes[instruction.splitname].num_examples
    start = instruction.from_ or 0
    stop = size if instruction.to is None else instruction.to
    ranges.append((instruction.splitname, start, stop))
  return ranges


def num_examples(source: Source, split: Any) -> int:
  """Number of examples of a split spec (e.g. 'train[:99%]')."""
  ranges = absolute_ranges(source.split_sizes, split, source.tag)
  return sum(stop - start for _, start, stop in ranges)


def make_source(config: Config) -> Source:
  """The source named by `config.dataset` (prepares offline data if missing).

  Args:
    config: the experiment config (dataset, data_dir, folder).

  Returns:
    The `Source`.

  Raises:
    DatasetError: unknown name, unprepared dataset or bad folder.
  """
  if config.dataset in OFFLINE_BUILDERS:
    builder = OFFLINE_BUILDERS[config.dataset](config)
    return tfds_source(builder, f'{config.dataset}-{builder.version}')
  if config.dataset == 'fashion_mnist' and config.fashion_mnist_dir:
    # The original IDX files, offline; without a directory, TFDS's catalogue
    # dataset of the same name (which needs a network to build once).
    builder = fashion_mnist.prepare(config.data_dir or None,
                                    config.fashion_mnist_dir)
    return tfds_source(builder, f'{builder.name}-{builder.version}')
  if config.dataset == 'folder':
    return folder_source(config.folder)
  return _catalogue_source(config)


def data_root(config: Config) -> str:
  """The TFDS data directory: `config.data_dir` or TFDS's default."""
  return config.data_dir or tfds.core.constants.DATA_DIR


# --- TFDS ---------------------------------------------------------------------


def tfds_source(builder: tfds.core.DatasetBuilder, tag: str) -> Source:
  """A source reading encoded images from a prepared TFDS builder."""
  image_key, label_key = builder.info.supervised_keys or ('image', 'label')
  features = builder.info.features
  if not isinstance(features[image_key], tfds.features.Image):
    raise DatasetError(f'{tag}: feature {image_key!r} is not an image.')

  def examples(split):
    ds = builder.as_dataset(
        split=split, shuffle_files=False,
        # Keep the encoded bytes: decoding happens after shuffling and
        # skipping, and lets training use the fused decode-and-crop.
        decoders={image_key: tfds.decode.SkipDecoding()})
    return ds.map(lambda ex: (ex[image_key], tf.cast(ex[label_key],
                                                     tf.int32)))

  return Source(tag=tag, num_classes=features[label_key].num_classes,
                split_sizes=builder.info.splits, examples=examples,
                read=lambda data: data)


def _not_prepared_error(builder: tfds.core.DatasetBuilder,
                        root: str) -> DatasetError:
  name = builder.name
  manual = os.path.join(root, 'downloads', 'manual')
  text = (f'TFDS dataset {name!r} is not prepared in {builder.data_dir}, '
          'and this pipeline never downloads. ')
  if name == 'imagenet2012':
    return DatasetError(
        text + f'Put {IMAGENET_TARS[0]} and {IMAGENET_TARS[1]} (from '
        f'https://image-net.org) in {manual} (i.e. <data_dir>/downloads/'
        'manual); the next run prepares them (takes hours, once).')
  text += (f'On a machine with network run `tfds build {name} '
           f'--data_dir={root}` and copy {os.path.join(root, name)} here.')
  instructions = getattr(builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', None)
  if instructions:
    text += f' Manual files go in {manual}: {instructions.strip()}'
  return DatasetError(text)


def _prepare_tfds(builder: tfds.core.DatasetBuilder, root: str) -> None:
  """Prepares imagenet2012 from its tars; refuses anything needing network."""
  if builder.is_prepared():
    return
  manual = os.path.join(root, 'downloads', 'manual')
  if builder.name == 'imagenet2012' and all(
      os.path.exists(os.path.join(manual, tar)) for tar in IMAGENET_TARS):
    logging.info('Preparing imagenet2012 from %s (once; takes hours).',
                 manual)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual))
    return
  raise _not_prepared_error(builder, root)


def _catalogue_source(config: Config) -> Source:
  root = data_root(config)
  try:
    builder = tfds.builder(config.dataset, data_dir=root)
  except tfds.core.registered.DatasetNotFoundError as e:
    offline = ', '.join(repr(name) for name in OFFLINE_BUILDERS)
    raise DatasetError(
        f'Unknown dataset {config.dataset!r}: use {offline}, \'folder\' '
        '(with config.folder) or a TFDS name[:version], e.g. imagenet2012, '
        f'cifar10 (see tfds.list_builders()). TFDS said: {e}') from e
  _prepare_tfds(builder, root)
  return tfds_source(builder, f'{builder.name}-{builder.version}')


# --- Image folders ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SplitSize:
  """Quacks like `tfds.core.SplitInfo` for `ReadInstruction.to_absolute`."""
  num_examples: int


@dataclasses.dataclass(frozen=True)
class FolderSplit:
  """The readable images of one split folder.

  Attributes:
    paths: image files, sorted by class then name.
    labels: class index of each file.
    skipped: files that could not be decoded (left out of `paths`).
  """
  paths: list[str]
  labels: list[int]
  skipped: list[str]


def _subdirs(path: str) -> list[str]:
  return sorted(d for d in os.listdir(path) if not d.startswith('.')
                and os.path.isdir(os.path.join(path, d)))


def _decodable(paths: list[str]) -> np.ndarray:
  """Which files decode, found with one parallel tf.data pass."""
  ds = tf.data.Dataset.from_tensor_slices(paths).enumerate().map(
      lambda i, path: (i, tf.shape(ops.decode_rgb(tf.io.read_file(path)))),
      num_parallel_calls=tf.data.AUTOTUNE)
  ok = np.zeros(len(paths), bool)
  for index, _ in ds.ignore_errors().as_numpy_iterator():
    ok[index] = True
  return ok


class FolderSplits(collections.abc.Mapping):
  """The splits of an image folder, each scanned when first asked for.

  Maps split name -> size (as TFDS's split infos do). Labels index the
  union of class names over all splits, so every split maps a class name to
  the same label.
  """

  def __init__(self, root: str):
    if not root or not os.path.isdir(root):
      raise DatasetError(
          f'config.folder={root!r} is not a folder; dataset=\'folder\' '
          f'needs the layout {FOLDER_LAYOUT}.')
    self.root = root
    splits = _subdirs(root)
    self.classes = sorted(
        {c for s in splits for c in _subdirs(os.path.join(root, s))})
    if not self.classes:
      raise DatasetError(f'Folder {root} has no split or class folders; '
                         f'expected {FOLDER_LAYOUT}.')
    self._scans: dict[str, FolderSplit] = {}

  def __getitem__(self, split: str) -> SplitSize:
    if split not in _subdirs(self.root):
      raise KeyError(split)
    return SplitSize(len(self.scan(split).paths))

  def __iter__(self) -> Iterator[str]:
    return iter(_subdirs(self.root))

  def __len__(self) -> int:
    return len(_subdirs(self.root))

  def scan(self, split: str) -> FolderSplit:
    """Lists and checks the images of root/<split>/<class>/ (once).

    Args:
      split: a split folder name under root.

    Returns:
      The readable files with labels; undecodable files are logged in one
      warning and left out.

    Raises:
      DatasetError: the split folder is missing, has no class folders, or a
        class folder holds no image (or no decodable image).
    """
    if split not in self._scans:
      self._scans[split] = self._scan(split)
    return self._scans[split]

  def _scan(self, split: str) -> FolderSplit:
    split_dir = os.path.join(self.root, split)
    if not os.path.isdir(split_dir):
      raise DatasetError(
          f'Split folder {split_dir} does not exist; expected the layout '
          f'{FOLDER_LAYOUT} (splits found: {_subdirs(self.root)}).')
    present = _subdirs(split_dir)
    if not present:
      raise DatasetError(f'Split folder {split_dir} has no class folders; '
                         f'expected {FOLDER_LAYOUT}.')
    paths, labels = [], []
    for name in present:
      class_dir = os.path.join(split_dir, name)
      files = sorted(f for f in os.listdir(class_dir)
                     if f.lower().endswith(IMAGE_EXTENSIONS))
      if not files:
        raise DatasetError(
            f'Class folder {class_dir} holds no images ({IMAGE_EXTENSIONS}); '
            f'remove it or add images (layout {FOLDER_LAYOUT}).')
      paths += [os.path.join(class_dir, f) for f in files]
      labels += [self.classes.index(name)] * len(files)
    ok = _decodable(paths)
    skipped = [p for p, good in zip(paths, ok) if not good]
    if skipped:
      logging.warning('Skipping %d undecodable image(s) of %d in %s: %s',
                      len(skipped), len(paths), split_dir, ', '.join(skipped))
    labels = [label for label, good in zip(labels, ok) if good]
    empty = sorted(set(present) - {self.classes[l] for l in labels})
    if empty:
      raise DatasetError(f'Class folder(s) with no decodable image in '
                         f'{split_dir}: {empty}.')
    return FolderSplit(paths=[p for p, good in zip(paths, ok) if good],
                       labels=labels, skipped=skipped)

  def examples(self, split: Any) -> tf.data.Dataset:
    """Dataset of (path, int32 label) of a split spec, in folder order."""
    parts = []
    for name, start, stop in absolute_ranges(self, split, self.root):
      scan = self.scan(name)
      parts.append(tf.data.Dataset.from_tensor_slices(
          (scan.paths[start:stop],
           np.array(scan.labels[start:stop], np.int32).reshape(-1))))
    ds = parts[0]
    for part in parts[1:]:
      ds = ds.concatenate(part)
    return ds


# Every entry point builds its source; one scan per folder and process is
# enough (scanning decodes every file).
@functools.cache
def _folder_splits(root: str) -> FolderSplits:
  return FolderSplits(root)


def folder_source(root: str) -> Source:
  """A source reading root/<split>/<class>/<image>, scanned once per process.

  Args:
    root: the image folder (`config.folder`).

  Returns:
    The `Source`; its elements are file paths.

  Raises:
    DatasetError: root is not a folder or holds no class folders.
  """
  root = os.path.abspath(root) if root else root
  splits = _folder_splits(root)
  path_hash = hashlib.sha1(root.encode()).hexdigest()[:10]
  return Source(tag=f'folder-{os.path.basename(root)}-{path_hash}',
                num_classes=len(splits.classes), split_sizes=splits,
                examples=splits.examples, read=tf.io.read_file,
                cheap_elements=True)
