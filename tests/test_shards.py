"""Tests of alexnet/data/shards.py: prepare once, read instead of originals."""

import io
import os

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from alexnet.data import ops
from alexnet.data import shards
from alexnet.data import sources
from alexnet.errors import DatasetError
from configs import alexnet
import input_pipeline

RESIZE = 76
SPLITS = {'train': 7, 'validation': 4}


def _make_folder(root) -> None:
  """Smooth photo-like images of different shapes and formats."""
  rng = np.random.default_rng(0)
  for split, count in SPLITS.items():
    for i in range(count):
      height, width = [(90, 120), (120, 90), (80, 80)][i % 3]
      y, x = np.mgrid[0:height, 0:width] / 40
      phase = rng.uniform(0, 2 * np.pi, 3)
      pixels = 127 + 100 * np.stack([np.sin(x + 2 * y + p) for p in phase], -1)
      path = os.path.join(root, split, f'c{i % 2}',
                          f'{i}.{"png" if i % 2 else "jpg"}')
      os.makedirs(os.path.dirname(path), exist_ok=True)
      Image.fromarray(pixels.astype(np.uint8)).save(path)


@pytest.fixture(name='config')
def _config(tmp_path):
  _make_folder(tmp_path / 'images')
  config = alexnet.get_config('tiny')
  config.update(dict(dataset='folder', folder=str(tmp_path / 'images'),
                     data_dir=str(tmp_path / 'data'), train_split='train',
                     eval_split='validation', resize_size=RESIZE,
                     batch_size=2, eval_batch_size=2))
  return config


def _records(path):
  return [tf.train.Example.FromString(r) for r in
          tf.data.TFRecordDataset(path).as_numpy_iterator()]


def _decoded(example):
  data = example.features.feature['image'].bytes_list.value[0]
  return np.asarray(Image.open(io.BytesIO(data)).convert('RGB'))


def test_shard_bounds_cover_the_split_exactly():
  assert shards.shard_bounds(7, 3) == [(0, 2), (2, 4), (4, 7)]
  assert shards.shard_bounds(6, 3) == [(0, 3), (3, 6)]
  assert shards.shard_bounds(2, 1024) == [(0, 2)]


def test_prepare_writes_resized_squares_in_source_order(config):
  directory = shards.prepare(config, per_shard=3)
  source = sources.make_source(config)
  for split, count in SPLITS.items():
    names = sorted(f for f in os.listdir(directory) if f.startswith(split))
    assert len(names) == -(-count // 3)
    examples = [e for name in names
                for e in _records(os.path.join(directory, name))]
    originals = list(source.examples(split).as_numpy_iterator())
    assert len(examples) == count
    for example, (path, label) in zip(examples, originals):
      assert example.features.feature['label'].int64_list.value[0] == label
      image = _decoded(example)
      assert image.shape == (RESIZE, RESIZE, 3)
      want = ops.decode_centre_square(tf.io.read_file(path), RESIZE).numpy()
      # JPEG quality 90 of photo-like content: a level or two on average.
      assert np.abs(image.astype(float) - want).mean() < 2.0


def test_interrupted_prepare_is_never_read_and_resumes(config):
  # A file that vanishes after the scan makes prepare fail mid-way: of the
  # four training shards ([0, 1), [1, 3), [3, 5), [5, 7)), the second reads
  # it.
  source = sources.make_source(config)
  paths = [p.decode() for p, _ in source.examples('train[2:3]')
           .as_numpy_iterator()]
  os.rename(paths[0], paths[0] + '.away')
  with pytest.raises(tf.errors.NotFoundError):
    shards.prepare(config, per_shard=2)
  directory = shards.shards_directory(config, source.tag)
  written = sorted(os.listdir(directory))
  assert written == ['train-00000-of-00004.tfrecord',
                     'train-00001-of-00004.tfrecord.tmp']
  config.use_shards = True
  with pytest.raises(DatasetError, match='--mode=prepare'):
    input_pipeline.get_dataset_info(config)

  os.rename(paths[0] + '.away', paths[0])
  first = os.path.join(directory, written[0])
  before = os.stat(first).st_mtime_ns
  shards.prepare(config, per_shard=2)
  assert os.stat(first).st_mtime_ns == before  # Kept, not rewritten.
  assert sorted(os.listdir(directory)) == [
      'manifest.json', *(f'train-0000{i}-of-00004.tfrecord' for i in range(4)),
      'validation-00000-of-00002.tfrecord',
      'validation-00001-of-00002.tfrecord']
  info = input_pipeline.get_dataset_info(config)
  assert (info.num_train_examples, info.num_eval_examples) == (
      7, {'eval': 4})


def test_shards_source_reads_split_slices_across_shards(config):
  shards.prepare(config, per_shard=3)
  config.use_shards = True
  source = shards.shards_source(config)
  labels = lambda spec: [int(l) for _, l in source.examples(spec)
                         .as_numpy_iterator()]
  original = sources.make_source(config)
  want = [int(l) for _, l in original.examples('train').as_numpy_iterator()]
  assert labels('train') == want
  assert labels('train[2:6]') == want[2:6]  # Straddles shards 0-1 and 1-2.
  assert labels('train[5:]+validation[:1]') == want[5:] + labels(
      'validation')[:1]
  assert source.num_classes == 2 and source.tag != original.tag


def test_training_and_evaluation_read_the_shards(config, tmp_path):
  directory = shards.prepare(config, per_shard=4)
  # The shards' images (JPEG re-encoded, so unlike the originals' pixels),
  # decoded as the pipeline decodes them.
  names = sorted(f for f in os.listdir(directory)
                 if f.startswith('validation'))
  stored = [tf.io.decode_jpeg(
      e.features.feature['image'].bytes_list.value[0], channels=3).numpy()
            for name in names
            for e in _records(os.path.join(directory, name))]
  # Without the originals, only the shards can be read.
  os.rename(config.folder, tmp_path / 'originals_away')
  config.use_shards = True
  batch = next(input_pipeline.create_train_iterator(
      config, replicas=[0], num_replicas=1))
  assert batch['image'].shape == (1, 2, 67, 67, 3)
  assert batch['image'].dtype == np.uint8
  eval_batches = list(input_pipeline.create_eval_iterable(
      config, 'eval', replicas=[0], num_replicas=1))
  read = [image for b in eval_batches
          for image in b['image'][0][b['mask'][0]]]
  assert len(read) == 4
  for got, want in zip(read, stored, strict=True):
    np.testing.assert_array_equal(got, want)
