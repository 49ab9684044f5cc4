"""Training-set colour statistics: mean image and RGB principal components.

The paper (section 2) subtracts the per-pixel mean image of the training set
and (section 4.1) adds "fancy PCA" lighting noise along the eigenvectors of
the 3x3 covariance of RGB values over the training set. Following
docs/REFERENCE.md (Data), the mean is kept on the 0-255 scale and the
covariance is computed on [0,1]-scaled pixels (so eigenvalues are comparable
with the published ImageNet values below; the pipeline multiplies the shift
by 255).

Statistics are accumulated in float64 from batches of images that were
already resized and centre-cropped to resize_size, and cached as one .npz
per (dataset, split, resize_size), see `cache_path`; `colour_stats` reads the
cache or computes it from a source. `file_mean_image` reads a published
mean image instead (config.mean_file: Caffe's imagenet_mean.binaryproto or
a .npy array), for weights trained with it.
"""

import dataclasses
import os
import re
import tempfile

from absl import logging
from google.protobuf import message as protobuf_message
import ml_collections
import numpy as np
import tensorflow as tf

from alexnet import errors
from alexnet.data import ops
from alexnet.data import sources
from alexnet.importers import caffe_proto

# ImageNet's published values on [0,1]-scaled pixels (fb.resnet.torch;
# docs/REFERENCE.md, Data): eigenvalues in descending order and eigenvectors
# as columns (rows are R, G, B).
IMAGENET_EIGVALS = np.array([0.2175, 0.0188, 0.0045])
IMAGENET_EIGVECS = np.array([[-0.5675, 0.7192, 0.4009],
                             [-0.5808, -0.0045, -0.8140],
                             [-0.5836, -0.6948, 0.4203]])


@dataclasses.dataclass(frozen=True)
class ColourStats:
  """Colour statistics of a training split.

  Attributes:
    mean_image: float32 [resize_size, resize_size, 3], 0-255 scale.
    channel_mean: float32 [3], 0-255 scale (the mean of `mean_image`).
    eigvals: float64 [3], eigenvalues of the RGB covariance on [0,1] pixels,
      descending.
    eigvecs: float64 [3, 3], the matching unit eigenvectors as columns.
    num_examples: how many images the statistics were computed from.
  """
  mean_image: np.ndarray
  channel_mean: np.ndarray
  eigvals: np.ndarray
  eigvecs: np.ndarray
  num_examples: int


def principal_components(
    covariance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Eigen-decomposes a symmetric 3x3 covariance, largest eigenvalue first.

  Args:
    covariance: [3, 3] symmetric matrix.

  Returns:
    (eigvals [3] descending, eigvecs [3, 3] with eigenvectors as columns).
  """
  eigvals, eigvecs = np.linalg.eigh(covariance)
  order = np.argsort(eigvals)[::-1]
  return eigvals[order], eigvecs[:, order]


class StatsAccumulator:
  """Accumulates the mean image and RGB covariance over batches of images."""

  def __init__(self, resize_size: int):
    self._image_sum = np.zeros((resize_size, resize_size, 3), np.float64)
    self._rgb_sum = np.zeros(3, np.float64)
    self._rgb_outer = np.zeros((3, 3), np.float64)
    self._num_images = 0
    self._num_pixels = 0

  def update(self, images: np.ndarray) -> None:
    """Adds a batch of images.

    Args:
      images: [batch, resize_size, resize_size, 3] on the 0-255 scale.
    """
    images = np.asarray(images, np.float64)
    self._image_sum += images.sum(axis=0)
    pixels = images.reshape(-1, 3) / 255.0
    self._rgb_sum += pixels.sum(axis=0)
    self._rgb_outer += pixels.T @ pixels
    self._num_images += images.shape[0]
    self._num_pixels += pixels.shape[0]

  def result(self) -> ColourStats:
    """Returns the statistics of everything added so far.

    Returns:
      The `ColourStats`.

    Raises:
      ValueError: if no image was added.
    """
    if not self._num_images:
      raise ValueError('No images to compute colour statistics from.')
    mean_image = self._image_sum / self._num_images
    mean_rgb = self._rgb_sum / self._num_pixels
    # Population covariance E[x x^T] - mu mu^T; float64 keeps the
    # cancellation harmless even over a billion pixels.
    covariance = self._rgb_outer / self._num_pixels - np.outer(mean_rgb,
                                                               mean_rgb)
    eigvals, eigvecs = principal_components(covariance)
    return ColourStats(
        mean_image=mean_image.astype(np.float32),
        channel_mean=mean_image.mean(axis=(0, 1)).astype(np.float32),
        eigvals=eigvals,
        eigvecs=eigvecs,
        num_examples=self._num_images)


def cache_path(root: str, dataset: str, split: str, resize_size: int) -> str:
  """Returns where the statistics of a split are cached.

  Args:
    root: the TFDS data directory.
    dataset: a tag naming the dataset (e.g. 'digits', 'imagenet2012:5.1.0').
    split: the training split spec, e.g. 'train[:99%]'.
    resize_size: side of the square images the statistics were computed on.

  Returns:
    `<root>/alexnet_colour_stats/<dataset>/<split>_<resize_size>.npz`, with
    characters outside [A-Za-z0-9._-] replaced so specs make valid names.
  """
  def clean(text):
    return re.sub(r'[^A-Za-z0-9._-]', '_', text)
  return os.path.join(root, 'alexnet_colour_stats', clean(dataset),
                      f'{clean(split)}_{resize_size}.npz')


def save(path: str, stats: ColourStats) -> None:
  """Writes `stats` to `path` atomically (parallel processes may race).

  Args:
    path: destination .npz file; its directory is created if needed.
    stats: the statistics.
  """
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix='.npz')
  with os.fdopen(fd, 'wb') as f:
    np.savez(f, **dataclasses.asdict(stats))
  os.replace(tmp, path)


def load(path: str) -> ColourStats | None:
  """Reads statistics written by `save`; None if the file does not exist.

  Args:
    path: the .npz file.

  Returns:
    The statistics, or None.
  """
  if not os.path.exists(path):
    return None
  with np.load(path) as data:
    fields = {f.name: data[f.name] for f in dataclasses.fields(ColourStats)}
  fields['num_examples'] = int(fields['num_examples'])
  return ColourStats(**fields)


def compute(source: sources.Source, split: str,
            resize_size: int) -> ColourStats:
  """One pass over `split` (centre squares, resized) accumulating stats.

  Args:
    source: the data.
    split: a split spec of the source.
    resize_size: side of the squares.

  Returns:
    The statistics.
  """
  ds = source.examples(split).map(
      lambda data, label: ops.decode_centre_square(source.read(data),
                                                   resize_size),
      num_parallel_calls=tf.data.AUTOTUNE).batch(64).prefetch(
          tf.data.AUTOTUNE)
  accumulator = StatsAccumulator(resize_size)
  for images in ds.as_numpy_iterator():
    accumulator.update(images)
  return accumulator.result()


def colour_stats(config: ml_collections.ConfigDict,
                 source: sources.Source) -> ColourStats:
  """The training split's colour statistics, from the cache or computed.

  Args:
    config: uses train_split, resize_size, data_dir.
    source: the data.

  Returns:
    The statistics (cached under `cache_path`; recomputed when the cached
    example count or size does not match).
  """
  path = cache_path(sources.data_root(config), source.tag,
                    config.train_split, config.resize_size)
  expected = sources.num_examples(source, config.train_split)
  stats = load(path)
  if (stats is None or stats.num_examples != expected or
      stats.mean_image.shape[0] != config.resize_size):
    logging.info('Computing colour statistics of %s %s (%d images) -> %s',
                 source.tag, config.train_split, expected, path)
    stats = compute(source, config.train_split, config.resize_size)
    save(path, stats)
  return stats


def mean_image(stats: ColourStats, mean: str) -> np.ndarray:
  """The image subtracted from every input.

  Args:
    stats: the training split's statistics.
    mean: `config.mean`, 'pixel' (the paper's mean image) or 'channel'.

  Returns:
    float32 [resize_size, resize_size, 3], 0-255 scale.
  """
  if mean == 'pixel':
    return stats.mean_image
  return np.broadcast_to(stats.channel_mean, stats.mean_image.shape).copy()


def lighting_components(
    stats: ColourStats | None,
    pca_stats: str) -> tuple[np.ndarray, np.ndarray]:
  """(eigvals, eigvecs) the PCA lighting uses.

  Args:
    stats: the training split's statistics (unused, may be None, with
      'imagenet').
    pca_stats: `config.pca_stats`, 'dataset' or 'imagenet'.

  Returns:
    Eigenvalues [3] and eigenvectors [3, 3] (columns) on [0,1] pixels.
  """
  if pca_stats == 'dataset':
    return stats.eigvals, stats.eigvecs
  return IMAGENET_EIGVALS, IMAGENET_EIGVECS


def _read_mean_array(path: str) -> np.ndarray:
  """The array in a .binaryproto (a Caffe BlobProto) or a plain .npy."""
  if path.endswith('.npy'):
    return np.load(path, allow_pickle=False)  # A plain array: no pickle.
  with open(path, 'rb') as f:
    blob = caffe_proto.BlobProto.FromString(f.read())
  return caffe_proto.squeeze_leading(caffe_proto.blob_array(blob), 3)


def file_mean_image(config: ml_collections.ConfigDict) -> np.ndarray:
  """The mean image in config.mean_file, as `mean_image` gives it.

  The file holds [3, Z, Z] (channels first, as Caffe writes it; a leading
  1 is dropped) or [Z, Z, 3], in config.channel_order (Caffe's
  imagenet_mean.binaryproto: BGR, Z = 256) on the 0-255 scale.

  Args:
    config: uses mean_file, channel_order, resize_size and mean.

  Returns:
    float32 [resize_size, resize_size, 3] RGB: the file's image, or its
    channel mean broadcast (config.mean='channel').

  Raises:
    errors.DatasetError: a missing or unreadable file, or one of another
      size.
  """
  path, size = config.mean_file, config.resize_size
  try:
    array = _read_mean_array(path)
  except (OSError, ValueError, protobuf_message.DecodeError) as error:
    raise errors.DatasetError(
        f'config.mean_file={path!r} cannot be read ({error}). Give a Caffe '
        '.binaryproto (BVLC: data/ilsvrc12/get_ilsvrc_aux.sh fetches '
        "imagenet_mean.binaryproto) or a .npy array, or '' for the "
        "training set's own mean.") from None
  if array.ndim == 3 and array.shape[0] == 3 and array.shape[-1] != 3:
    array = array.transpose(1, 2, 0)
  if array.shape != (size, size, 3):
    raise errors.DatasetError(
        f'config.mean_file={path!r} holds an image of shape {array.shape}; '
        f'config.resize_size={size} needs [3, {size}, {size}] or '
        f'[{size}, {size}, 3].')
  if config.channel_order == 'bgr':
    array = array[..., ::-1]
  image = np.ascontiguousarray(array, np.float32)
  if config.mean == 'channel':
    image = np.broadcast_to(image.mean(axis=(0, 1)), image.shape).copy()
  return image
