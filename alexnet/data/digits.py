"""scikit-learn's handwritten digits as an offline TFDS dataset.

The data are the 1,797 8x8 greyscale digits that ship inside scikit-learn
(`sklearn.datasets.load_digits`, values 0..16, 10 classes), so preparing the
dataset needs no network. Pixels are scaled to 0..255 (`round(v * 255 / 16)`)
and stored as uint8 PNGs of shape (8, 8, 1).

The split is FIXED and documented here (it never depends on library
versions): `numpy.random.RandomState(0).permutation(1797)`; the first 1,347
indices of that permutation are 'train' and the remaining 450 are 'test'
(a 75% / 25% split). Example keys are the indices into `load_digits()`.

Usage:

    builder = Digits(data_dir=...)   # None means TFDS's default data dir.
    builder.download_and_prepare()   # Offline; a no-op once prepared.
    ds = builder.as_dataset(split='train')
"""

from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from alexnet.data import offline

# The documented split (see module docstring).
SPLIT_SEED = 0
NUM_TRAIN = 1_347
NUM_TEST = 450
NUM_CLASSES = 10
_MAX_VALUE = 16  # load_digits() pixel values are integers 0..16.


def split_indices() -> dict[str, np.ndarray]:
  """Returns the fixed indices into `load_digits()` of each split.

  Returns:
    {'train': 1,347 indices, 'test': 450 indices}, disjoint and covering
    0..1796, each in permutation order.
  """
  order = np.random.RandomState(SPLIT_SEED).permutation(NUM_TRAIN + NUM_TEST)
  return {'train': order[:NUM_TRAIN], 'test': order[NUM_TRAIN:]}


def to_uint8(images: np.ndarray) -> np.ndarray:
  """Scales digits pixel values 0..16 to uint8 0..255.

  Args:
    images: [..., 8, 8] array with values 0..16.

  Returns:
    uint8 array [..., 8, 8, 1].
  """
  scaled = np.round(np.asarray(images, np.float64) * 255.0 / _MAX_VALUE)
  return scaled.astype(np.uint8)[..., None]


class Digits(offline.OfflineBuilder, skip_registration=True):
  """scikit-learn's 8x8 handwritten digits (offline; fixed 1,347/450 split)."""

  def _info(self) -> tfds.core.DatasetInfo:
    return self.image_info(
        description=(
            "scikit-learn's load_digits(): 1,797 8x8 handwritten digits, "
            'scaled to 0..255. Split: RandomState(0).permutation(1797); '
            'first 1,347 train, last 450 test.'),
        image_shape=(8, 8, 1),
        labels=tfds.features.ClassLabel(num_classes=NUM_CLASSES),
        homepage='https://scikit-learn.org/stable/datasets/toy_dataset.html')

  def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
    del dl_manager  # Nothing to download: the data ship with scikit-learn.
    return {name: self._generate_examples(indices)
            for name, indices in split_indices().items()}

  def _generate_examples(
      self, indices: np.ndarray) -> Iterator[tuple[int, dict[str, Any]]]:
    # Imported here so that reading an already prepared dataset does not
    # need scikit-learn.
    from sklearn import datasets  # pylint: disable=g-import-not-at-top
    digits = datasets.load_digits()
    images = to_uint8(digits.images)
    for index in indices:
      yield int(index), {'image': images[index],
                         'label': int(digits.target[index])}


def prepare(data_dir: str | None) -> Digits:
  """Returns the digits builder, preparing the data offline if missing.

  Args:
    data_dir: TFDS data directory; None for TFDS's default.

  Returns:
    A prepared `Digits` builder.
  """
  return offline.prepare(Digits(data_dir=data_dir))
