"""Tests of alexnet/data/colour.py: mean image, RGB eigenvectors, cache."""

import numpy as np
import pytest

from alexnet.data import colour


def test_mean_images_match_numpy_over_batches():
  """config.mean='pixel' subtracts the mean image, 'channel' the mean of
  each channel over all pixels, at every pixel."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (7, 5, 5, 3)).astype(np.uint8)
  accumulator = colour.StatsAccumulator(5)
  accumulator.update(images[:3])
  accumulator.update(images[3:])
  stats = accumulator.result()
  assert stats.num_examples == 7
  pixels = images.astype(np.float64)
  np.testing.assert_allclose(colour.mean_image(stats, 'pixel'),
                             pixels.mean(axis=0), rtol=1e-6)
  channel = colour.mean_image(stats, 'channel')
  np.testing.assert_allclose(
      channel, np.broadcast_to(pixels.mean(axis=(0, 1, 2)), (5, 5, 3)),
      rtol=1e-6)
  channel += 1  # A plain array the caller may use (not a broadcast view).


def test_eigen_decomposition_recovers_known_covariance():
  rng = np.random.default_rng(1)
  # A known covariance on [0,1] pixels: random orthonormal axes with
  # distinct variances.
  axes, _ = np.linalg.qr(rng.normal(size=(3, 3)))
  variances = np.array([0.02, 0.005, 0.001])
  covariance = axes @ np.diag(variances) @ axes.T
  pixels = rng.multivariate_normal([0.5, 0.45, 0.4], covariance,
                                   size=200 * 16 * 16)
  images = (255.0 * pixels).reshape(200, 16, 16, 3)
  accumulator = colour.StatsAccumulator(16)
  for chunk in np.split(images, 4):
    accumulator.update(chunk)
  stats = accumulator.result()
  np.testing.assert_allclose(stats.eigvals, variances, rtol=0.05)
  # Eigenvectors match up to sign.
  for i in range(3):
    assert abs(stats.eigvecs[:, i] @ axes[:, i]) > 0.99
  reconstructed = stats.eigvecs @ np.diag(stats.eigvals) @ stats.eigvecs.T
  np.testing.assert_allclose(reconstructed, covariance, atol=5e-4)


def test_principal_components_sorted_descending_and_orthonormal():
  eigvals, eigvecs = colour.principal_components(np.diag([1.0, 3.0, 2.0]))
  np.testing.assert_allclose(eigvals, [3.0, 2.0, 1.0])
  np.testing.assert_allclose(eigvecs.T @ eigvecs, np.eye(3), atol=1e-12)
  np.testing.assert_allclose(np.abs(eigvecs[:, 0]), [0, 1, 0])


def test_imagenet_values_are_an_orthonormal_basis():
  vectors = colour.IMAGENET_EIGVECS
  np.testing.assert_allclose(vectors.T @ vectors, np.eye(3), atol=2e-3)
  assert list(colour.IMAGENET_EIGVALS) == sorted(colour.IMAGENET_EIGVALS,
                                                 reverse=True)
  # Eigenvectors are columns, as `principal_components` returns them: the
  # first, of the largest eigenvalue, is the brightness direction of
  # natural images, R, G and B alike (the published (-0.5675, -0.5808,
  # -0.5836)); the matrix's first row is no such direction.
  brightness = vectors[:, 0]
  assert np.all(np.sign(brightness) == np.sign(brightness[0]))
  np.testing.assert_allclose(np.abs(brightness), 3**-0.5, atol=0.02)


def test_cache_round_trip_and_path(tmp_path):
  path = colour.cache_path(str(tmp_path), 'imagenet2012-5.1.0',
                           'train[:99%]', 256)
  assert path == str(tmp_path / 'alexnet_colour_stats' /
                     'imagenet2012-5.1.0' / 'train__99___256.npz')
  assert colour.load(path) is None
  accumulator = colour.StatsAccumulator(2)
  accumulator.update(np.arange(24.0).reshape(2, 2, 2, 3))
  stats = accumulator.result()
  colour.save(path, stats)
  loaded = colour.load(path)
  for name in ('mean_image', 'channel_mean', 'eigvals', 'eigvecs'):
    np.testing.assert_array_equal(getattr(loaded, name), getattr(stats, name))
  assert loaded.num_examples == 2


def test_empty_accumulator_raises():
  with pytest.raises(ValueError, match='No images'):
    colour.StatsAccumulator(4).result()
