"""Tests of the Fashion-MNIST IDX builder (alexnet/data/fashion_mnist.py).

Every test writes its own small IDX files; none needs the Debian package.
"""

import gzip
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from alexnet import errors
from alexnet.data import fashion_mnist
from configs import alexnet as configs
import input_pipeline

_SIZES = {'train': 24, 'test': 10}


def _write_split_files(directory, seed=0):
  """Writes random IDX files for both splits; returns {split: arrays}."""
  rng = np.random.default_rng(seed)
  written = {}
  for split, (images_name, labels_name) in fashion_mnist.FILES.items():
    n = _SIZES[split]
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    fashion_mnist.write_idx(os.path.join(directory, images_name), images)
    fashion_mnist.write_idx(os.path.join(directory, labels_name), labels)
    written[split] = (images, labels)
  return written


def test_idx_header_layout_is_the_published_one(tmp_path):
  # Independent of write_idx's own code: magic 0x00000803, then big-endian
  # sizes, then the pixels row-major.
  path = str(tmp_path / 'x.gz')
  fashion_mnist.write_idx(path, np.arange(6, dtype=np.uint8).reshape(1, 2, 3))
  with gzip.open(path) as f:
    raw = f.read()
  assert raw == (b'\x00\x00\x08\x03' + b'\x00\x00\x00\x01'
                 + b'\x00\x00\x00\x02' + b'\x00\x00\x00\x03'
                 + bytes(range(6)))
  np.testing.assert_array_equal(fashion_mnist.read_idx(path, 3),
                                np.arange(6).reshape(1, 2, 3))


def test_read_split_returns_file_contents(tmp_path):
  written = _write_split_files(tmp_path)
  for split in ('train', 'test'):
    images, labels = fashion_mnist.read_split(str(tmp_path), split)
    np.testing.assert_array_equal(images, written[split][0])
    np.testing.assert_array_equal(labels, written[split][1])


def test_prepares_splits_with_every_example_and_label(tmp_path):
  (tmp_path / 'idx').mkdir()
  written = _write_split_files(tmp_path / 'idx')
  builder = fashion_mnist.prepare(str(tmp_path / 'tfds'),
                                  str(tmp_path / 'idx'))
  assert builder.is_prepared() and builder.name == 'fashion_mnist_idx'
  assert builder.info.features['label'].num_classes == 10
  for split, (images, labels) in written.items():
    assert builder.info.splits[split].num_examples == _SIZES[split]
    data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
    assert data['image'].shape == (_SIZES[split], 28, 28, 1)
    assert data['image'].dtype == np.uint8
    # TFDS shuffles on write: match every example to its file position by
    # its pixels (random images are distinct).
    lookup = {image.tobytes(): i for i, image in enumerate(images)}
    positions = [lookup[image[..., 0].tobytes()] for image in data['image']]
    assert sorted(positions) == list(range(_SIZES[split]))
    np.testing.assert_array_equal(data['label'], labels[positions])


def test_prepared_data_no_longer_need_the_files(tmp_path):
  _write_split_files(tmp_path)
  fashion_mnist.prepare(str(tmp_path / 'tfds'), str(tmp_path))
  for name in os.listdir(tmp_path):
    if name.endswith('.gz'):
      os.remove(tmp_path / name)
  builder = fashion_mnist.prepare(str(tmp_path / 'tfds'), str(tmp_path))
  assert builder.info.splits['train'].num_examples == _SIZES['train']


def test_missing_directory_says_how_to_get_the_data(tmp_path):
  with pytest.raises(errors.DatasetError,
                     match='apt-get install dataset-fashion-mnist'):
    fashion_mnist.prepare(str(tmp_path / 'tfds'), str(tmp_path / 'nowhere'))
  assert not (tmp_path / 'tfds' / 'fashion_mnist_idx').exists()


def test_missing_file_is_named(tmp_path):
  _write_split_files(tmp_path)
  os.remove(tmp_path / 't10k-labels-idx1-ubyte.gz')
  with pytest.raises(errors.DatasetError,
                     match='t10k-labels-idx1-ubyte.gz is missing.*apt-get'):
    fashion_mnist.prepare(str(tmp_path / 'tfds'), str(tmp_path))


def _corrupt(tmp_path, name, raw):
  _write_split_files(tmp_path)
  with gzip.open(tmp_path / name, 'wb') as f:
    f.write(raw)


def test_wrong_magic_number_is_refused(tmp_path):
  # A labels header (1 dimension) where images (3 dimensions) belong.
  _corrupt(tmp_path, 'train-images-idx3-ubyte.gz',
           b'\x00\x00\x08\x01\x00\x00\x00\x18' + bytes(24))
  with pytest.raises(errors.DatasetError, match='expected 00000803'):
    fashion_mnist.read_split(str(tmp_path), 'train')


def test_truncated_payload_is_refused(tmp_path):
  header = b'\x00\x00\x08\x03' + np.asarray([24, 28, 28], '>u4').tobytes()
  _corrupt(tmp_path, 'train-images-idx3-ubyte.gz',
           header + bytes(24 * 28 * 28 - 1))
  with pytest.raises(errors.DatasetError, match='truncated'):
    fashion_mnist.read_split(str(tmp_path), 'train')


def test_not_gzip_is_refused(tmp_path):
  _write_split_files(tmp_path)
  (tmp_path / 'train-labels-idx1-ubyte.gz').write_bytes(b'plain bytes')
  with pytest.raises(errors.DatasetError, match='not a readable gzip'):
    fashion_mnist.read_split(str(tmp_path), 'train')


def test_disagreeing_counts_and_bad_labels_are_refused(tmp_path):
  _write_split_files(tmp_path)
  labels_file = str(tmp_path / 'train-labels-idx1-ubyte.gz')
  fashion_mnist.write_idx(labels_file, np.zeros(23, np.uint8))
  with pytest.raises(errors.DatasetError, match='24 images but .* 23 labels'):
    fashion_mnist.read_split(str(tmp_path), 'train')
  fashion_mnist.write_idx(labels_file, np.full(24, 10, np.uint8))
  with pytest.raises(errors.DatasetError, match='label 10'):
    fashion_mnist.read_split(str(tmp_path), 'train')


def test_wrong_image_size_is_refused(tmp_path):
  _write_split_files(tmp_path)
  fashion_mnist.write_idx(str(tmp_path / 't10k-images-idx3-ubyte.gz'),
                          np.zeros((10, 32, 32), np.uint8))
  with pytest.raises(errors.DatasetError, match=r'\(32, 32\) pixels'):
    fashion_mnist.read_split(str(tmp_path), 'test')


def test_config_dataset_fashion_mnist_reads_the_idx_directory(tmp_path):
  # The config route: dataset='fashion_mnist' with fashion_mnist_dir set
  # trains on the IDX files' images, offline (no TFDS catalogue build).
  os.makedirs(tmp_path / 'idx')
  written = _write_split_files(tmp_path / 'idx')
  config = configs.get_config('fashion_mnist')
  config.update(dict(fashion_mnist_dir=str(tmp_path / 'idx'),
                     data_dir=str(tmp_path / 'data'), batch_size=8,
                     eval_batch_size=5))
  info = input_pipeline.get_dataset_info(config)
  # The variant trains on the first 90% of the training file and holds the
  # rest out (22 + 2 of 24 here); the test file is the eval split.
  assert (info.num_classes, info.num_train_examples,
          info.num_eval_examples) == (10, 22, {'eval': 10, 'minival': 2})
  batches = list(input_pipeline.create_eval_iterable(
      config, 'eval', replicas=[0], num_replicas=1))
  labels = np.concatenate([b['label'][0] for b in batches])
  # TFDS stores the records shuffled: the same examples, in its own order.
  np.testing.assert_array_equal(np.sort(labels), np.sort(written['test'][1]))
  squares = np.concatenate([b['image'][0] for b in batches])
  assert squares.shape == (10, 76, 76, 3)
  # Grey images: the three channels are equal.
  np.testing.assert_array_equal(squares[..., 0], squares[..., 2])
