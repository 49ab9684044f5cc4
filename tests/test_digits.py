"""Tests of the offline digits builder (alexnet/data/digits.py)."""

import numpy as np
from sklearn import datasets
import tensorflow_datasets as tfds

from alexnet.data import digits


def test_split_is_fixed_disjoint_and_covering():
  indices = digits.split_indices()
  assert len(indices['train']) == 1_347 and len(indices['test']) == 450
  both = np.concatenate([indices['train'], indices['test']])
  assert sorted(both) == list(range(1_797))
  # The documented permutation, independent of library versions.
  np.testing.assert_array_equal(
      both, np.random.RandomState(0).permutation(1_797))


def test_prepares_offline_with_documented_sizes(tmp_path):
  builder = digits.prepare(str(tmp_path))
  assert builder.is_prepared()
  assert str(tmp_path) in str(builder.data_dir)
  assert builder.info.splits['train'].num_examples == 1_347
  assert builder.info.splits['test'].num_examples == 450
  assert builder.info.features['label'].num_classes == 10

  reference = datasets.load_digits()
  expected = digits.to_uint8(reference.images)
  test = tfds.as_numpy(builder.as_dataset(split='test', batch_size=-1))
  assert test['image'].shape == (450, 8, 8, 1)
  assert test['image'].dtype == np.uint8 and test['image'].max() == 255
  # Every test example is one of load_digits()'s test-split digits, with its
  # label (matched by pixels, since TFDS shuffles on write).
  test_ids = set(digits.split_indices()['test'].tolist())
  lookup = {expected[i].tobytes(): i for i in range(1_797)}
  for image, label in zip(test['image'], test['label']):
    index = lookup[image.tobytes()]
    assert index in test_ids
    assert reference.target[index] == label
  # A second call reuses the prepared data.
  assert digits.prepare(str(tmp_path)).is_prepared()


def test_to_uint8_scales_0_16_to_0_255():
  out = digits.to_uint8(np.array([[0, 8, 16]]))
  np.testing.assert_array_equal(out[..., 0], [[0, 128, 255]])
  assert out.dtype == np.uint8
