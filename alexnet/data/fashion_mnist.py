"""Fashion-MNIST from its original IDX files, as an offline TFDS dataset.

Fashion-MNIST (Xiao et al. 2017) is 70,000 28x28 greyscale pictures of
clothing in 10 classes: 60,000 'train' and 10,000 'test'. It is distributed
as four gzipped IDX files,

    train-images-idx3-ubyte.gz  train-labels-idx1-ubyte.gz
    t10k-images-idx3-ubyte.gz   t10k-labels-idx1-ubyte.gz

which Debian ships in the package `dataset-fashion-mnist` (installed in
`DEBIAN_DIR`). This builder reads them from a directory and stores the
images as uint8 PNGs of shape (28, 28, 1), so preparing needs no network.
With a network, TFDS's own catalogue dataset `fashion_mnist` is the other
route (`tfds build fashion_mnist`).

The builder is named `fashion_mnist_idx`, so that it never shares a TFDS
data directory or registry entry with the catalogue's `fashion_mnist`.
Example keys are the positions in the IDX files.

Usage:

    builder = prepare(data_dir=None, idx_dir=DEBIAN_DIR)
    ds = builder.as_dataset(split='train')
"""

from collections.abc import Iterator
import gzip
import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from alexnet import errors
from alexnet.data import offline

# Where `apt-get install dataset-fashion-mnist` puts the four files.
DEBIAN_DIR = '/usr/share/datasets/fashion-mnist'
# Split -> (images file, labels file).
FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}
NUM_CLASSES = 10
IMAGE_SIZE = 28
CLASS_NAMES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat',
               'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot')
# IDX magic numbers: two zero bytes, 0x08 (unsigned byte data), the number
# of dimensions.
_UBYTE = 0x08
_IMAGES_DIMS = 3
_LABELS_DIMS = 1

HOW_TO_GET = (
    'Get the four Fashion-MNIST IDX files with `apt-get install '
    f'dataset-fashion-mnist` (Debian/Ubuntu; installs them in {DEBIAN_DIR}) '
    'or from https://github.com/zalandoresearch/fashion-mnist, and point '
    "config.fashion_mnist_dir at their directory; or set "
    "config.fashion_mnist_dir='' to read TFDS's `fashion_mnist` (prepare it "
    'where there is a network with `tfds build fashion_mnist`).')


def read_idx(path: str, num_dims: int) -> np.ndarray:
  """Reads one gzipped IDX file of unsigned bytes.

  Args:
    path: the .gz file.
    num_dims: dimensions the file must have (3 for images, 1 for labels).

  Returns:
    uint8 array of the shape the header gives.

  Raises:
    DatasetError: missing file, wrong magic number or a payload whose size
      differs from the header's.
  """
  if not os.path.isfile(path):
    raise errors.DatasetError(f'Fashion-MNIST file {path} is missing. '
                              + HOW_TO_GET)
  try:
    with gzip.open(path, 'rb') as f:
      data = f.read()
  except (OSError, EOFError) as e:
    raise errors.DatasetError(
        f'{path} is not a readable gzip file ({e}). ' + HOW_TO_GET) from e
  header = 4 + 4 * num_dims
  magic = bytes([0, 0, _UBYTE, num_dims])
  if len(data) < header or data[:4] != magic:
    raise errors.DatasetError(
        f'{path} is not an IDX file of {num_dims}-dimensional unsigned '
        f'bytes: it starts with {data[:4].hex()}, expected {magic.hex()}. '
        + HOW_TO_GET)
  shape = tuple(int(d) for d in np.frombuffer(data, '>u4', num_dims, 4))
  if len(data) - header != int(np.prod(shape)):
    raise errors.DatasetError(
        f'{path}: the header gives shape {shape} ({int(np.prod(shape))} '
        f'bytes) but {len(data) - header} bytes follow; the file is '
        'truncated or corrupt. ' + HOW_TO_GET)
  return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def write_idx(path: str, array: np.ndarray) -> None:
  """Writes a uint8 array as a gzipped IDX file (the inverse of `read_idx`).

  Lets tests, and anyone converting other data, produce the files this
  builder reads.

  Args:
    path: the .gz file to write.
    array: uint8 array of any shape.
  """
  array = np.asarray(array)
  if array.dtype != np.uint8:
    raise ValueError(f'IDX here holds unsigned bytes, got {array.dtype}.')
  header = bytes([0, 0, _UBYTE, array.ndim]) + np.asarray(
      array.shape, '>u4').tobytes()
  with gzip.open(path, 'wb') as f:
    f.write(header + array.tobytes())


def read_split(idx_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads and checks the images and labels of one split.

  Args:
    idx_dir: directory holding the four IDX .gz files.
    split: 'train' or 'test'.

  Returns:
    (uint8 images [n, 28, 28], uint8 labels [n]) in file order.

  Raises:
    DatasetError: missing directory or file, bad file, images and labels
      that disagree, or labels outside 0..9.
  """
  if not os.path.isdir(idx_dir):
    raise errors.DatasetError(
        f'Fashion-MNIST directory {idx_dir!r} does not exist. ' + HOW_TO_GET)
  images_file, labels_file = (os.path.join(idx_dir, name)
                              for name in FILES[split])
  images = read_idx(images_file, _IMAGES_DIMS)
  labels = read_idx(labels_file, _LABELS_DIMS)
  if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
    raise errors.DatasetError(
        f'{images_file} holds images of {images.shape[1:]} pixels, not '
        f'{IMAGE_SIZE}x{IMAGE_SIZE}. ' + HOW_TO_GET)
  if len(images) != len(labels):
    raise errors.DatasetError(
        f'{images_file} holds {len(images)} images but {labels_file} '
        f'{len(labels)} labels. ' + HOW_TO_GET)
  if labels.size and labels.max() >= NUM_CLASSES:
    raise errors.DatasetError(
        f'{labels_file} holds label {labels.max()}; Fashion-MNIST has '
        f'{NUM_CLASSES} classes. ' + HOW_TO_GET)
  return images, labels


class FashionMnistIdx(offline.OfflineBuilder, skip_registration=True):
  """Fashion-MNIST read from its four IDX files (offline)."""

  def __init__(self, *, idx_dir: str, **kwargs: Any):
    """Args: idx_dir: directory of the IDX files; kwargs: for TFDS."""
    self._idx_dir = idx_dir
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.image_info(
        description=('Fashion-MNIST (Xiao et al. 2017) read from its '
                     'original IDX files: 60,000 train and 10,000 test '
                     '28x28 greyscale images in 10 classes.'),
        image_shape=(IMAGE_SIZE, IMAGE_SIZE, 1),
        labels=tfds.features.ClassLabel(names=CLASS_NAMES),
        homepage='https://github.com/zalandoresearch/fashion-mnist')

  def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
    del dl_manager  # Nothing to download: the files are local.
    return {split: self._generate_examples(*read_split(self._idx_dir, split))
            for split in FILES}

  def _generate_examples(
      self, images: np.ndarray,
      labels: np.ndarray) -> Iterator[tuple[int, dict[str, Any]]]:
    for index, (image, label) in enumerate(zip(images, labels)):
      yield index, {'image': image[..., None], 'label': int(label)}


def prepare(data_dir: str | None, idx_dir: str) -> FashionMnistIdx:
  """Returns the builder, preparing it from the IDX files if not yet done.

  Once prepared (in `<data_dir>/fashion_mnist_idx`), the IDX files are no
  longer read; delete that directory to prepare again from other files.

  Args:
    data_dir: TFDS data directory; None for TFDS's default.
    idx_dir: directory holding the four IDX .gz files.

  Returns:
    A prepared `FashionMnistIdx` builder.

  Raises:
    DatasetError: the data are not prepared and the IDX files are missing
      or bad; the message says how to get them.
  """
  builder = FashionMnistIdx(idx_dir=idx_dir, data_dir=data_dir)
  if not builder.is_prepared():
    # Checked before TFDS starts writing, so a bad file leaves nothing
    # half-prepared behind.
    for split in FILES:
      read_split(idx_dir, split)
  return offline.prepare(builder)
