"""tf.data input pipeline for AlexNet (Krizhevsky et al. 2012, sections 2, 4.1).

Sources (`config.dataset`):
  * 'digits': scikit-learn's digits as an offline TFDS dataset
    (`alexnet/digits.py`), prepared into `config.data_dir` at first use.
  * 'folder': images laid out `config.folder/<split>/<class>/<image>`.
    Undecodable files are found once per run (every file is decoded once),
    skipped, and reported in one warning.
  * any other TFDS name, optionally 'name:version'. Nothing is ever
    downloaded: an unprepared dataset raises `DatasetError` saying how to get
    it; imagenet2012 is prepared from its tars in
    `<data_dir>/downloads/manual`.

Preprocessing: every image is decoded to RGB, the largest centred square is
cut out and resized to `resize_size` (equal, up to sub-pixel rounding, to
resizing the shorter side and centre-cropping), and the training set's mean
(per pixel, or per channel) is subtracted on the 0-255 scale.

Training adds random `image_size` crops, horizontal reflections and fancy PCA
lighting. Every random draw comes from stateless ops keyed on
(seed, epoch, process, example index) (drawn as per-epoch tables), and each epoch is shuffled with a seed
derived from (seed, epoch), so a pipeline started at step k yields exactly the
batches k, k+1, ... of a pipeline started at step 0. 256x256 JPEGs take a
fused decode-and-crop fast path.

Evaluation pads the last batch with masked examples so that every example
counts exactly once across processes.

Colour statistics (mean image, RGB eigenvectors) are computed once per
(dataset, train split, resize_size) and cached as
`<data_dir>/alexnet_colour_stats/<dataset>/<split>_<resize_size>.npz`
(`data_dir` is `config.data_dir` or TFDS's default).
"""

import collections
import dataclasses
import hashlib
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from alexnet import colour
from alexnet import digits
from alexnet import errors

AUTOTUNE = tf.data.AUTOTUNE
# File types a folder dataset reads (lower-case suffixes).
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif')
# ImageNet's manual-download files (TFDS imagenet2012).
IMAGENET_TARS = ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar')
FOLDER_LAYOUT = '<root>/<split>/<class>/<image>'


DatasetError = errors.DatasetError


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Sizes the training loop needs.

  Attributes:
    num_classes: number of labels.
    num_train_examples: examples in `config.train_split`, all processes.
    num_eval_examples: examples per evaluated split: key 'eval' and, when
      `config.minival_split` is set, 'minival'.
  """
  num_classes: int
  num_train_examples: int
  num_eval_examples: dict[str, int]


# ---------------------------------------------------------------------------
# Preprocessing ops. Each works eagerly and inside `tf.data.Dataset.map`.
# ---------------------------------------------------------------------------


def decode_rgb(image_bytes: tf.Tensor) -> tf.Tensor:
  """Decodes a JPEG/PNG/GIF/BMP to uint8 RGB (grey and CMYK converted).

  Args:
    image_bytes: scalar string tensor, an encoded image.

  Returns:
    uint8 [height, width, 3].
  """
  image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def _centre_square_window(height: tf.Tensor, width: tf.Tensor) -> tf.Tensor:
  side = tf.minimum(height, width)
  return tf.stack([(height - side) // 2, (width - side) // 2, side, side])


def resize_square(square: tf.Tensor, resize_size: int) -> tf.Tensor:
  """Resizes a square image to resize_size x resize_size.

  Args:
    square: [side, side, 3] image, any real dtype.
    resize_size: output side.

  Returns:
    float32 [resize_size, resize_size, 3], 0-255 scale. An image already of
    that size is returned unchanged (cast only), so the fused JPEG path and
    this one agree.
  """
  square = tf.cast(square, tf.float32)
  resized = tf.cond(
      tf.shape(square)[0] == resize_size,
      lambda: square,
      # Antialiasing keeps downscaled ImageNet photos close to PIL's resize.
      lambda: tf.image.resize(square, [resize_size, resize_size],
                              method='bilinear', antialias=True))
  return tf.ensure_shape(resized, [resize_size, resize_size, 3])


def decode_centre_square(image_bytes: tf.Tensor,
                         resize_size: int) -> tf.Tensor:
  """Decodes an image, cuts its centred square and resizes it.

  Args:
    image_bytes: scalar string tensor, an encoded image.
    resize_size: output side.

  Returns:
    float32 [resize_size, resize_size, 3], 0-255 scale.
  """
  def jpeg():
    # Decode only the square: the discarded sides are never decompressed.
    shape = tf.image.extract_jpeg_shape(image_bytes)
    window = _centre_square_window(shape[0], shape[1])
    return tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3)

  def other():
    image = decode_rgb(image_bytes)
    shape = tf.shape(image)
    window = _centre_square_window(shape[0], shape[1])
    return tf.slice(image, [window[0], window[1], 0],
                    [window[2], window[3], 3])

  square = tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other)
  square.set_shape([None, None, 3])
  return resize_square(square, resize_size)


def is_square_jpeg(image_bytes: tf.Tensor, size: int) -> tf.Tensor:
  """Whether the bytes are a size x size JPEG (the fused fast path)."""
  return tf.cond(
      tf.io.is_jpeg(image_bytes),
      lambda: tf.reduce_all(
          tf.image.extract_jpeg_shape(image_bytes)[:2] == size),
      lambda: tf.constant(False))


def decode_crop(image_bytes: tf.Tensor, resize_size: int, image_size: int,
                offset: tf.Tensor) -> tf.Tensor:
  """Decodes the image_size window at `offset` of the resize_size square.

  Args:
    image_bytes: scalar string tensor, an encoded image.
    resize_size: side of the centred, resized square the window lies in.
    image_size: side of the window.
    offset: int32 [2], (top, left) of the window, each in
      0..resize_size-image_size.

  Returns:
    float32 [image_size, image_size, 3], 0-255 scale. resize_size-square
    JPEGs are decoded with the fused `decode_and_crop_jpeg`, which equals
    decode-then-crop up to chroma upsampling at the window's edges.
  """
  def fused():
    window = tf.concat([offset, [image_size, image_size]], axis=0)
    return tf.cast(
        tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3),
        tf.float32)

  def general():
    square = decode_centre_square(image_bytes, resize_size)
    return crop(square, offset, image_size)

  image = tf.cond(is_square_jpeg(image_bytes, resize_size), fused, general)
  return tf.ensure_shape(image, [image_size, image_size, 3])


def crop(image: tf.Tensor, offset: tf.Tensor, size: int) -> tf.Tensor:
  """Returns the size x size window of `image` at offset (top, left)."""
  offset = tf.cast(offset, tf.int32)
  window = tf.slice(image, [offset[0], offset[1], 0], [size, size, -1])
  return tf.ensure_shape(window, [size, size, image.shape[-1]])


def epoch_key(seed: int, epoch: tf.Tensor, process: int) -> tf.Tensor:
  """The stateless RNG key of one epoch of one process.

  Args:
    seed: `config.seed`.
    epoch: the epoch (0-based).
    process: the process index (processes hold different examples).

  Returns:
    int64 [2], a key for `tf.random.stateless_*` ops.
  """
  key = tf.stack([tf.cast(seed, tf.int64), tf.constant(0, tf.int64)])
  for data in (epoch, process):
    key = tf.random.experimental.stateless_fold_in(key, tf.cast(data,
                                                                tf.int64))
  return key


@dataclasses.dataclass(frozen=True)
class Augmentation:
  """Random draws of one epoch; row i belongs to example index i.

  Drawn as whole-epoch tables (one op each) because per-example random ops
  cost more tf.data time than decoding a 256x256 JPEG. Row i depends only on
  (seed, epoch, process, i), so resuming and reshuffling do not change it.

  Attributes:
    offsets: int32 [n, 2], (top, left) crop offsets, each uniform in
      0..resize_size-image_size.
    flips: bool [n], horizontal reflection, probability 1/2.
    shifts: float32 [n, 3], fancy PCA lighting 255 * P @ (alpha * lambda)
      with alpha ~ N(0, sigma) (zeros when sigma is 0).
  """
  offsets: tf.Tensor
  flips: tf.Tensor
  shifts: tf.Tensor


def random_crop_offsets(key: tf.Tensor, n: int, resize_size: int,
                        image_size: int) -> tf.Tensor:
  """n uniform (top, left) offsets, every value in 0..resize_size-image_size.

  Args:
    key: stateless RNG key [2].
    n: number of offsets.
    resize_size: side of the image to crop from.
    image_size: side of the crop.

  Returns:
    int32 [n, 2].
  """
  return tf.random.stateless_uniform(
      [n, 2], key, minval=0, maxval=resize_size - image_size + 1,
      dtype=tf.int32)


def random_flips(key: tf.Tensor, n: int) -> tf.Tensor:
  """n independent fair coin flips (bool [n])."""
  return tf.random.stateless_uniform([n], key) < 0.5


def lighting_shifts(key: tf.Tensor, n: int, sigma: float,
                    eigvals: np.ndarray, eigvecs: np.ndarray) -> tf.Tensor:
  """Fancy PCA lighting: n shifts 255 * P @ (alpha * lambda).

  The paper draws alpha ~ N(0, sigma) once per image and presentation and
  adds the shift to every pixel; lambda and P are computed on [0,1] pixels
  (REFERENCE.md), hence the factor 255 for 0-255 images.

  Args:
    key: stateless RNG key [2].
    n: number of shifts.
    sigma: standard deviation of alpha.
    eigvals: [3] eigenvalues lambda of the RGB covariance.
    eigvecs: [3, 3] eigenvectors P as columns.

  Returns:
    float32 [n, 3], RGB shifts.
  """
  alpha = sigma * tf.random.stateless_normal([n, 3], key, dtype=tf.float32)
  weights = alpha * tf.constant(eigvals, tf.float32)  # [n, 3]
  # Row i is P @ weights[i], i.e. weights @ P^T.
  return 255.0 * tf.matmul(weights, tf.constant(eigvecs, tf.float32),
                           transpose_b=True)


def draw_augmentation(key: tf.Tensor, n: int, resize_size: int,
                      image_size: int, sigma: float, eigvals: np.ndarray,
                      eigvecs: np.ndarray) -> Augmentation:
  """All random draws of one epoch of n examples.

  Args:
    key: from `epoch_key`.
    n: examples in this process's slice.
    resize_size: side of the image crops are taken from.
    image_size: crop side.
    sigma: lighting alpha std (0 gives zero shifts).
    eigvals: [3] RGB eigenvalues.
    eigvecs: [3, 3] RGB eigenvectors as columns.

  Returns:
    The `Augmentation` tables.
  """
  crop_key, flip_key, light_key = tf.unstack(
      tf.random.experimental.stateless_split(key, 3))
  return Augmentation(
      offsets=random_crop_offsets(crop_key, n, resize_size, image_size),
      flips=random_flips(flip_key, n),
      shifts=lighting_shifts(light_key, n, sigma, eigvals, eigvecs))


def flip_if(image: tf.Tensor, flip: tf.Tensor) -> tf.Tensor:
  """Reflects [height, width, c] left-right when `flip` is True."""
  return tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)


def centre_crop(image: tf.Tensor, size: int) -> tf.Tensor:
  """The centred size x size window (offset rounded down)."""
  height, width = image.shape[0], image.shape[1]
  return crop(image, [(height - size) // 2, (width - size) // 2], size)


def ten_crop(image: tf.Tensor, size: int) -> tf.Tensor:
  """The paper's 10 test views of a square image.

  Args:
    image: [side, side, c], static shape.
    size: view side.

  Returns:
    [10, size, size, c]: view 0 the centre, 1-4 the corners top-left,
    top-right, bottom-left, bottom-right; 5-9 the horizontal reflections of
    views 0-4.
  """
  far_y, far_x = image.shape[0] - size, image.shape[1] - size
  views = [centre_crop(image, size)] + [
      crop(image, offset, size)
      for offset in ([0, 0], [0, far_x], [far_y, 0], [far_y, far_x])]
  views = tf.stack(views)
  return tf.concat([views, tf.reverse(views, axis=[2])], axis=0)


# ---------------------------------------------------------------------------
# Sources: a fixed-order dataset of (encoded image or path, label) per split.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _SplitSize:
  """Quacks like `tfds.core.SplitInfo` for `to_absolute`."""
  num_examples: int


@dataclasses.dataclass(frozen=True)
class Source:
  """Where the examples come from.

  Attributes:
    tag: names the data for the colour-statistics cache.
    num_classes: number of labels.
    split_sizes: split name -> object with `.num_examples` (may be lazy).
    examples: split spec (string or `tfds.split_for_jax_process` output) ->
      dataset of (data, int32 label) in a fixed order.
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


def _absolute_ranges(source: Source, split: Any) -> list[tuple[str, int, int]]:
  """Resolves a split spec into (split name, start, stop) ranges."""
  if isinstance(split, str):
    split = tfds.core.ReadInstruction.from_spec(split)
  try:
    instructions = split.to_absolute(source.split_sizes)
  except (KeyError, ValueError) as e:
    raise DatasetError(
        f'Bad split {split!r} for dataset {source.tag}: {e}. Available '
        f'splits: {sorted(source.split_sizes)}.') from e
  ranges = []
  for instruction in instructions:
    size = source.split_sizes[instruction.splitname].num_examples
    start = instruction.from_ or 0
    stop = size if instruction.to is None else instruction.to
    ranges.append((instruction.splitname, start, stop))
  return ranges


def num_examples(source: Source, split: Any) -> int:
  """Number of examples of a split spec (e.g. 'train[:99%]')."""
  return sum(stop - start for _, start, stop in _absolute_ranges(source,
                                                                 split))


def _tfds_source(builder: tfds.core.DatasetBuilder, tag: str) -> Source:
  """A source reading encoded images from a prepared TFDS builder."""
  image_key, label_key = builder.info.supervised_keys or ('image', 'label')
  features = builder.info.features
  if not isinstance(features[image_key], tfds.features.Image):
    raise DatasetError(f'{tag}: feature {image_key!r} is not an image.')

  def examples(split):
    ds = builder.as_dataset(
        split=split, shuffle_files=False,
        # Keep JPEG bytes: decoding happens after shuffling and skipping, and
        # lets training use the fused decode-and-crop.
        decoders={image_key: tfds.decode.SkipDecoding()})
    return ds.map(lambda ex: (ex[image_key], tf.cast(ex[label_key],
                                                     tf.int32)))

  return Source(tag=tag, num_classes=features[label_key].num_classes,
                split_sizes=builder.info.splits, examples=examples,
                read=lambda data: data)


def _data_root(config: ml_collections.ConfigDict) -> str:
  return config.data_dir or tfds.core.constants.DATA_DIR


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


def _catalogue_source(config: ml_collections.ConfigDict) -> Source:
  root = _data_root(config)
  try:
    builder = tfds.builder(config.dataset, data_dir=root)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DatasetError(
        f'Unknown dataset {config.dataset!r}: use \'digits\', \'folder\' '
        '(with config.folder) or a TFDS name[:version], e.g. imagenet2012, '
        f'cifar10 (see tfds.list_builders()). TFDS said: {e}') from e
  _prepare_tfds(builder, root)
  return _tfds_source(builder, f'{builder.name}-{builder.version}')


def _digits_source(config: ml_collections.ConfigDict) -> Source:
  builder = digits.prepare(config.data_dir or None)
  return _tfds_source(builder, f'digits-{builder.version}')


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


def _decodable(paths: list[str]) -> np.ndarray:
  """Which files decode, found with one parallel tf.data pass."""
  ds = tf.data.Dataset.from_tensor_slices(paths).enumerate().map(
      lambda i, path: (i, tf.shape(decode_rgb(tf.io.read_file(path)))),
      num_parallel_calls=AUTOTUNE)
  ok = np.zeros(len(paths), bool)
  for index, _ in ds.ignore_errors().as_numpy_iterator():
    ok[index] = True
  return ok


_FOLDER_SCANS: dict[tuple[str, str, tuple[str, ...]], FolderSplit] = {}


def scan_folder_split(root: str, split: str,
                      classes: list[str]) -> FolderSplit:
  """Lists and checks the images of root/<split>/<class>/ (cached per run).

  Args:
    root: the dataset folder.
    split: a split folder name under root.
    classes: all class names (label = position in this list).

  Returns:
    The readable files with labels; undecodable files are logged in one
    warning and left out.

  Raises:
    DatasetError: the split folder is missing, has no class folders, or a
      class folder holds no image (or no decodable image).
  """
  key = (os.path.abspath(root), split, tuple(classes))
  if key in _FOLDER_SCANS:
    return _FOLDER_SCANS[key]
  split_dir = os.path.join(root, split)
  if not os.path.isdir(split_dir):
    raise DatasetError(
        f'Split folder {split_dir} does not exist; expected the layout '
        f'{FOLDER_LAYOUT} (splits found: {_subdirs(root)}).')
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
    labels += [classes.index(name)] * len(files)
  ok = _decodable(paths)
  skipped = [p for p, good in zip(paths, ok) if not good]
  if skipped:
    logging.warning('Skipping %d undecodable image(s) of %d in %s: %s',
                    len(skipped), len(paths), split_dir, ', '.join(skipped))
  result = FolderSplit(paths=[p for p, good in zip(paths, ok) if good],
                       labels=[l for l, good in zip(labels, ok) if good],
                       skipped=skipped)
  empty = sorted(set(present) - {classes[l] for l in result.labels})
  if empty:
    raise DatasetError(f'Class folder(s) with no decodable image in '
                       f'{split_dir}: {empty}.')
  _FOLDER_SCANS[key] = result
  return result


def _subdirs(path: str) -> list[str]:
  return sorted(d for d in os.listdir(path) if not d.startswith('.')
                and os.path.isdir(os.path.join(path, d)))


class _LazyFolderSizes(collections.abc.Mapping):
  """Split sizes of a folder, scanning (decoding) a split only when asked."""

  def __init__(self, root: str, classes: list[str]):
    self._root, self._classes = root, classes

  def scan(self, split: str) -> FolderSplit:
    return scan_folder_split(self._root, split, self._classes)

  def __getitem__(self, split: str) -> _SplitSize:
    if split not in _subdirs(self._root):
      raise KeyError(split)
    return _SplitSize(len(self.scan(split).paths))

  def __iter__(self) -> Iterator[str]:
    return iter(_subdirs(self._root))

  def __len__(self) -> int:
    return len(_subdirs(self._root))


def _folder_source(config: ml_collections.ConfigDict) -> Source:
  root = config.folder
  if not root or not os.path.isdir(root):
    raise DatasetError(
        f'config.folder={root!r} is not a folder; dataset=\'folder\' needs '
        f'the layout {FOLDER_LAYOUT}.')
  splits = _subdirs(root)
  if not splits:
    raise DatasetError(f'Folder {root} has no split folders; expected '
                       f'{FOLDER_LAYOUT}.')
  # Labels index the union of class names over all splits, so every split
  # maps a class name to the same label.
  classes = sorted({c for s in splits for c in _subdirs(os.path.join(root,
                                                                      s))})
  if not classes:
    raise DatasetError(f'Folder {root} has no class folders; expected '
                       f'{FOLDER_LAYOUT}.')
  sizes = _LazyFolderSizes(root, classes)
  source_ref = []

  def examples(split):
    parts = []
    for name, start, stop in _absolute_ranges(source_ref[0], split):
      scan = sizes.scan(name)
      parts.append(tf.data.Dataset.from_tensor_slices(
          (scan.paths[start:stop], np.array(scan.labels[start:stop],
                                            np.int32).reshape(-1))))
    ds = parts[0]
    for part in parts[1:]:
      ds = ds.concatenate(part)
    return ds

  path_hash = hashlib.sha1(os.path.abspath(root).encode()).hexdigest()[:10]
  source = Source(
      tag=f'folder-{os.path.basename(os.path.abspath(root))}-{path_hash}',
      num_classes=len(classes), split_sizes=sizes, examples=examples,
      read=tf.io.read_file, cheap_elements=True)
  source_ref.append(source)
  return source


def make_source(config: ml_collections.ConfigDict) -> Source:
  """The source named by `config.dataset` (prepares digits if missing).

  Args:
    config: the experiment config (dataset, data_dir, folder).

  Returns:
    The `Source`.

  Raises:
    DatasetError: unknown name, unprepared dataset or bad folder.
  """
  if config.dataset == 'digits':
    return _digits_source(config)
  if config.dataset == 'folder':
    return _folder_source(config)
  return _catalogue_source(config)


# ---------------------------------------------------------------------------
# Colour statistics.
# ---------------------------------------------------------------------------


def compute_colour_stats(source: Source, split: str,
                         resize_size: int) -> colour.ColourStats:
  """One pass over `split` (resized, centre-cropped) accumulating stats."""
  ds = source.examples(split).map(
      lambda data, label: decode_centre_square(source.read(data),
                                               resize_size),
      num_parallel_calls=AUTOTUNE).batch(64).prefetch(AUTOTUNE)
  accumulator = colour.StatsAccumulator(resize_size)
  for images in ds.as_numpy_iterator():
    accumulator.update(images)
  return accumulator.result()


def colour_stats(config: ml_collections.ConfigDict,
                 source: Source) -> colour.ColourStats:
  """The training split's colour statistics, from the cache or computed.

  Args:
    config: uses train_split, resize_size, data_dir.
    source: the data.

  Returns:
    The statistics (cached under `colour.cache_path`; recomputed when the
    cached example count or size does not match).
  """
  path = colour.cache_path(_data_root(config), source.tag,
                           config.train_split, config.resize_size)
  expected = num_examples(source, config.train_split)
  stats = colour.load(path)
  if (stats is None or stats.num_examples != expected or
      stats.mean_image.shape[0] != config.resize_size):
    logging.info('Computing colour statistics of %s %s (%d images) -> %s',
                 source.tag, config.train_split, expected, path)
    stats = compute_colour_stats(source, config.train_split,
                                 config.resize_size)
    colour.save(path, stats)
  return stats


def _mean_image(config: ml_collections.ConfigDict,
                stats: colour.ColourStats) -> np.ndarray:
  if config.mean == 'pixel':
    return stats.mean_image
  if config.mean == 'channel':
    return np.broadcast_to(stats.channel_mean, stats.mean_image.shape)
  raise ValueError(f"config.mean={config.mean!r}: use 'pixel' or 'channel'.")


def _principal_components(
    config: ml_collections.ConfigDict,
    stats: colour.ColourStats) -> tuple[np.ndarray, np.ndarray]:
  if config.pca_stats == 'dataset':
    return stats.eigvals, stats.eigvecs
  if config.pca_stats == 'imagenet':
    return colour.IMAGENET_EIGVALS, colour.IMAGENET_EIGVECS
  raise ValueError(
      f"config.pca_stats={config.pca_stats!r}: use 'dataset' or 'imagenet'.")


# ---------------------------------------------------------------------------
# Public entry points.
# ---------------------------------------------------------------------------


def _processes(process_index: int | None,
               process_count: int | None) -> tuple[int, int]:
  """(index, count), defaulting to JAX's; overridable to simulate hosts."""
  count = jax.process_count() if process_count is None else process_count
  index = jax.process_index() if process_index is None else process_index
  if not 0 <= index < count:
    raise ValueError(f'process_index={index} not in [0, {count}).')
  return index, count


def _per_shard(batch_size: int, field: str, process_count: int,
               num_shards: int) -> int:
  if num_shards < 1 or batch_size % (process_count * num_shards):
    raise DatasetError(
        f'config.{field}={batch_size} must be a positive multiple of '
        f'process_count * num_shards = {process_count} * {num_shards}.')
  return batch_size // process_count // num_shards


def get_dataset_info(config: ml_collections.ConfigDict) -> DatasetInfo:
  """Sizes of the configured splits (prepares the digits data if missing).

  Args:
    config: the experiment config.

  Returns:
    The `DatasetInfo`.

  Raises:
    DatasetError: missing, unknown or empty data.
  """
  source = make_source(config)
  specs = {'eval': config.eval_split}
  if config.minival_split:
    specs['minival'] = config.minival_split
  sizes = {name: num_examples(source, spec) for name, spec in specs.items()}
  train = num_examples(source, config.train_split)
  for spec, size in [(config.train_split, train),
                     *zip(specs.values(), sizes.values())]:
    if size == 0:
      raise DatasetError(f'Split {spec!r} of {source.tag} is empty.')
  return DatasetInfo(num_classes=source.num_classes,
                     num_train_examples=train, num_eval_examples=sizes)


def steps_per_epoch(config: ml_collections.ConfigDict, info: DatasetInfo, *,
                    process_count: int | None = None) -> int:
  """Global training steps per epoch (partial batches dropped).

  Every process holds num_train_examples // process_count examples
  (`tfds.split_for_jax_process(..., drop_remainder=True)`), so this is the
  same on every process.

  Args:
    config: uses batch_size.
    info: from `get_dataset_info`.
    process_count: defaults to `jax.process_count()`.

  Returns:
    Steps in one epoch (at least 1).

  Raises:
    DatasetError: batch_size not divisible, or fewer examples than a batch.
  """
  _, count = _processes(0, process_count)
  local_batch = _per_shard(config.batch_size, 'batch_size', count, 1)
  steps = (info.num_train_examples // count) // local_batch
  if steps < 1:
    raise DatasetError(
        f'config.batch_size={config.batch_size} exceeds the '
        f'{info.num_train_examples} training examples.')
  return steps


def _options(threads: int | None) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True  # Resume and reproducibility depend on it.
  if threads:
    options.threading.private_threadpool_size = threads
    options.threading.max_intra_op_parallelism = 1
  return options


def _to_shards(batch: dict[str, tf.Tensor],
               num_shards: int) -> dict[str, tf.Tensor]:
  return {k: tf.reshape(v, [num_shards, -1, *v.shape[1:]])
          for k, v in batch.items()}


def train_dataset(config: ml_collections.ConfigDict, *, num_shards: int,
                  start_step: int = 0, process_index: int | None = None,
                  process_count: int | None = None,
                  threads: int | None = None) -> tf.data.Dataset:
  """The infinite training dataset behind `create_train_iterator`.

  Args:
    config: the experiment config.
    num_shards: data-parallel replicas of this process.
    start_step: global step of the first batch.
    process_index: defaults to `jax.process_index()`.
    process_count: defaults to `jax.process_count()`.
    threads: tf.data thread-pool size (None: TF's default, all cores).

  Returns:
    Dataset of {'image': float32 [num_shards, per_shard, S, S, 3],
    'label': int32 [num_shards, per_shard]}.
  """
  index, count = _processes(process_index, process_count)
  per_shard = _per_shard(config.batch_size, 'batch_size', count, num_shards)
  local_batch = per_shard * num_shards
  info = get_dataset_info(config)
  epoch_steps = steps_per_epoch(config, info, process_count=count)
  source = make_source(config)
  stats = colour_stats(config, source)
  mean = tf.constant(_mean_image(config, stats), tf.float32)
  eigvals, eigvecs = _principal_components(config, stats)
  resize, size = config.resize_size, config.image_size

  split = tfds.split_for_jax_process(config.train_split, process_index=index,
                                     process_count=count, drop_remainder=True)
  local_examples = num_examples(source, split)
  per_epoch = epoch_steps * local_batch
  if local_examples < per_epoch:
    raise DatasetError(f'Process {index} holds {local_examples} examples of '
                       f'{config.train_split!r}, fewer than {per_epoch}.')
  # Example indices are attached before shuffling, so an example's random
  # draws do not depend on where the shuffle puts it.
  indexed = source.examples(split).enumerate()
  buffer = local_examples if source.cheap_elements else min(
      config.shuffle_buffer, local_examples)
  start_epoch, skip_steps = divmod(start_step, epoch_steps)
  sigma = config.pca_sigma

  def epoch_examples(epoch):
    ds = indexed.shuffle(buffer, seed=config.seed * 1_000_003 + epoch,
                         reshuffle_each_iteration=False).take(per_epoch)
    # Resuming skips undecoded records of the first epoch only.
    skip = tf.where(epoch == start_epoch, skip_steps * local_batch, 0)
    draws = draw_augmentation(epoch_key(config.seed, epoch, index),
                              local_examples, resize, size, sigma, eigvals,
                              eigvecs)

    def attach(i, example):
      return (example, tf.gather(draws.offsets, i), tf.gather(draws.flips, i),
              tf.gather(draws.shifts, i))

    return ds.skip(tf.cast(skip, tf.int64)).map(attach)

  def augment(example, offset, flip, shift):
    data, label = example
    image = decode_crop(source.read(data), resize, size, offset)
    image -= crop(mean, offset, size)
    if config.random_flip:
      image = flip_if(image, flip)
    if sigma > 0:
      image += shift
    return {'image': image, 'label': label}

  ds = tf.data.Dataset.counter(start_epoch).flat_map(epoch_examples)
  ds = ds.map(augment, num_parallel_calls=AUTOTUNE)
  ds = ds.batch(local_batch, drop_remainder=True)
  ds = ds.map(lambda batch: _to_shards(batch, num_shards))
  return ds.prefetch(AUTOTUNE).with_options(_options(threads))


def create_train_iterator(
    config: ml_collections.ConfigDict, *, num_shards: int,
    start_step: int = 0, process_index: int | None = None,
    process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Infinite iterator over the training batches of steps start_step, +1, ...

  Args:
    config: the experiment config.
    num_shards: this process's data-parallel replicas.
    start_step: global step of the first batch (resume).
    process_index: defaults to `jax.process_index()` (override in tests).
    process_count: defaults to `jax.process_count()`.

  Returns:
    Iterator of {'image': float32 [num_shards, per_shard, image_size,
    image_size, 3] (mean-subtracted, 0-255 scale), 'label': int32
    [num_shards, per_shard]}, per_shard = batch_size // process_count //
    num_shards.
  """
  return iter(train_dataset(config, num_shards=num_shards,
                            start_step=start_step,
                            process_index=process_index,
                            process_count=process_count).as_numpy_iterator())


class EvalIterable:
  """Re-iterable evaluation batches; each iteration is one full pass."""

  def __init__(self, dataset: tf.data.Dataset, num_batches: int):
    self._dataset = dataset
    self._num_batches = num_batches

  def __len__(self) -> int:
    return self._num_batches

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return iter(self._dataset.as_numpy_iterator())


def create_eval_iterable(
    config: ml_collections.ConfigDict, split: str, *, num_shards: int,
    process_index: int | None = None,
    process_count: int | None = None) -> Iterable[dict[str, np.ndarray]]:
  """Evaluation batches of 'eval' or 'minival', padded to count each once.

  Views per image: V = 10 if config.ten_crop else 1. View 0 is always the
  centre crop; views 1-4 are the corners top-left, top-right, bottom-left,
  bottom-right; views 5-9 are the horizontal reflections of views 0-4.

  Args:
    config: the experiment config.
    split: 'eval' (config.eval_split) or 'minival' (config.minival_split).
    num_shards: this process's data-parallel replicas.
    process_index: defaults to `jax.process_index()` (override in tests).
    process_count: defaults to `jax.process_count()`.

  Returns:
    A re-iterable (deterministic order) of {'image': float32 [num_shards, b,
    V, image_size, image_size, 3], 'label': int32 [num_shards, b], 'mask':
    bool [num_shards, b]} with b = eval_batch_size // process_count //
    num_shards. Padding examples have mask False; every process yields the
    same number of batches (`len()`), since evaluation uses collectives.
  """
  spec = {'eval': config.eval_split, 'minival': config.minival_split}.get(
      split)
  if not spec:
    raise ValueError(f'split={split!r}: use \'eval\', or \'minival\' with '
                     'config.minival_split set.')
  index, count = _processes(process_index, process_count)
  per_shard = _per_shard(config.eval_batch_size, 'eval_batch_size', count,
                         num_shards)
  local_batch = per_shard * num_shards
  source = make_source(config)
  stats = colour_stats(config, source)
  mean = tf.constant(_mean_image(config, stats), tf.float32)
  splits = [tfds.split_for_jax_process(spec, process_index=i,
                                       process_count=count)
            for i in range(count)]
  sizes = [num_examples(source, s) for s in splits]
  if not sum(sizes):
    raise DatasetError(f'Split {spec!r} of {source.tag} is empty.')
  num_batches = math.ceil(max(sizes) / local_batch)
  size, views = config.image_size, 10 if config.ten_crop else 1

  def preprocess(data, label):
    image = decode_centre_square(source.read(data), config.resize_size)
    image -= mean
    image = ten_crop(image, size) if config.ten_crop else centre_crop(
        image, size)[None]
    return {'image': image, 'label': label, 'mask': tf.constant(True)}

  padding = tf.data.Dataset.from_tensors({
      'image': tf.zeros([views, size, size, 3]),
      'label': tf.constant(0, tf.int32), 'mask': tf.constant(False)}).repeat()
  if sizes[index]:
    ds = source.examples(splits[index]).map(preprocess,
                                            num_parallel_calls=AUTOTUNE)
    ds = ds.concatenate(padding)
  else:
    ds = padding
  ds = ds.take(num_batches * local_batch).batch(local_batch)
  ds = ds.map(lambda batch: _to_shards(batch, num_shards))
  ds = ds.prefetch(AUTOTUNE).with_options(_options(None))
  return EvalIterable(ds, num_batches)
