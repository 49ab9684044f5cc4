"""The float part of preprocessing, run on the device inside the mapped step.

Batches leave tf.data as uint8 (4x fewer bytes than float32), and
evaluation ships each resized square once instead of ten float views. Here,
on one replica's batch (no leading replica axis), the mean image is
subtracted, the PCA lighting shift added and the evaluation views cut. The
results equal a float pipeline doing the same on the host.

Everything upstream is RGB, the mean image included. `channel_order='bgr'`
reverses the channels of the finished images last, for weights trained on
BGR inputs (Caffe's bvlc_alexnet): (rgb - mean_rgb) reversed equals
bgr - mean_bgr.
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp

# Channel orders the net can read; 'rgb' is the paper's (and tf.data's).
CHANNEL_ORDERS = ('rgb', 'bgr')


def to_channel_order(images: jax.Array, channel_order: str) -> jax.Array:
  """RGB images [..., 3] in `channel_order` ('rgb' or 'bgr')."""
  if channel_order not in CHANNEL_ORDERS:
    raise ValueError(f'channel_order={channel_order!r}: choose one of '
                     f'{CHANNEL_ORDERS}.')
  return images[..., ::-1] if channel_order == 'bgr' else images


def train_images(batch: Mapping[str, jax.Array], mean_image: jax.Array,
                 channel_order: str = 'rgb') -> jax.Array:
  """Mean-subtracted, reflected, lighting-shifted training crops.

  Args:
    batch: {'image': uint8 [b, S, S, 3] crops (already reflected),
      'offset': int32 [b, 2] crop (top, left) in the resize square,
      'flip': bool [b], 'shift': float32 [b, 3] PCA shift, 0-255 scale}.
    mean_image: float32 [Z, Z, 3], the mean over resize squares.
    channel_order: of the returned images (see `to_channel_order`).

  Returns:
    float32 [b, S, S, 3]: image - mean crop (reflected with the image)
    + shift.
  """
  size = batch['image'].shape[1]

  def mean_crop(offset, flip):
    window = jax.lax.dynamic_slice(mean_image, (offset[0], offset[1], 0),
                                   (size, size, 3))
    return jnp.where(flip, window[:, ::-1], window)

  means = jax.vmap(mean_crop)(batch['offset'], batch['flip'])
  images = batch['image'].astype(jnp.float32) - means
  return to_channel_order(images + batch['shift'][:, None, None, :],
                          channel_order)


def eval_images(batch: Mapping[str, jax.Array], mean_image: jax.Array,
                image_size: int, ten_crop: bool,
                channel_order: str = 'rgb') -> jax.Array:
  """The paper's test views of mean-subtracted resize squares.

  Args:
    batch: {'image': uint8 [b, Z, Z, 3], ...}.
    mean_image: float32 [Z, Z, 3].
    image_size: view side S.
    ten_crop: ten views per image, else the centre view only.
    channel_order: of the returned views (see `to_channel_order`).

  Returns:
    float32 [b, V, S, S, 3], V = 10 or 1: view 0 the centre, 1-4 the corners
    top-left, top-right, bottom-left, bottom-right, 5-9 the horizontal
    reflections of views 0-4.
  """
  squares = to_channel_order(
      batch['image'].astype(jnp.float32) - mean_image, channel_order)
  far = squares.shape[1] - image_size
  centre = far // 2
  offsets = [(centre, centre)]
  if ten_crop:
    offsets += [(0, 0), (0, far), (far, 0), (far, far)]
  views = jnp.stack([squares[:, top:top + image_size, left:left + image_size]
                     for top, left in offsets], axis=1)
  if ten_crop:
    views = jnp.concatenate([views, views[:, :, :, ::-1]], axis=1)
  return views
