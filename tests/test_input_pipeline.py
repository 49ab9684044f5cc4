"""Tests of input_pipeline.py: ops, sources, train/eval iterators.

Data are tiny: folders of a few constant-colour PNGs (so that an image's id
can be read back from any crop), the mocked imagenet2012 with checked-in
metadata, and synthetic arrays.
"""

import functools
import io
import logging
import os

from absl import logging as absl_logging
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from configs import alexnet
import input_pipeline as ip

TESTDATA = os.path.join(os.path.dirname(__file__), 'testdata')


# --- Helpers ----------------------------------------------------------------


def _encode(array: np.ndarray, fmt: str = 'PNG', **kwargs) -> bytes:
  buffer = io.BytesIO()
  image = Image.fromarray(array)
  if fmt == 'CMYK':
    image, fmt = image.convert('CMYK'), 'JPEG'
  image.save(buffer, fmt, **kwargs)
  return buffer.getvalue()


def _eager_and_mapped(fn, *args):
  """fn(*args) eagerly and inside tf.data.Dataset.map, as numpy."""
  eager = fn(*[tf.constant(a) for a in args])
  mapped = next(iter(tf.data.Dataset.from_tensors(tuple(args)).map(fn)))
  return np.asarray(eager), np.asarray(mapped)


def _id_colour(example_id: int) -> int:
  return 10 + 4 * example_id


def _make_folder(root, splits: dict[str, int], size=(10, 14)) -> None:
  """root/<split>/c<id % 2>/<id>.png, constant colour _id_colour(id)."""
  for split, count in splits.items():
    for example_id in range(count):
      class_dir = os.path.join(root, split, f'c{example_id % 2}')
      os.makedirs(class_dir, exist_ok=True)
      pixels = np.full((*size, 3), _id_colour(example_id), np.uint8)
      with open(os.path.join(class_dir, f'{example_id:03d}.png'), 'wb') as f:
        f.write(_encode(pixels))


def _folder_config(root, data_dir, **overrides):
  config = alexnet.get_config('tiny')
  config.dataset = 'folder'
  config.folder = str(root)
  config.data_dir = str(data_dir)
  config.train_split = 'train'
  config.eval_split = 'validation'
  config.resize_size = 8
  config.image_size = 5
  config.mean = 'channel'
  config.ten_crop = False
  config.update(overrides)
  return config


def _ids(config, images: np.ndarray, mask=True) -> np.ndarray:
  """Reads example ids back from un-augmented constant-colour crops."""
  stats = ip.colour_stats(config, ip.make_source(config))
  red = images[..., 0, 0, 0] + stats.channel_mean[0]
  ids = (red - 10) / 4
  np.testing.assert_allclose(ids[mask], np.round(ids[mask]), atol=1e-3)
  return np.round(ids).astype(int)


@pytest.fixture(name='folder')
def _folder_fixture(tmp_path):
  _make_folder(tmp_path / 'images', {'train': 24, 'validation': 13})
  return tmp_path / 'images'


# --- Preprocessing ops, eagerly and inside Dataset.map -----------------------


def test_decode_rgb_converts_grey_rgba_and_cmyk():
  rng = np.random.default_rng(0)
  grey = rng.integers(0, 256, (6, 9), dtype=np.uint8)
  for out in _eager_and_mapped(ip.decode_rgb, _encode(grey)):
    assert out.shape == (6, 9, 3)
    np.testing.assert_array_equal(out, np.repeat(grey[..., None], 3, -1))
  rgba = rng.integers(0, 256, (5, 4, 4), dtype=np.uint8)
  for out in _eager_and_mapped(ip.decode_rgb, _encode(rgba)):
    np.testing.assert_array_equal(out, rgba[..., :3])
  smooth = np.tile(np.linspace(0, 255, 16, dtype=np.uint8)[:, None, None],
                   (1, 16, 3))
  cmyk = _encode(smooth, 'CMYK', quality=95)
  pil_rgb = np.asarray(Image.open(io.BytesIO(cmyk)).convert('RGB'), float)
  for out in _eager_and_mapped(ip.decode_rgb, cmyk):
    assert out.shape == (16, 16, 3)
    assert np.abs(out - pil_rgb).mean() < 3


def test_decode_centre_square_cuts_the_middle_and_resizes():
  rng = np.random.default_rng(1)
  pixels = rng.integers(0, 256, (6, 10, 3), dtype=np.uint8)
  fn = functools.partial(ip.decode_centre_square, resize_size=6)
  for out in _eager_and_mapped(fn, _encode(pixels)):
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, pixels[:, 2:8])
  # Downscaling: shape exact, a constant image stays constant.
  flat = np.full((9, 5, 3), 77, np.uint8)
  fn = functools.partial(ip.decode_centre_square, resize_size=3)
  for out in _eager_and_mapped(fn, _encode(flat)):
    assert out.shape == (3, 3, 3)
    np.testing.assert_allclose(out, 77, atol=1e-3)


def test_decode_crop_fused_jpeg_path_matches_decode_then_crop():
  rng = np.random.default_rng(2)
  pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
  jpeg = _encode(pixels, 'JPEG', quality=95, subsampling=0)
  assert bool(ip.is_square_jpeg(tf.constant(jpeg), 16))
  assert not bool(ip.is_square_jpeg(tf.constant(jpeg), 15))
  assert not bool(ip.is_square_jpeg(tf.constant(_encode(pixels)), 16))
  decoded = ip.decode_rgb(tf.constant(jpeg)).numpy().astype(np.float32)
  fn = lambda data, offset: ip.decode_crop(data, 16, 8, offset)
  for out in _eager_and_mapped(fn, jpeg, np.array([3, 5], np.int32)):
    assert out.shape == (8, 8, 3)
    np.testing.assert_allclose(out, decoded[3:11, 5:13], atol=2)
  # General path (PNG, not square): centre square, then the window.
  wide = rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)
  for out in _eager_and_mapped(fn, _encode(wide), np.array([8, 0], np.int32)):
    np.testing.assert_array_equal(out, wide[8:16, 2:10])


def test_random_crop_offsets_reach_every_offset_with_exact_shape():
  key = ip.epoch_key(0, tf.constant(0), 0)
  fn = lambda k: ip.random_crop_offsets(k, 600, 6, 3)
  for offsets in _eager_and_mapped(fn, key):
    assert offsets.shape == (600, 2)
    assert {tuple(o) for o in offsets} == {(y, x) for y in range(4)
                                           for x in range(4)}
  image = np.arange(6 * 6 * 3, dtype=np.float32).reshape(6, 6, 3)
  fn = lambda im, off: ip.crop(im, off, 3)
  for out in _eager_and_mapped(fn, image, np.array([3, 1], np.int32)):
    np.testing.assert_array_equal(out, image[3:6, 1:4])


def test_random_flip_reflects_about_half_the_time():
  key = ip.epoch_key(1, tf.constant(0), 0)
  flips, mapped = _eager_and_mapped(lambda k: ip.random_flips(k, 2000), key)
  np.testing.assert_array_equal(flips, mapped)
  assert 0.45 < flips.mean() < 0.55
  image = np.arange(12, dtype=np.float32).reshape(2, 2, 3)
  for flip, expected in ((True, image[:, ::-1]), (False, image)):
    for out in _eager_and_mapped(ip.flip_if, image, flip):
      np.testing.assert_array_equal(out, expected)


def test_epoch_draws_differ_by_epoch_process_and_seed():
  draw = lambda *a: ip.draw_augmentation(ip.epoch_key(*a), 64, 8, 5, 0.1,
                                         np.ones(3), np.eye(3)).shifts
  reference = draw(0, 0, 0).numpy()
  np.testing.assert_array_equal(draw(0, 0, 0).numpy(), reference)
  for other in ((1, 0, 0), (0, 1, 0), (0, 0, 1)):
    assert not np.allclose(draw(*other).numpy(), reference)


def test_lighting_shift_covariance_matches_formula():
  rng = np.random.default_rng(3)
  eigvecs, _ = np.linalg.qr(rng.normal(size=(3, 3)))
  eigvals = np.array([0.2, 0.05, 0.01])
  sigma = 0.1
  fn = lambda k: ip.lighting_shifts(k, 20_000, sigma, eigvals, eigvecs)
  key = ip.epoch_key(2, tf.constant(0), 0)
  eager, mapped = _eager_and_mapped(fn, key)
  np.testing.assert_allclose(eager, mapped, rtol=1e-5, atol=1e-5)
  draws = eager.astype(np.float64)
  expected = 255**2 * sigma**2 * eigvecs @ np.diag(eigvals**2) @ eigvecs.T
  empirical = np.cov(draws.T)
  assert np.abs(draws.mean(axis=0)).max() < 0.1
  np.testing.assert_allclose(empirical, expected,
                             atol=0.04 * np.abs(expected).max())
  # sigma = 0 disables the lighting noise.
  zero = ip.lighting_shifts(key, 10, 0.0, eigvals, eigvecs).numpy()
  assert not zero.any()


def test_ten_crop_views_and_order():
  y, x = np.meshgrid(np.arange(8), np.arange(8), indexing='ij')
  image = np.stack([y, x], -1).astype(np.float32)
  fn = lambda im: ip.ten_crop(im, 4)
  windows = [(2, 2), (0, 0), (0, 4), (4, 0), (4, 4)]  # centre, TL, TR, BL, BR
  for views in _eager_and_mapped(fn, image):
    assert views.shape == (10, 4, 4, 2)
    for i, (top, left) in enumerate(windows):
      expected = image[top:top + 4, left:left + 4]
      np.testing.assert_array_equal(views[i], expected)
      np.testing.assert_array_equal(views[i + 5], expected[:, ::-1])


# --- Folder sources and errors ----------------------------------------------


def test_folder_skips_corrupt_jpeg_and_logs_one_warning(tmp_path, caplog):
  rng = np.random.default_rng(4)
  for cls in ('cat', 'dog'):
    os.makedirs(tmp_path / 'train' / cls)
    for i in range(3):
      pixels = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
      (tmp_path / 'train' / cls / f'{i}.jpg').write_bytes(
          _encode(pixels, 'JPEG'))
  corrupt = tmp_path / 'train' / 'dog' / '1.jpg'
  corrupt.write_bytes(corrupt.read_bytes()[:200])  # Truncated.
  (tmp_path / 'train' / 'dog' / 'notes.txt').write_text('not an image')
  absl_logging.get_absl_logger().propagate = True
  with caplog.at_level(logging.WARNING):
    scan = ip.scan_folder_split(str(tmp_path), 'train', ['cat', 'dog'])
  assert scan.skipped == [str(corrupt)]
  assert len(scan.paths) == 5 and str(corrupt) not in scan.paths
  assert scan.labels == [0, 0, 0, 1, 1]
  warnings = [r for r in caplog.records if 'undecodable' in r.getMessage()]
  assert len(warnings) == 1 and '1 undecodable' in warnings[0].getMessage()


def test_folder_errors_name_the_path(tmp_path):
  config = _folder_config(tmp_path / 'missing', tmp_path)
  with pytest.raises(ip.DatasetError, match='missing'):
    ip.get_dataset_info(config)
  _make_folder(tmp_path / 'images', {'train': 4, 'validation': 2})
  os.makedirs(tmp_path / 'images' / 'validation' / 'c9')
  config = _folder_config(tmp_path / 'images', tmp_path)
  with pytest.raises(ip.DatasetError) as error:
    ip.get_dataset_info(config)
  assert str(tmp_path / 'images' / 'validation' / 'c9') in str(error.value)
  config.eval_split = 'test'  # No such split folder.
  with pytest.raises(ip.DatasetError, match='test'):
    ip.get_dataset_info(config)


def test_missing_imagenet_tars_say_where_they_go(tmp_path):
  config = alexnet.get_config()
  config.data_dir = str(tmp_path)
  with pytest.raises(ip.DatasetError) as error:
    ip.get_dataset_info(config)
  message = str(error.value)
  assert 'ILSVRC2012_img_train.tar' in message
  assert 'ILSVRC2012_img_val.tar' in message
  assert os.path.join(str(tmp_path), 'downloads', 'manual') in message


def test_unknown_dataset_and_bad_batch_size(tmp_path, folder):
  config = _folder_config(folder, tmp_path, dataset='no_such_dataset_xyz')
  with pytest.raises(ip.DatasetError, match='no_such_dataset_xyz'):
    ip.get_dataset_info(config)
  config = _folder_config(folder, tmp_path, batch_size=6)
  with pytest.raises(ip.DatasetError, match='batch_size=6'):
    ip.create_train_iterator(config, num_shards=4)


# --- Training iterator ---------------------------------------------------------


def test_train_batches_shapes_and_one_epoch_is_a_permutation(tmp_path,
                                                             folder):
  config = _folder_config(folder, tmp_path, random_flip=False, pca_sigma=0.0)
  info = ip.get_dataset_info(config)
  assert info == ip.DatasetInfo(num_classes=2, num_train_examples=24,
                                num_eval_examples={'eval': 13})
  assert ip.steps_per_epoch(config, info) == 3
  iterator = ip.create_train_iterator(config, num_shards=2)
  batches = [next(iterator) for _ in range(6)]
  assert batches[0]['image'].shape == (2, 4, 5, 5, 3)
  assert batches[0]['image'].dtype == np.float32
  assert batches[0]['label'].shape == (2, 4)
  assert batches[0]['label'].dtype == np.int32
  ids = [_ids(config, b['image']).ravel() for b in batches]
  labels = [b['label'].ravel() for b in batches]
  epoch0, epoch1 = np.concatenate(ids[:3]), np.concatenate(ids[3:])
  assert sorted(epoch0) == sorted(epoch1) == list(range(24))
  assert not np.array_equal(epoch0, epoch1)  # A new order every epoch.
  np.testing.assert_array_equal(np.concatenate(labels[:3]), epoch0 % 2)


def test_resume_and_runs_are_deterministic(tmp_path, folder):
  config = _folder_config(folder, tmp_path, pca_sigma=0.1)
  reference = ip.create_train_iterator(config, num_shards=1)
  first = [next(reference) for _ in range(8)]
  again = ip.create_train_iterator(config, num_shards=1)
  for batch in first:
    np.testing.assert_array_equal(next(again)['image'], batch['image'])
  for start in (2, 4):  # Mid-epoch, and an epoch boundary.
    resumed = ip.create_train_iterator(config, num_shards=1, start_step=start)
    for batch in first[start:]:
      other = next(resumed)
      np.testing.assert_array_equal(other['image'], batch['image'])
      np.testing.assert_array_equal(other['label'], batch['label'])
  config.seed = 1
  reseeded = ip.create_train_iterator(config, num_shards=1)
  assert not np.array_equal(next(reseeded)['image'], first[0]['image'])


def test_processes_get_disjoint_covering_train_slices(tmp_path, folder):
  config = _folder_config(folder, tmp_path, random_flip=False, pca_sigma=0.0,
                          batch_size=6)
  info = ip.get_dataset_info(config)
  assert ip.steps_per_epoch(config, info, process_count=3) == 4
  seen = []
  for index in range(3):
    iterator = ip.create_train_iterator(config, num_shards=1,
                                        process_index=index, process_count=3)
    ids = np.concatenate([_ids(config, next(iterator)['image']).ravel()
                          for _ in range(4)])
    assert len(set(ids)) == 8  # One epoch: each of its 8 examples once.
    seen.append(set(ids))
  assert set.union(*seen) == set(range(24))
  assert sum(map(len, seen)) == 24


# --- Evaluation -----------------------------------------------------------------


@pytest.mark.parametrize('process_count', [1, 2])
def test_eval_counts_every_example_exactly_once(tmp_path, folder,
                                                process_count):
  config = _folder_config(folder, tmp_path, eval_batch_size=4)
  num_shards = 2 // process_count
  found, lengths = [], []
  for index in range(process_count):
    iterable = ip.create_eval_iterable(config, 'eval', num_shards=num_shards,
                                       process_index=index,
                                       process_count=process_count)
    passes = [list(iterable), list(iterable)]  # Re-iterable, same order.
    for a, b in zip(*passes):
      np.testing.assert_array_equal(a['image'], b['image'])
    lengths.append(len(passes[0]))
    assert len(iterable) == len(passes[0])
    for batch in passes[0]:
      assert batch['image'].shape == (num_shards, 2, 1, 5, 5, 3)
      assert batch['mask'].dtype == bool and batch['label'].dtype == np.int32
      mask = batch['mask']
      ids = _ids(config, batch['image'][:, :, 0], mask)
      found += list(ids[mask])
      np.testing.assert_array_equal(batch['label'][mask], ids[mask] % 2)
      assert not batch['image'][~mask].any()
  assert len(set(lengths)) == 1
  assert sorted(found) == list(range(13))


def test_minival_is_evaluated_like_eval(tmp_path, folder):
  config = _folder_config(folder, tmp_path, train_split='train[:20]',
                          minival_split='train[20:]', eval_batch_size=4)
  info = ip.get_dataset_info(config)
  assert info.num_train_examples == 20
  assert info.num_eval_examples == {'eval': 13, 'minival': 4}
  batches = list(ip.create_eval_iterable(config, 'minival', num_shards=1))
  assert len(batches) == 1 and batches[0]['mask'].all()
  # Folder order is class then name: train[20:] holds ids 17, 19, 21, 23.
  assert sorted(_ids(config, batches[0]['image'][:, :, 0]).ravel()) == [
      17, 19, 21, 23]


def test_mean_image_matches_numpy_and_is_subtracted(tmp_path):
  rng = np.random.default_rng(5)
  images = {}
  for split, count in (('train', 5), ('validation', 1)):
    for i in range(count):
      os.makedirs(tmp_path / split / f'c{i % 2}', exist_ok=True)
      images[split, i] = rng.integers(0, 256, (10, 14, 3), dtype=np.uint8)
      (tmp_path / split / f'c{i % 2}' / f'{i}.png').write_bytes(
          _encode(images[split, i]))
  config = _folder_config(tmp_path, tmp_path / 'data', mean='pixel',
                          ten_crop=True, resize_size=10, image_size=10,
                          eval_batch_size=2)
  stats = ip.colour_stats(config, ip.make_source(config))
  # The centre 10x10 square of each 10x14 training image, averaged by numpy.
  expected = np.mean([images['train', i][:, 2:12] for i in range(5)],
                     axis=0, dtype=np.float64)
  np.testing.assert_allclose(stats.mean_image, expected, rtol=1e-6)
  cached = ip.colour.cache_path(str(tmp_path / 'data'),
                                ip.make_source(config).tag, 'train', 10)
  assert os.path.exists(cached)
  batch = next(iter(ip.create_eval_iterable(config, 'eval', num_shards=1)))
  views = batch['image'][0, 0]  # [10 views, 10, 10, 3]
  centred = images['validation', 0][:, 2:12] - expected
  np.testing.assert_allclose(views[0], centred, atol=1e-3)
  np.testing.assert_allclose(views[5], centred[:, ::-1], atol=1e-3)


# --- Mocked imagenet2012 (checked-in metadata) -------------------------------


def test_mock_imagenet_goes_through_train_and_eval(tmp_path):
  config = alexnet.get_config('tiny')
  config.update(dict(dataset='imagenet2012', data_dir=str(tmp_path),
                     train_split='train', eval_split='validation',
                     resize_size=16, image_size=12, batch_size=8,
                     eval_batch_size=6))
  with tfds.testing.mock_data(num_examples=16, data_dir=TESTDATA,
                              policy=tfds.testing.MockPolicy.USE_FILES):
    info = ip.get_dataset_info(config)
    assert info == ip.DatasetInfo(num_classes=1000, num_train_examples=16,
                                  num_eval_examples={'eval': 16})
    batch = next(ip.create_train_iterator(config, num_shards=2))
    assert batch['image'].shape == (2, 4, 12, 12, 3)
    assert np.isfinite(batch['image']).all() and batch['image'].std() > 1
    assert ((batch['label'] >= 0) & (batch['label'] < 1000)).all()
    batches = list(ip.create_eval_iterable(config, 'eval', num_shards=2))
  assert len(batches) == 3
  assert batches[0]['image'].shape == (2, 3, 10, 12, 12, 3)
  assert sum(b['mask'].sum() for b in batches) == 16
  views = batches[0]['image'][0, 0]
  np.testing.assert_array_equal(views[5], views[0][:, ::-1])
