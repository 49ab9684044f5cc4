"""Tests of alexnet/data/sources.py: folders, TFDS names, their errors."""

import logging
import os

from absl import logging as absl_logging
import numpy as np
from PIL import Image
import pytest

from alexnet.data import sources
from alexnet.errors import DatasetError
from configs import alexnet
import input_pipeline as ip


def _write(path, pixels: np.ndarray, **kwargs) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(pixels).save(path, **kwargs)


def _folder_config(root, data_dir):
  config = alexnet.get_config('tiny')
  config.update(dict(dataset='folder', folder=str(root),
                     data_dir=str(data_dir), train_split='train',
                     eval_split='validation'))
  return config


def _make_folder(root, splits: dict[str, int]) -> None:
  for split, count in splits.items():
    for i in range(count):
      _write(os.path.join(root, split, f'c{i % 2}', f'{i:03d}.png'),
             np.full((10, 14, 3), i, np.uint8))


def test_folder_skips_corrupt_jpeg_and_logs_one_warning(tmp_path, caplog):
  rng = np.random.default_rng(4)
  for cls in ('cat', 'dog'):
    for i in range(3):
      _write(tmp_path / 'train' / cls / f'{i}.jpg',
             rng.integers(0, 256, (12, 12, 3), dtype=np.uint8), format='JPEG')
  corrupt = tmp_path / 'train' / 'dog' / '1.jpg'
  corrupt.write_bytes(corrupt.read_bytes()[:200])  # Truncated.
  (tmp_path / 'train' / 'dog' / 'notes.txt').write_text('not an image')
  absl_logging.get_absl_logger().propagate = True
  splits = sources.FolderSplits(str(tmp_path))
  assert splits.classes == ['cat', 'dog']
  with caplog.at_level(logging.WARNING):
    scan = splits.scan('train')
    assert splits.scan('train') is scan  # Decoded once.
  assert scan.skipped == [str(corrupt)]
  assert len(scan.paths) == 5 and str(corrupt) not in scan.paths
  assert scan.labels == [0, 0, 0, 1, 1]
  assert splits['train'].num_examples == 5
  warnings = [r for r in caplog.records if 'undecodable' in r.getMessage()]
  assert len(warnings) == 1 and '1 undecodable' in warnings[0].getMessage()


def test_folder_source_is_scanned_once_per_process(tmp_path):
  _make_folder(tmp_path / 'images', {'train': 4})
  first = sources.folder_source(str(tmp_path / 'images'))
  again = sources.folder_source(str(tmp_path / 'images') + '/')
  assert again.split_sizes is first.split_sizes
  assert first.tag == again.tag and first.tag.startswith('folder-images-')
  examples = list(first.examples('train[1:3]').as_numpy_iterator())
  assert [(os.path.basename(p), l) for p, l in examples] == [
      (b'002.png', 0), (b'001.png', 1)]


def test_folder_errors_name_the_path(tmp_path):
  config = _folder_config(tmp_path / 'missing', tmp_path)
  with pytest.raises(DatasetError, match='missing'):
    ip.get_dataset_info(config)
  _make_folder(tmp_path / 'images', {'train': 4, 'validation': 2})
  os.makedirs(tmp_path / 'images' / 'validation' / 'c9')
  config = _folder_config(tmp_path / 'images', tmp_path)
  with pytest.raises(DatasetError) as error:
    ip.get_dataset_info(config)
  assert str(tmp_path / 'images' / 'validation' / 'c9') in str(error.value)
  config.eval_split = 'test'  # No such split folder.
  with pytest.raises(DatasetError, match='test'):
    ip.get_dataset_info(config)


def test_missing_imagenet_tars_say_where_they_go(tmp_path):
  config = alexnet.get_config()
  config.data_dir = str(tmp_path)
  with pytest.raises(DatasetError) as error:
    ip.get_dataset_info(config)
  message = str(error.value)
  assert 'ILSVRC2012_img_train.tar' in message
  assert 'ILSVRC2012_img_val.tar' in message
  assert os.path.join(str(tmp_path), 'downloads', 'manual') in message


def test_unknown_dataset_names_itself_and_the_offline_choices(tmp_path):
  config = _folder_config(tmp_path, tmp_path)
  config.dataset = 'no_such_dataset_xyz'
  with pytest.raises(DatasetError, match='no_such_dataset_xyz') as error:
    ip.get_dataset_info(config)
  for name in sources.OFFLINE_BUILDERS:
    assert repr(name) in str(error.value)
