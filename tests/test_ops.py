"""Tests of alexnet/data/ops.py and alexnet/data/on_device.py.

Each tf op is checked eagerly and inside `tf.data.Dataset.map`; the device
side is checked against numpy slicing of the views the paper defines.
"""

import functools
import io

import jax
import numpy as np
from PIL import Image
import tensorflow as tf

from alexnet.data import on_device
from alexnet.data import ops


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


def test_decode_rgb_converts_grey_rgba_and_cmyk():
  rng = np.random.default_rng(0)
  grey = rng.integers(0, 256, (6, 9), dtype=np.uint8)
  for out in _eager_and_mapped(ops.decode_rgb, _encode(grey)):
    assert out.shape == (6, 9, 3)
    np.testing.assert_array_equal(out, np.repeat(grey[..., None], 3, -1))
  rgba = rng.integers(0, 256, (5, 4, 4), dtype=np.uint8)
  for out in _eager_and_mapped(ops.decode_rgb, _encode(rgba)):
    np.testing.assert_array_equal(out, rgba[..., :3])
  smooth = np.tile(np.linspace(0, 255, 16, dtype=np.uint8)[:, None, None],
                   (1, 16, 3))
  cmyk = _encode(smooth, 'CMYK', quality=95)
  pil_rgb = np.asarray(Image.open(io.BytesIO(cmyk)).convert('RGB'), float)
  for out in _eager_and_mapped(ops.decode_rgb, cmyk):
    assert out.shape == (16, 16, 3)
    assert np.abs(out - pil_rgb).mean() < 3


def test_decode_centre_square_cuts_the_middle_and_resizes():
  rng = np.random.default_rng(1)
  pixels = rng.integers(0, 256, (6, 10, 3), dtype=np.uint8)
  fn = functools.partial(ops.decode_centre_square, resize_size=6)
  for out in _eager_and_mapped(fn, _encode(pixels)):
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, pixels[:, 2:8])
  # Resized squares are rounded to uint8, as the paper stored them.
  fn = functools.partial(ops.decode_centre_square, resize_size=4)
  resized = tf.image.resize(pixels[:, 2:8].astype(np.float32), [4, 4],
                            antialias=True).numpy()
  for out in _eager_and_mapped(fn, _encode(pixels)):
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.clip(np.round(resized), 0, 255))
  # Downscaling: shape exact, a constant image stays constant.
  flat = np.full((9, 5, 3), 77, np.uint8)
  fn = functools.partial(ops.decode_centre_square, resize_size=3)
  for out in _eager_and_mapped(fn, _encode(flat)):
    assert out.shape == (3, 3, 3)
    np.testing.assert_allclose(out, 77, atol=1e-3)


def test_decode_crop_fused_jpeg_path_matches_decode_then_crop():
  rng = np.random.default_rng(2)
  pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
  jpeg = _encode(pixels, 'JPEG', quality=95, subsampling=0)
  assert bool(ops.is_square_jpeg(tf.constant(jpeg), 16))
  assert not bool(ops.is_square_jpeg(tf.constant(jpeg), 15))
  assert not bool(ops.is_square_jpeg(tf.constant(_encode(pixels)), 16))
  decoded = ops.decode_rgb(tf.constant(jpeg)).numpy().astype(np.float32)
  fn = lambda data, offset: ops.decode_crop(data, 16, 8, offset)
  for out in _eager_and_mapped(fn, jpeg, np.array([3, 5], np.int32)):
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    np.testing.assert_allclose(out, decoded[3:11, 5:13], atol=2)
  # General path (PNG, not square): centre square, then the window.
  wide = rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)
  for out in _eager_and_mapped(fn, _encode(wide), np.array([8, 0], np.int32)):
    np.testing.assert_array_equal(out, wide[8:16, 2:10])


def test_random_crop_offsets_reach_every_offset_with_exact_shape():
  key = ops.epoch_key(0, tf.constant(0), 0)
  fn = lambda k: ops.random_crop_offsets(k, 600, 6, 3)
  for offsets in _eager_and_mapped(fn, key):
    assert offsets.shape == (600, 2)
    assert {tuple(o) for o in offsets} == {(y, x) for y in range(4)
                                           for x in range(4)}
  image = np.arange(6 * 6 * 3, dtype=np.float32).reshape(6, 6, 3)
  fn = lambda im, off: ops.crop(im, off, 3)
  for out in _eager_and_mapped(fn, image, np.array([3, 1], np.int32)):
    np.testing.assert_array_equal(out, image[3:6, 1:4])


def test_random_flip_reflects_about_half_the_time():
  key = ops.epoch_key(1, tf.constant(0), 0)
  flips, mapped = _eager_and_mapped(lambda k: ops.random_flips(k, 2000), key)
  np.testing.assert_array_equal(flips, mapped)
  assert 0.45 < flips.mean() < 0.55
  image = np.arange(12, dtype=np.float32).reshape(2, 2, 3)
  for flip, expected in ((True, image[:, ::-1]), (False, image)):
    for out in _eager_and_mapped(ops.flip_if, image, flip):
      np.testing.assert_array_equal(out, expected)


def test_epoch_draws_differ_by_epoch_replica_and_seed():
  draw = lambda *a: ops.draw_augmentation(ops.epoch_key(*a), 64, 8, 5, 0.1,
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
  fn = lambda k: ops.lighting_shifts(k, 20_000, sigma, eigvals, eigvecs)
  key = ops.epoch_key(2, tf.constant(0), 0)
  eager, mapped = _eager_and_mapped(fn, key)
  np.testing.assert_allclose(eager, mapped, rtol=1e-5, atol=1e-5)
  draws = eager.astype(np.float64)
  expected = 255**2 * sigma**2 * eigvecs @ np.diag(eigvals**2) @ eigvecs.T
  empirical = np.cov(draws.T)
  assert np.abs(draws.mean(axis=0)).max() < 0.1
  np.testing.assert_allclose(empirical, expected,
                             atol=0.04 * np.abs(expected).max())
  # sigma = 0 disables the lighting noise.
  zero = ops.lighting_shifts(key, 10, 0.0, eigvals, eigvecs).numpy()
  assert not zero.any()


def _eager_and_jitted(fn, *args):
  """fn(*args) as called and under jax.jit, as numpy."""
  return np.asarray(fn(*args)), np.asarray(jax.jit(fn)(*args))


def test_ten_crop_views_and_order():
  y, x = np.meshgrid(np.arange(8), np.arange(8), indexing='ij')
  image = np.stack([y, x, y + x], -1).astype(np.uint8)
  batch = {'image': image[None]}
  mean = np.zeros((8, 8, 3), np.float32)
  windows = [(2, 2), (0, 0), (0, 4), (4, 0), (4, 4)]  # centre, TL, TR, BL, BR
  fn = functools.partial(on_device.eval_images, image_size=4, ten_crop=True)
  for views in _eager_and_jitted(fn, batch, mean):
    assert views.shape == (1, 10, 4, 4, 3) and views.dtype == np.float32
    for i, (top, left) in enumerate(windows):
      expected = image[top:top + 4, left:left + 4]
      np.testing.assert_array_equal(views[0, i], expected)
      np.testing.assert_array_equal(views[0, i + 5], expected[:, ::-1])
  fn = functools.partial(on_device.eval_images, image_size=4, ten_crop=False)
  for views in _eager_and_jitted(fn, batch, mean + 1):
    assert views.shape == (1, 1, 4, 4, 3)
    np.testing.assert_array_equal(views[0, 0], image[2:6, 2:6] - 1.0)


def test_train_images_subtract_the_reflected_mean_crop_and_add_the_shift():
  rng = np.random.default_rng(6)
  b, side, size = 6, 9, 5
  mean = rng.uniform(0, 255, (side, side, 3)).astype(np.float32)
  batch = {
      'image': rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8),
      'offset': rng.integers(0, side - size + 1, (b, 2)).astype(np.int32),
      'flip': np.array([True, False] * 3),
      'shift': rng.normal(0, 20, (b, 3)).astype(np.float32)}
  expected = []
  for i in range(b):
    top, left = batch['offset'][i]
    window = mean[top:top + size, left:left + size]
    if batch['flip'][i]:
      window = window[:, ::-1]
    expected.append(batch['image'][i] - window + batch['shift'][i])
  for out in _eager_and_jitted(on_device.train_images, batch, mean):
    assert out.shape == (b, size, size, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-4)
