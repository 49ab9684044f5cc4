"""Preprocessing ops of the input pipeline (paper sections 2 and 4.1).

Every op works eagerly and inside `tf.data.Dataset.map`. Images stay uint8
on the 0-255 scale: decoding, the centred square, resizing, crops and
reflections happen here, on the host; mean subtraction, the PCA lighting
shift and evaluation views happen on the device (`alexnet/data/on_device.py`).

Random draws are whole-epoch tables keyed on (seed, epoch, replica), so an
example's augmentation does not depend on where the shuffle puts it.
"""

import dataclasses

import numpy as np
import tensorflow as tf


def decode_rgb(image_bytes: tf.Tensor) -> tf.Tensor:
  """Decodes a JPEG/PNG/GIF/BMP to uint8 RGB (grey and CMYK converted).

  Args:
    image_bytes: scalar string tensor, an encoded image.

  Returns:
    uint8 [height, width, 3].
  """
  image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def _centre_square_window(height: tf.Tensor, width: tf.Tensor) -> tf.Tensor:
  side = tf.minimum(height, width)
  return tf.stack([(height - side) // 2, (width - side) // 2, side, side])


def resize_square(square: tf.Tensor, resize_size: int) -> tf.Tensor:
  """Resizes a uint8 square image to resize_size x resize_size.

  Args:
    square: uint8 [side, side, 3].
    resize_size: output side.

  Returns:
    uint8 [resize_size, resize_size, 3]: an image already of that size is
    returned unchanged, so the fused JPEG path and this one agree; others are
    resized and rounded, as the paper stored its 256x256 images.
  """
  def resize():
    # Antialiasing keeps downscaled ImageNet photos close to PIL's resize.
    resized = tf.image.resize(square, [resize_size, resize_size],
                              method='bilinear', antialias=True)
    return tf.saturate_cast(tf.round(resized), tf.uint8)

  resized = tf.cond(tf.shape(square)[0] == resize_size, lambda: square,
                    resize)
  return tf.ensure_shape(resized, [resize_size, resize_size, 3])


def decode_centre_square(image_bytes: tf.Tensor,
                         resize_size: int) -> tf.Tensor:
  """Decodes an image, cuts its centred square and resizes it.

  Args:
    image_bytes: scalar string tensor, an encoded image.
    resize_size: output side.

  Returns:
    uint8 [resize_size, resize_size, 3].
  """
  def jpeg():
    # Decode only the square: the discarded sides are never decompressed.
    shape = tf.image.extract_jpeg_shape(image_bytes)
    window = _centre_square_window(shape[0], shape[1])
    return tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3)

  def other():
    image = decode_rgb(image_bytes)
    shape = tf.shape(image)
    window = _centre_square_window(shape[0], shape[1])
    return tf.slice(image, [window[0], window[1], 0],
                    [window[2], window[3], 3])

  square = tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other)
  square.set_shape([None, None, 3])
  return resize_square(square, resize_size)


def is_square_jpeg(image_bytes: tf.Tensor, size: int) -> tf.Tensor:
  """Whether the bytes are a size x size JPEG (the fused fast path)."""
  return tf.cond(
      tf.io.is_jpeg(image_bytes),
      lambda: tf.reduce_all(
          tf.image.extract_jpeg_shape(image_bytes)[:2] == size),
      lambda: tf.constant(False))


def crop(image: tf.Tensor, offset: tf.Tensor, size: int) -> tf.Tensor:
  """Returns the size x size window of `image` at offset (top, left)."""
  offset = tf.cast(offset, tf.int32)
  window = tf.slice(image, [offset[0], offset[1], 0], [size, size, -1])
  return tf.ensure_shape(window, [size, size, image.shape[-1]])


def decode_crop(image_bytes: tf.Tensor, resize_size: int, image_size: int,
                offset: tf.Tensor) -> tf.Tensor:
  """Decodes the image_size window at `offset` of the resize_size square.

  Args:
    image_bytes: scalar string tensor, an encoded image.
    resize_size: side of the centred, resized square the window lies in.
    image_size: side of the window.
    offset: int32 [2], (top, left) of the window, each in
      0..resize_size-image_size.

  Returns:
    uint8 [image_size, image_size, 3]. resize_size-square JPEGs are decoded
    with the fused `decode_and_crop_jpeg`, which equals decode-then-crop up
    to chroma upsampling at the window's edges.
  """
  def fused():
    window = tf.concat([offset, [image_size, image_size]], axis=0)
    return tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3)

  def general():
    square = decode_centre_square(image_bytes, resize_size)
    return crop(square, offset, image_size)

  image = tf.cond(is_square_jpeg(image_bytes, resize_size), fused, general)
  return tf.ensure_shape(image, [image_size, image_size, 3])


def flip_if(image: tf.Tensor, flip: tf.Tensor) -> tf.Tensor:
  """Reflects [height, width, c] left-right when `flip` is True."""
  return tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)


def epoch_key(seed: int, epoch: tf.Tensor, replica: int) -> tf.Tensor:
  """The stateless RNG key of one epoch of one data-parallel replica.

  Args:
    seed: `config.seed`.
    epoch: the epoch (0-based).
    replica: the global replica index (replicas hold different examples).

  Returns:
    int64 [2], a key for `tf.random.stateless_*` ops.
  """
  key = tf.stack([tf.cast(seed, tf.int64), tf.constant(0, tf.int64)])
  for data in (epoch, replica):
    key = tf.random.experimental.stateless_fold_in(key, tf.cast(data,
                                                                tf.int64))
  return key


@dataclasses.dataclass(frozen=True)
class Augmentation:
  """Random draws of one epoch; row i belongs to example index i.

  Drawn as whole-epoch tables (one op each) because per-example random ops
  cost more tf.data time than decoding a 256x256 JPEG. Row i depends only on
  (seed, epoch, replica, i), so resuming and reshuffling do not change it.

  Attributes:
    offsets: int32 [n, 2], (top, left) crop offsets, each uniform in
      0..resize_size-image_size.
    flips: bool [n], horizontal reflection, probability 1/2.
    shifts: float32 [n, 3], fancy PCA lighting 255 * P @ (alpha * lambda)
      with alpha ~ N(0, sigma) (zeros when sigma is 0).
  """
  offsets: tf.Tensor
  flips: tf.Tensor
  shifts: tf.Tensor


def random_crop_offsets(key: tf.Tensor, n: int, resize_size: int,
                        image_size: int) -> tf.Tensor:
  """n uniform (top, left) offsets, every value in 0..resize_size-image_size.

  Args:
    key: stateless RNG key [2].
    n: number of offsets.
    resize_size: side of the image to crop from.
    image_size: side of the crop.

  Returns:
    int32 [n, 2].
  """
  return tf.random.stateless_uniform(
      [n, 2], key, minval=0, maxval=resize_size - image_size + 1,
      dtype=tf.int32)


def random_flips(key: tf.Tensor, n: int) -> tf.Tensor:
  """n independent fair coin flips (bool [n])."""
  return tf.random.stateless_uniform([n], key) < 0.5


def lighting_shifts(key: tf.Tensor, n: int, sigma: float,
                    eigvals: np.ndarray, eigvecs: np.ndarray) -> tf.Tensor:
  """Fancy PCA lighting: n shifts 255 * P @ (alpha * lambda).

  The paper draws alpha ~ N(0, sigma) once per image and presentation and
  adds the shift to every pixel; lambda and P are computed on [0,1] pixels
  (docs/REFERENCE.md, Data), hence the factor 255 for 0-255 images.

  Args:
    key: stateless RNG key [2].
    n: number of shifts.
    sigma: standard deviation of alpha.
    eigvals: [3] eigenvalues lambda of the RGB covariance.
    eigvecs: [3, 3] eigenvectors P as columns.

  Returns:
    float32 [n, 3], RGB shifts.
  """
  alpha = sigma * tf.random.stateless_normal([n, 3], key, dtype=tf.float32)
  weights = alpha * tf.constant(eigvals, tf.float32)  # [n, 3]
  # Row i is P @ weights[i], i.e. weights @ P^T.
  return 255.0 * tf.matmul(weights, tf.constant(eigvecs, tf.float32),
                           transpose_b=True)


def draw_augmentation(key: tf.Tensor, n: int, resize_size: int,
                      image_size: int, sigma: float, eigvals: np.ndarray,
                      eigvecs: np.ndarray) -> Augmentation:
  """All random draws of one epoch of n examples.

  Args:
    key: from `epoch_key`.
    n: examples in this replica's slice.
    resize_size: side of the image crops are taken from.
    image_size: crop side.
    sigma: lighting alpha std (0 gives zero shifts).
    eigvals: [3] RGB eigenvalues.
    eigvecs: [3, 3] RGB eigenvectors as columns.

  Returns:
    The `Augmentation` tables.
  """
  crop_key, flip_key, light_key = tf.unstack(
      tf.random.experimental.stateless_split(key, 3))
  return Augmentation(
      offsets=random_crop_offsets(crop_key, n, resize_size, image_size),
      flips=random_flips(flip_key, n),
      shifts=lighting_shifts(light_key, n, sigma, eigvals, eigvecs))
