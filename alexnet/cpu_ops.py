"""Kernels for the net's layers that XLA's stock lowering runs slowly on CPU.

Each function here computes exactly what a stock JAX/Flax expression does
(tests/test_model.py checks values and gradients against it) but is written
so that XLA's CPU backend runs it fast; `bench/per_layer.py` prints the
timings of both side by side.

* `local_response_norm`: the paper's LRN with its gradient written out.
  Autodiff of the formula keeps several `pow`s and large temporaries.
* `max_pool`: a running maximum over the window's strided slices.
  `nn.max_pool`'s gradient is a select-and-scatter, slow on XLA CPU.
* `patch_conv`: a convolution whose kernel gradient (and, when strided, whose
  forward) is a matmul over explicit image patches, built a block of images
  at a time. It beats XLA:CPU's convolutions where YNNPACK computes them
  (this jaxlib's default), slow on kernel gradients; it loses to XLA's own
  (Eigen) convolutions, which `backend.CPU_XLA_FLAGS` selects.

LRN and pooling run on every backend (they are exact); the convolution is
chosen by `model.AlexNet.conv_impl`.
"""

import functools
import math

import jax
from jax import lax
import jax.numpy as jnp

Array = jax.Array
Pads = tuple[tuple[int, int], tuple[int, int]]

# Images per block of patches: conv1's patches of 8 images are 35 MB, about
# the last-level cache; 8 took 5-15% less CPU time than 16 at conv1 and
# conv2 (bench/train_step.py --per_layer).
_PATCH_CHUNK = 8
# Narrowest maps whose stride-1 convolutions take the patch kernel gradient.
_PATCH_MIN_WIDTH = 8


def local_response_norm(x: Array, *, groups: int, k: float, size: int,
                        alpha: float, beta: float) -> Array:
  """The paper's LRN (section 3.3) over the channels of each group.

  b_i = a_i / (k + alpha * sum_{j=i-size//2}^{i+size//2} a_j^2) ** beta,
  with the sum clipped at the group's edges: the window never crosses from
  one tower's channels into the other's (groups=1 is Caffe's LRN over all
  channels). alpha is not divided by size (as in the paper and TensorFlow);
  Caffe's and PyTorch's form passes alpha / size (`model.AlexNet` does,
  with `lrn_alpha_over_size`).

  Args:
    x: [..., groups * C] activations.
    groups: number of independent channel groups (towers).
    k: additive constant.
    size: channels in the window.
    alpha: scale of the sum of squares.
    beta: exponent.

  Returns:
    An array like x.
  """
  return _lrn(x, groups, k, size, alpha, beta)


def _window_sum(x: Array, groups: int, size: int) -> Array:
  """Sum over the `size` channels centred on each channel, inside its group."""
  *lead, channels = x.shape
  grouped = x.reshape(*lead, groups, channels // groups)
  half = size // 2
  padded = jnp.pad(grouped, [(0, 0)] * (grouped.ndim - 1) + [(half, half)])
  width = grouped.shape[-1]
  return sum(padded[..., i:i + width] for i in range(size)).reshape(x.shape)


def _pow_neg(d: Array, beta: float) -> Array:
  """d ** -beta; the paper's beta=0.75 as rsqrt(d) * sqrt(rsqrt(d)).

  A general pow is a log and an exp per element.
  """
  if beta == 0.75:
    r = lax.rsqrt(d)
    return r * jnp.sqrt(r)
  return d ** -beta


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4, 5))
def _lrn(x, groups, k, size, alpha, beta):
  d = k + alpha * _window_sum(jnp.square(x), groups, size)
  return x * _pow_neg(d, beta)


def _lrn_fwd(x, groups, k, size, alpha, beta):
  return _lrn(x, groups, k, size, alpha, beta), x


def _lrn_bwd(groups, k, size, alpha, beta, x, g):
  """The LRN gradient written out, recomputing d from x.

  With d_j = k + alpha * sum_{i in window(j)} a_i^2 and b_j = a_j d_j^-beta:
  da_i = g_i d_i^-beta - 2 alpha beta a_i sum_{j in window(i)} g_j a_j
  d_j^(-beta-1) (windows are symmetric).
  """
  d = k + alpha * _window_sum(jnp.square(x), groups, size)
  scale = _pow_neg(d, beta)
  inner = _window_sum(g * x * scale / d, groups, size)
  return (g * scale - (2 * alpha * beta) * x * inner,)


_lrn.defvjp(_lrn_fwd, _lrn_bwd)


def max_pool(x: Array, size: int = 3, stride: int = 2) -> Array:
  """Max pooling over `size` x `size` windows, VALID padding.

  Equals `nn.max_pool(x, (size, size), strides=(stride, stride),
  padding='VALID')` on [N, H, W, C], gradient included: the first maximum
  of a window in row-major order gets it (strict `>` keeps the earlier of
  equal values).

  Args:
    x: [N, H, W, C] activations.
    size: window height and width (the paper: 3, overlapping).
    stride: step between windows (the paper: 2).

  Returns:
    [N, (H - size) // stride + 1, (W - size) // stride + 1, C].
  """
  _, height, width, _ = x.shape
  rows = (height - size) // stride + 1
  cols = (width - size) // stride + 1
  out = None
  for i in range(size):
    for j in range(size):
      window = x[:, i:i + stride * (rows - 1) + 1:stride,
                 j:j + stride * (cols - 1) + 1:stride, :]
      out = window if out is None else jnp.where(window > out, window, out)
  return out


def xla_conv(x: Array, kernel: Array, stride: int, pads: Pads) -> Array:
  """XLA's convolution, NHWC x HWIO."""
  return lax.conv_general_dilated(
      x, kernel, (stride, stride), pads,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def patch_conv(x: Array, kernel: Array, stride: int, pads: Pads) -> Array:
  """The convolution of `xla_conv` with patch-matmul kernels where they win.

  Against YNNPACK's convolutions (XLA:CPU without `backend.CPU_XLA_FLAGS`;
  `bench/train_step.py --kernels`), blocked patches are faster for strided
  convolutions (conv1, forward and kernel gradient) and for kernel
  gradients on maps at least 8 wide (conv2-conv5 at 227 pixels, whose
  kernel gradient is a convolution with a 27x27 or 13x13 "kernel");
  YNNPACK is faster for the 3x3 and 7x7 maps of 67-pixel inputs.

  Args:
    x: [N, H, W, C_in] input.
    kernel: [kh, kw, C_in, C_out].
    stride: the same in both directions.
    pads: ((top, bottom), (left, right)).

  Returns:
    [N, rows, cols, C_out], like `xla_conv`.
  """
  if stride > 1 or x.shape[2] >= _PATCH_MIN_WIDTH:
    return _patch_grad_conv(x, kernel, stride, pads)
  return xla_conv(x, kernel, stride, pads)


def _patches(x: Array, window: tuple[int, int], stride: int,
             pads: Pads) -> Array:
  """[N, H, W, C] -> [N, rows, cols, kh * kw * C] strided patches."""
  x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
  kh, kw = window
  rows = (x.shape[1] - kh) // stride + 1
  cols = (x.shape[2] - kw) // stride + 1
  return jnp.concatenate(
      [x[:, i:i + stride * (rows - 1) + 1:stride,
         j:j + stride * (cols - 1) + 1:stride, :]
       for i in range(kh) for j in range(kw)], axis=-1)


def _batch_chunks(x: Array) -> Array:
  """[N, ...] -> [N / n, n, ...] with n the largest divisor <= _PATCH_CHUNK."""
  chunk = math.gcd(x.shape[0], _PATCH_CHUNK)
  return x.reshape(-1, chunk, *x.shape[1:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _patch_grad_conv(x: Array, kernel: Array, stride: int,
                     pads: Pads) -> Array:
  """A convolution whose kernel gradient is a matmul over patches.

  Patches of a whole batch are big (562 MB at conv1 for 128 images: 55x55
  positions x 363 values x 4 bytes each) and written to fresh pages, so
  they are built `_PATCH_CHUNK` images at a time
  inside a loop that reuses its buffers. A strided forward (conv1) uses the
  blocks too; otherwise the forward and the input gradient stay XLA's.
  """
  if stride > 1:
    flat = kernel.reshape(-1, kernel.shape[-1])
    y = lax.map(
        lambda xc: _patches(xc, kernel.shape[:2], stride, pads) @ flat,
        _batch_chunks(x))
    return y.reshape(x.shape[0], *y.shape[2:])
  return xla_conv(x, kernel, stride, pads)


def _patch_grad_conv_fwd(x, kernel, stride, pads):
  return _patch_grad_conv(x, kernel, stride, pads), (x, kernel)


def _patch_grad_conv_bwd(stride, pads, residuals, g):
  x, kernel = residuals
  # Where x is the image (conv1) nothing reads the input gradient and XLA
  # drops it.
  _, input_vjp = jax.vjp(lambda x: xla_conv(x, kernel, stride, pads), x)

  # Summed over blocks in float32 (at least) whatever the compute dtype.
  total_dtype = jnp.promote_types(kernel.dtype, jnp.float32)

  def add_block(total, block):
    xc, gc = block
    patches = _patches(xc, kernel.shape[:2], stride, pads)
    return total + jnp.einsum('nhwp,nhwo->po', patches, gc,
                              preferred_element_type=total_dtype), None

  zero = jnp.zeros((math.prod(kernel.shape[:3]), kernel.shape[3]),
                   total_dtype)
  kernel_grad, _ = lax.scan(add_block, zero,
                            (_batch_chunks(x), _batch_chunks(g)))
  return input_vjp(g)[0], kernel_grad.reshape(kernel.shape).astype(
      kernel.dtype)


_patch_grad_conv.defvjp(_patch_grad_conv_fwd, _patch_grad_conv_bwd)
