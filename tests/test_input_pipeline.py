"""Tests of input_pipeline.py: train/eval iterators, uint8 == float pipeline.

Data are tiny: folders of a few constant-colour PNGs (so that an image's id
can be read back from any crop), folders of random images (for exact
comparisons with the float oracle), and the mocked imagenet2012 with
checked-in metadata.
"""

import os

import jax
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from alexnet.data import colour
from alexnet.data import epochs
from alexnet.data import on_device
from alexnet.data import ops
from alexnet.data import sources
from alexnet.errors import ConfigError
from configs import alexnet
import input_pipeline as ip

TESTDATA = os.path.join(os.path.dirname(__file__), 'testdata')
KEYS = ('image', 'offset', 'flip', 'shift', 'label')


# --- Helpers ----------------------------------------------------------------


def _id_colour(example_id: int) -> int:
  return 10 + 4 * example_id


def _make_folder(root, splits: dict[str, int], size=(10, 14)) -> None:
  """root/<split>/c<id % 2>/<id>.png, constant colour _id_colour(id)."""
  for split, count in splits.items():
    for example_id in range(count):
      class_dir = os.path.join(root, split, f'c{example_id % 2}')
      os.makedirs(class_dir, exist_ok=True)
      pixels = np.full((*size, 3), _id_colour(example_id), np.uint8)
      Image.fromarray(pixels).save(
          os.path.join(class_dir, f'{example_id:03d}.png'))


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


def _ids(images: np.ndarray, mask=True) -> np.ndarray:
  """Reads example ids back from uint8 crops of constant-colour images."""
  ids = (images[..., 0, 0, 0].astype(float) - 10) / 4
  np.testing.assert_allclose(ids[mask], np.round(ids[mask]), atol=1e-3)
  return np.round(ids).astype(int)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.fixture(name='folder')
def _folder_fixture(tmp_path):
  _make_folder(tmp_path / 'images', {'train': 24, 'validation': 13})
  return tmp_path / 'images'


def test_config_choices_and_batch_size_are_refused(tmp_path, folder):
  for field, value in (('mean', 'median'), ('pca_stats', 'cifar')):
    config = _folder_config(folder, tmp_path, **{field: value})
    with pytest.raises(ConfigError, match=f'config.{field}={value!r}'):
      ip.get_dataset_info(config)
  config = _folder_config(folder, tmp_path, batch_size=6)
  with pytest.raises(ConfigError, match='batch_size=6'):
    ip.create_train_iterator(config, replicas=[0, 1, 2, 3], num_replicas=4)
  with pytest.raises(ValueError, match='replicas'):
    ip.create_train_iterator(config, replicas=[3], num_replicas=3)


# --- Training iterator --------------------------------------------------------


def test_train_batches_shapes_and_one_epoch_is_a_permutation(tmp_path,
                                                             folder):
  config = _folder_config(folder, tmp_path, random_flip=False, pca_sigma=0.0)
  info = ip.get_dataset_info(config)
  assert info == ip.DatasetInfo(num_classes=2, num_train_examples=24,
                                num_eval_examples={'eval': 13})
  assert ip.steps_per_epoch(config, info, 1) == 3
  assert ip.steps_per_epoch(config, info, 2) == 3
  iterator = ip.create_train_iterator(config, replicas=[0, 1],
                                      num_replicas=2)
  batches = _take(iterator, 6)
  shapes = {'image': ((2, 4, 5, 5, 3), np.uint8),
            'offset': ((2, 4, 2), np.int32), 'flip': ((2, 4), bool),
            'shift': ((2, 4, 3), np.float32), 'label': ((2, 4), np.int32)}
  for key, (shape, dtype) in shapes.items():
    assert batches[0][key].shape == shape and batches[0][key].dtype == dtype
  for batch in batches:
    assert not batch['flip'].any() and not batch['shift'].any()
    assert ((batch['offset'] >= 0) & (batch['offset'] <= 3)).all()
  ids = [_ids(b['image']).ravel() for b in batches]
  labels = [b['label'].ravel() for b in batches]
  epoch0, epoch1 = np.concatenate(ids[:3]), np.concatenate(ids[3:])
  assert sorted(epoch0) == sorted(epoch1) == list(range(24))
  assert not np.array_equal(epoch0, epoch1)  # A new order every epoch.
  np.testing.assert_array_equal(np.concatenate(labels[:3]), epoch0 % 2)


def test_resume_and_runs_are_deterministic(tmp_path, folder):
  config = _folder_config(folder, tmp_path, pca_sigma=0.1)
  create = lambda start=0: ip.create_train_iterator(
      config, replicas=[0], num_replicas=1, start_step=start)
  first = _take(create(), 8)
  assert any(b['flip'].any() for b in first)
  assert all(b['shift'].any() for b in first)
  for batch, other in zip(first, create()):
    _assert_batches_equal(other, batch)
  for start in (2, 4):  # Mid-epoch, and an epoch boundary.
    for batch, other in zip(first[start:], create(start)):
      _assert_batches_equal(other, batch)
  config.seed = 1
  reseeded = next(create())
  assert not np.array_equal(reseeded['image'], first[0]['image'])


def test_replica_slices_do_not_depend_on_the_process_layout(tmp_path,
                                                            folder):
  """2 processes x 2 replicas == 1 process x 4 == 4 processes x 1, resumed."""
  config = _folder_config(folder, tmp_path, batch_size=8, pca_sigma=0.1)
  create = lambda replicas, start=0: ip.create_train_iterator(
      config, replicas=replicas, num_replicas=4, start_step=start)
  whole = _take(create([0, 1, 2, 3]), 4)  # 3 steps per epoch.
  for process in ([0, 1], [2, 3], [3], [2, 0]):
    for step, batch in enumerate(_take(create(process), 4)):
      _assert_batches_equal(
          batch, {k: v[process] for k, v in whole[step].items()})
  for step, batch in zip((2, 3), create([2, 3], start=2)):
    _assert_batches_equal(batch, {k: v[2:] for k, v in whole[step].items()})
  ids = [set(np.concatenate([_ids(b['image'][r]) for b in whole[:3]]))
         for r in range(4)]
  assert all(len(s) == 6 for s in ids)  # One epoch: its 6 examples once.
  assert set.union(*ids) == set(range(24))


def test_processes_get_disjoint_covering_train_slices(tmp_path, folder):
  config = _folder_config(folder, tmp_path, random_flip=False, pca_sigma=0.0,
                          batch_size=6)
  info = ip.get_dataset_info(config)
  assert ip.steps_per_epoch(config, info, 3) == 4
  seen = []
  for index in range(3):
    iterator = ip.create_train_iterator(config, replicas=[index],
                                        num_replicas=3)
    ids = np.concatenate([_ids(b['image']).ravel()
                          for b in _take(iterator, 4)])
    assert len(set(ids)) == 8  # One epoch: each of its 8 examples once.
    seen.append(set(ids))
  assert set.union(*seen) == set(range(24))
  assert sum(map(len, seen)) == 24


def test_without_random_crop_training_uses_the_centre(tmp_path, folder):
  config = _folder_config(folder, tmp_path, random_crop=False)
  batches = _take(ip.create_train_iterator(config, replicas=[0, 1],
                                           num_replicas=2), 3)
  for batch in batches:
    assert (batch['offset'] == (8 - 5) // 2).all()
  config.random_crop = True
  offsets = np.concatenate([b['offset'].reshape(-1, 2) for b in _take(
      ip.create_train_iterator(config, replicas=[0, 1], num_replicas=2), 3)])
  assert len({tuple(o) for o in offsets}) > 1


# --- uint8 on the wire + on_device == the float pipeline ----------------------


def _random_folder(root, count: int) -> None:
  """Random images taking every decode path: resized PNGs, 8x8 JPEGs (the
  fused decode-and-crop) and 12x9 JPEGs (centre square, then resize)."""
  rng = np.random.default_rng(7)
  for i in range(count):
    split = 'train' if i < 16 else 'validation'
    path = os.path.join(root, split, f'c{i % 2}', f'{i:03d}')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    shape, ext = [((10, 14), '.png'), ((8, 8), '.jpg'), ((12, 9), '.jpg')][
        i % 3]
    Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(
        path + ext)


def _float_train_oracle(config, replica: int, num_replicas: int):
  """The float pipeline the uint8 wire replaced, built from the ops.

  Same examples and augmentation draws (`epochs.train_examples`); decode
  the crop, subtract the mean's crop, reflect, add the shift, all on the host.
  """
  source = sources.make_source(config)
  stats = colour.colour_stats(config, source)
  mean = tf.constant(ip.mean_image(config))
  steps = ip.steps_per_epoch(config, ip.get_dataset_info(config),
                             num_replicas)
  size, resize = config.image_size, config.resize_size

  def augment(data, label, offset, flip, shift):
    image = tf.cast(ops.decode_crop(source.read(data), resize, size, offset),
                    tf.float32)
    image -= ops.crop(mean, offset, size)
    return ops.flip_if(image, flip) + shift, label

  ds = epochs.train_examples(
      config, source, colour.lighting_components(stats, config.pca_stats),
      replica=replica, num_replicas=num_replicas, steps_per_epoch=steps)
  ds = ds.map(augment).batch(config.batch_size // num_replicas)
  return ds.as_numpy_iterator()


@pytest.mark.parametrize('mean', ['pixel', 'channel'])
def test_uint8_train_batches_on_device_equal_the_float_pipeline(tmp_path,
                                                                mean):
  _random_folder(tmp_path / 'images', 22)
  config = _folder_config(tmp_path / 'images', tmp_path, mean=mean,
                          pca_sigma=0.1, pca_stats='dataset', batch_size=4)
  mean_image = ip.mean_image(config)
  assert mean_image.shape == (8, 8, 3) and mean_image.dtype == np.float32
  to_float = jax.jit(jax.vmap(on_device.train_images, in_axes=(0, None)))
  batches = _take(ip.create_train_iterator(config, replicas=[0, 1],
                                           num_replicas=2), 8)  # 2 epochs.
  assert any(b['flip'].any() for b in batches)
  images = np.asarray(to_float(_join_steps(batches), mean_image))
  for replica in range(2):
    oracle = _take(_float_train_oracle(config, replica, 2), 8)
    expected = np.concatenate([image for image, _ in oracle])
    assert np.abs(expected).max() > 10
    np.testing.assert_allclose(images[replica], expected, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(
        np.concatenate([b['label'][replica] for b in batches]),
        np.concatenate([label for _, label in oracle]))


def _join_steps(batches):
  """[steps] of [R, b, ...] -> [R, steps * b, ...]."""
  return {k: np.concatenate([b[k] for b in batches], axis=1)
          for k in batches[0]}


def test_uint8_eval_squares_on_device_equal_the_float_views(tmp_path):
  _random_folder(tmp_path / 'images', 22)  # 6 validation images.
  config = _folder_config(tmp_path / 'images', tmp_path, mean='pixel',
                          ten_crop=True, eval_batch_size=4)
  mean_image = ip.mean_image(config)
  source = sources.make_source(config)
  views = jax.jit(jax.vmap(on_device.eval_images, in_axes=(0, None, None,
                                                            None)),
                  static_argnums=(2, 3))
  windows = [(1, 1), (0, 0), (0, 3), (3, 0), (3, 3)]
  for replicas in ([0, 1], [1]):
    batches = list(ip.create_eval_iterable(config, 'eval', replicas=replicas,
                                           num_replicas=2))
    assert len(batches) == 2
    for position, replica in enumerate(replicas):
      split = tfds.split_for_jax_process('validation', process_index=replica,
                                         process_count=2)
      found = np.concatenate([
          np.asarray(views(b, mean_image, 5, True))[position][
              b['mask'][position]] for b in batches])
      expected = []
      for data, _ in source.examples(split).as_numpy_iterator():
        square = ops.decode_centre_square(source.read(data), 8).numpy()
        square = square.astype(np.float32) - mean_image
        crops = [square[t:t + 5, l:l + 5] for t, l in windows]
        expected.append(crops + [c[:, ::-1] for c in crops])
      assert found.shape == (3, 10, 5, 5, 3)
      np.testing.assert_allclose(found, expected, rtol=0, atol=1e-4)


# --- Evaluation ---------------------------------------------------------------


@pytest.mark.parametrize('process_count', [1, 2])
def test_eval_counts_every_example_exactly_once(tmp_path, folder,
                                                process_count):
  config = _folder_config(folder, tmp_path, eval_batch_size=4)
  per_process = 2 // process_count
  found, lengths = [], []
  for index in range(process_count):
    replicas = list(range(index * per_process, (index + 1) * per_process))
    iterable = ip.create_eval_iterable(config, 'eval', replicas=replicas,
                                       num_replicas=2)
    passes = [list(iterable), list(iterable)]  # Re-iterable, same order.
    for a, b in zip(*passes):
      np.testing.assert_array_equal(a['image'], b['image'])
    lengths.append(len(passes[0]))
    assert len(iterable) == len(passes[0])
    for batch in passes[0]:
      assert batch['image'].shape == (per_process, 2, 8, 8, 3)
      assert batch['image'].dtype == np.uint8
      assert batch['mask'].dtype == bool and batch['label'].dtype == np.int32
      mask = batch['mask']
      ids = _ids(batch['image'], mask)
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
  batches = list(ip.create_eval_iterable(config, 'minival', replicas=[0],
                                         num_replicas=1))
  assert len(batches) == 1 and batches[0]['mask'].all()
  # Folder order is class then name: train[20:] holds ids 17, 19, 21, 23.
  assert sorted(_ids(batches[0]['image']).ravel()) == [17, 19, 21, 23]


def test_mean_image_matches_numpy_and_is_subtracted(tmp_path):
  rng = np.random.default_rng(5)
  images = {}
  for split, count in (('train', 5), ('validation', 1)):
    for i in range(count):
      os.makedirs(tmp_path / split / f'c{i % 2}', exist_ok=True)
      images[split, i] = rng.integers(0, 256, (10, 14, 3), dtype=np.uint8)
      Image.fromarray(images[split, i]).save(
          tmp_path / split / f'c{i % 2}' / f'{i}.png')
  config = _folder_config(tmp_path, tmp_path / 'data', mean='pixel',
                          ten_crop=True, resize_size=10, image_size=10,
                          eval_batch_size=2)
  mean_image = ip.mean_image(config)
  # The centre 10x10 square of each 10x14 training image, averaged by numpy.
  expected = np.mean([images['train', i][:, 2:12] for i in range(5)],
                     axis=0, dtype=np.float64)
  np.testing.assert_allclose(mean_image, expected, rtol=1e-6)
  cached = colour.cache_path(str(tmp_path / 'data'),
                             sources.make_source(config).tag, 'train', 10)
  assert os.path.exists(cached)
  batch = next(iter(ip.create_eval_iterable(config, 'eval', replicas=[0],
                                            num_replicas=1)))
  views = on_device.eval_images({'image': batch['image'][0]}, mean_image,
                                10, True)[0]  # [10 views, 10, 10, 3]
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
    # One replica: mock_data ignores split slices, so replicas would overlap.
    batch = next(ip.create_train_iterator(config, replicas=[0],
                                          num_replicas=1))
    assert batch['image'].shape == (1, 8, 12, 12, 3)
    images = jax.vmap(on_device.train_images, in_axes=(0, None))(
        batch, ip.mean_image(config))
    assert np.isfinite(images).all() and images.std() > 1
    assert ((batch['label'] >= 0) & (batch['label'] < 1000)).all()
    batches = list(ip.create_eval_iterable(config, 'eval', replicas=[0],
                                           num_replicas=1))
    mean_image = ip.mean_image(config)
  assert len(batches) == 3
  assert batches[0]['image'].shape == (1, 6, 16, 16, 3)
  assert sum(b['mask'].sum() for b in batches) == 16
  views = on_device.eval_images({'image': batches[0]['image'][0]},
                                mean_image, 12, True)
  assert views.shape == (6, 10, 12, 12, 3)
  np.testing.assert_array_equal(views[0, 5], views[0, 0][:, ::-1])
