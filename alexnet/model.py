"""The paper's two-tower AlexNet as a Flax Linen module.

The network is written for the towers that one device holds: `local_towers`
is 2 when both towers share a device and 1 when each device holds one tower
(the paper's model parallelism, see `parallel.py`). Every parameter is
stacked on a leading tower axis of size `local_towers`; a host copy of the
whole net therefore has a leading axis of 2 on every leaf.

Inside the module the activations of the local towers sit side by side on
the channel axis, tower 0 first. Layers that read only their own tower
(conv2, conv4, conv5, LRN, dropout) run once per tower on its channels;
layers that read both towers (conv3, fc6, fc7, fc8) first call the injected
`exchange`, which returns the channels of all towers, and conv1, which reads
the image, is shared the same way. Nothing else crosses towers.

Shapes for a 227x227 input (REFERENCE.md, both towers together):
conv1 55x55x96 -> pool 27x27x96 -> conv2 27x27x256 -> pool 13x13x256 ->
conv3 13x13x384 -> conv4 13x13x384 -> conv5 13x13x256 -> pool 6x6x256 ->
fc6 4096 -> fc7 4096 -> fc8 1000.
"""

from collections.abc import Sequence
import dataclasses
import functools
import math
from typing import Any, Protocol

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

Array = jax.Array

# The paper's net has two towers, one per GPU.
NUM_TOWERS = 2

# Kernels per tower at width 1.0 (REFERENCE.md, architecture table).
TOWER_CHANNELS = {'conv1': 48, 'conv2': 128, 'conv3': 192, 'conv4': 192,
                  'conv5': 128, 'fc6': 2048, 'fc7': 2048}

# (weight std, bias) per layer. 'paper': section 5 of the paper. 'caffe':
# BVLC Caffe's bvlc_alexnet, which learns from 0-1 scaled or tiny inputs where
# the paper's biases of 1 keep the loss flat (REFERENCE.md, Initialization).
INITIALIZATIONS = {
    'paper': {'conv1': (0.01, 0.0), 'conv2': (0.01, 1.0),
              'conv3': (0.01, 0.0), 'conv4': (0.01, 1.0),
              'conv5': (0.01, 1.0), 'fc6': (0.01, 1.0),
              'fc7': (0.01, 1.0), 'fc8': (0.01, 0.0)},
    'caffe': {'conv1': (0.01, 0.0), 'conv2': (0.01, 0.1),
              'conv3': (0.01, 0.0), 'conv4': (0.01, 0.1),
              'conv5': (0.01, 0.1), 'fc6': (0.005, 0.1),
              'fc7': (0.005, 0.1), 'fc8': (0.01, 0.0)},
}


class Exchange(Protocol):
  """How the towers of one forward pass see each other.

  `__call__` takes the local towers' activations, side by side on the last
  axis, and returns those of all `NUM_TOWERS` towers in tower order.
  `first_tower` is the global index of the first local tower (it keys
  dropout, so that masks do not depend on the device layout).
  """

  local_towers: int

  def __call__(self, x: Array) -> Array:
    ...

  def first_tower(self) -> Array | int:
    ...


@dataclasses.dataclass(frozen=True)
class AllTowersHere:
  """Both towers on this device: their channels are already side by side."""

  local_towers: int = NUM_TOWERS

  def __call__(self, x: Array) -> Array:
    return x

  def first_tower(self) -> int:
    return 0


def local_response_norm(x: Array, *, groups: int, k: float, size: int,
                        alpha: float, beta: float) -> Array:
  """The paper's LRN (section 3.3) over the channels of each group.

  b_i = a_i / (k + alpha * sum_{j=i-size//2}^{i+size//2} a_j^2) ** beta,
  with the sum clipped at the group's edges: the window never crosses from
  one tower's channels into the other's. alpha is not divided by size (as
  in the paper and TensorFlow; unlike Caffe and PyTorch).

  Args:
    x: [..., groups * C] activations.
    groups: number of independent channel groups (towers).
    k, size, alpha, beta: the LRN constants.

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
  """d ** -beta; the paper's beta=0.75 without exp/log.

  rsqrt(d) * sqrt(rsqrt(d)) = d^-0.75: LRN1 forward at batch 128 went from
  623 to 261 ms on the 2-core CPU (pow is a log and an exp per element).
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
  d_j^(-beta-1) (windows are symmetric). Autodiff of the forward kept
  several pow and 148 MB temporaries: LRN1 forward+backward at batch 128
  went from 2110 to 557 ms.
  """
  d = k + alpha * _window_sum(jnp.square(x), groups, size)
  scale = _pow_neg(d, beta)
  inner = _window_sum(g * x * scale / d, groups, size)
  return (g * scale - (2 * alpha * beta) * x * inner,)


_lrn.defvjp(_lrn_fwd, _lrn_bwd)


def max_pool(x: Array) -> Array:
  """The paper's overlapping pooling: 3x3 windows, stride 2 (section 3.4).

  Equals `nn.max_pool(x, (3, 3), strides=(2, 2), padding='VALID')` on
  [N, H, W, C], gradient included: the first maximum of a window in
  row-major order gets it (strict `>` keeps the earlier of equal values).
  Written as a running max over the window's 9 strided slices because XLA
  CPU's select_and_scatter (the backward of nn.max_pool) is slow: pool1
  forward+backward at batch 128 went from 1128 to 122 ms.
  """
  _, height, width, _ = x.shape
  rows, cols = (height - 3) // 2 + 1, (width - 3) // 2 + 1
  out = None
  for i in range(3):
    for j in range(3):
      window = x[:, i:i + 2 * rows - 1:2, j:j + 2 * cols - 1:2, :]
      out = window if out is None else jnp.where(window > out, window, out)
  return out


def _stacked_normal(std: float):
  """N(0, std) for a [towers, ...] parameter, each tower from its own key."""
  def init(key, shape, dtype=jnp.float32):
    towers = [std * jax.random.normal(jax.random.fold_in(key, t), shape[1:],
                                      dtype) for t in range(shape[0])]
    return jnp.stack(towers)
  return init


# Images per block of patches: at most 16 x 55 x 55 x 363 floats = 70 MB.
_PATCH_CHUNK = 16

Pads = tuple[tuple[int, int], tuple[int, int]]


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


def _xla_conv(x: Array, kernel: Array, stride: int, pads: Pads) -> Array:
  return lax.conv_general_dilated(
      x, kernel, (stride, stride), pads,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _conv(x: Array, kernel: Array, stride: int, pads: Pads) -> Array:
  """XLA's convolution, or `_patch_grad_conv` where that measured faster.

  On the CPU, blocked patches win at conv1 (strided) and at the 3x3
  convolutions on 13x13 maps (conv3-conv5: XLA's kernel gradient there is a
  convolution with a 13x13 "kernel"); at conv2 (5x5 on 27x27) XLA's kernel
  gradient is faster (688 vs 800 ms at batch 128). GPUs and TPUs have fast
  convolutions of their own (cuDNN, the MXU): they always take XLA's.
  """
  on_cpu = jax.default_backend() == 'cpu'
  if on_cpu and (stride > 1 or kernel.shape[0] <= 3):
    return _patch_grad_conv(x, kernel, stride, pads)
  return _xla_conv(x, kernel, stride, pads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _patch_grad_conv(x: Array, kernel: Array, stride: int,
                     pads: Pads) -> Array:
  """A convolution whose kernel gradient is a matmul over patches.

  XLA CPU computes kernel gradients as convolutions several times slower
  than a matmul over explicit patches. Patches of the whole batch are big
  (670 MB at conv1) and written to fresh pages, so they are built 16 images
  at a time inside a loop that reuses its buffers. At batch 128 on the
  2-core CPU, forward / kernel gradient in ms:
    conv1 (11x11/4, 3 channels): 667 / 1543 as XLA convolutions,
      848 / 934 as one matmul over all patches, 461 / 580 in blocks
      (conv1's forward uses the blocks too: XLA's strided conv is slower);
    conv3 (3x3, 256 -> 384, 13x13): kernel gradient 1050-1200 -> 475 ms,
      forward + backward 1780-1860 -> 1180-1550 ms.
  The input gradient stays XLA's transposed convolution.
  """
  if stride > 1:
    flat = kernel.reshape(-1, kernel.shape[-1])
    y = lax.map(
        lambda xc: _patches(xc, kernel.shape[:2], stride, pads) @ flat,
        _batch_chunks(x))
    return y.reshape(x.shape[0], *y.shape[2:])
  return _xla_conv(x, kernel, stride, pads)


def _patch_grad_conv_fwd(x, kernel, stride, pads):
  return _patch_grad_conv(x, kernel, stride, pads), (x, kernel)


def _patch_grad_conv_bwd(stride, pads, residuals, g):
  x, kernel = residuals
  # Dead code, dropped by XLA, where x is the image (conv1).
  _, input_vjp = jax.vjp(lambda x: _xla_conv(x, kernel, stride, pads), x)

  def add_block(total, block):
    xc, gc = block
    patches = _patches(xc, kernel.shape[:2], stride, pads)
    return total + jnp.einsum('nhwp,nhwo->po', patches, gc,
                              preferred_element_type=jnp.float32), None

  zero = jnp.zeros((math.prod(kernel.shape[:3]), kernel.shape[3]),
                   jnp.float32)
  kernel_grad, _ = lax.scan(add_block, zero,
                            (_batch_chunks(x), _batch_chunks(g)))
  return input_vjp(g)[0], kernel_grad.reshape(kernel.shape).astype(
      kernel.dtype)


_patch_grad_conv.defvjp(_patch_grad_conv_fwd, _patch_grad_conv_bwd)


def _tower_params(module: nn.Module,
                  kernel_shape: tuple[int, ...]) -> tuple[Array, Array]:
  """A layer's kernel [towers, *kernel_shape] and bias [towers, out]."""
  kernel = module.param('kernel', _stacked_normal(module.std),
                        (module.towers, *kernel_shape))
  bias = module.param('bias', nn.initializers.constant(module.bias),
                      (module.towers, kernel_shape[-1]))
  return kernel, bias


class TowerConv(nn.Module):
  """One convolution per tower; kernels stacked [towers, kh, kw, in, out].

  With `shared_input` every tower reads the whole input (conv1 reads the
  image, conv3 the exchanged maps), so the towers run as one convolution
  with their kernels side by side. Otherwise tower t reads only its own
  channel slice: separate convolutions, because XLA's grouped convolution
  is several times slower on CPU (ENGINEERING.md).
  """

  features: int
  kernel_size: int
  strides: int = 1
  padding: str | Sequence[tuple[int, int]] = 'SAME'
  shared_input: bool = False
  towers: int = NUM_TOWERS
  std: float = 0.01
  bias: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    in_features = x.shape[-1] if self.shared_input else x.shape[-1] // self.towers
    kernel, bias = _tower_params(
        self, (self.kernel_size, self.kernel_size, in_features, self.features))
    kernel = kernel.astype(self.dtype)
    x = x.astype(self.dtype)
    if self.shared_input:
      # [towers, kh, kw, in, out] -> [kh, kw, in, towers * out].
      wide = jnp.moveaxis(kernel, 0, -2).reshape(*kernel.shape[1:-1], -1)
      y = self._conv(x, wide)
    else:
      inputs = jnp.split(x, self.towers, axis=-1)
      y = jnp.concatenate(
          [self._conv(xt, kt) for xt, kt in zip(inputs, kernel)], axis=-1)
    return y + bias.reshape(-1).astype(self.dtype)

  def _conv(self, x: Array, kernel: Array) -> Array:
    pads = self.padding
    if isinstance(pads, str):
      pads = lax.padtype_to_pads(x.shape[1:3], kernel.shape[:2],
                                 (self.strides,) * 2, pads)
    return _conv(x, kernel, self.strides, tuple(map(tuple, pads)))


class TowerDense(nn.Module):
  """A fully connected layer per tower, all towers reading the same input."""

  features: int
  towers: int = NUM_TOWERS
  std: float = 0.01
  bias: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel, bias = _tower_params(self, (x.shape[-1], self.features))
    # [towers, in, out] -> [in, towers * out]: one matmul for all towers.
    wide = jnp.moveaxis(kernel, 0, 1).reshape(x.shape[-1], -1)
    y = jnp.dot(x.astype(self.dtype), wide.astype(self.dtype))
    return y + bias.reshape(-1).astype(self.dtype)


class AlexNet(nn.Module):
  """The paper's net, for the towers one device holds (see module docstring).

  Attributes:
    num_classes: logits returned. fc8 gives ceil(num_classes / 2) per tower
      (500 for ImageNet); an odd count drops the last tower's extra unit.
    width: channel multiplier for every layer; 1.0 is the paper's net.
    lrn_k, lrn_size, lrn_alpha, lrn_beta: LRN constants (paper: 2, 5, 1e-4,
      0.75).
    dropout_rate: dropout after fc6 and fc7 in training.
    init_scheme: a key of INITIALIZATIONS.
    dtype: compute dtype; parameters are always float32.
    exchange: the tower exchange; `AllTowersHere()` for one device.
  """

  num_classes: int = 1000
  width: float = 1.0
  lrn_k: float = 2.0
  lrn_size: int = 5
  lrn_alpha: float = 1e-4
  lrn_beta: float = 0.75
  dropout_rate: float = 0.5
  init_scheme: str = 'paper'
  dtype: Any = jnp.float32
  exchange: Exchange = AllTowersHere()

  @nn.compact
  def __call__(self, images: Array, *, train: bool) -> Array:
    """Maps [B, H, W, 3] mean-subtracted 0-255 images to [B, classes] logits.

    Args:
      images: the same batch on every device of a tower pair.
      train: enables dropout (needs a 'dropout' rng).

    Returns:
      float32 logits of all classes (both towers).
    """
    if self.init_scheme not in INITIALIZATIONS:
      raise ValueError(f'Unknown init_scheme {self.init_scheme!r}; '
                       f'choose one of {sorted(INITIALIZATIONS)}.')
    towers = self.exchange.local_towers
    layer = self._layer_kwargs
    lrn = lambda x: local_response_norm(
        x, groups=towers, k=self.lrn_k, size=self.lrn_size,
        alpha=self.lrn_alpha, beta=self.lrn_beta)
    pad1, pad2 = ((1, 1), (1, 1)), ((2, 2), (2, 2))

    x = TowerConv(kernel_size=11, strides=4, padding='VALID',
                  shared_input=True, **layer('conv1'))(images)
    x = max_pool(lrn(nn.relu(x)))
    x = TowerConv(kernel_size=5, padding=pad2, **layer('conv2'))(x)
    x = max_pool(lrn(nn.relu(x)))
    x = TowerConv(kernel_size=3, padding=pad1, shared_input=True,
                  **layer('conv3'))(self.exchange(x))
    x = TowerConv(kernel_size=3, padding=pad1, **layer('conv4'))(nn.relu(x))
    x = TowerConv(kernel_size=3, padding=pad1, **layer('conv5'))(nn.relu(x))
    x = max_pool(nn.relu(x))
    # Gather both towers' maps before flattening, so fc6's rows follow the
    # one-device grouped net's (h, w, channel) order.
    x = self.exchange(x).reshape(x.shape[0], -1)
    x = self._dropout(nn.relu(TowerDense(**layer('fc6'))(x)), train)
    x = self._dropout(
        nn.relu(TowerDense(**layer('fc7'))(self.exchange(x))), train)
    x = TowerDense(**layer('fc8'))(self.exchange(x))
    logits = self.exchange(x)[:, :self.num_classes]
    return logits.astype(jnp.float32)

  def _layer_kwargs(self, name: str) -> dict[str, Any]:
    std, bias = INITIALIZATIONS[self.init_scheme][name]
    if name == 'fc8':
      features = math.ceil(self.num_classes / NUM_TOWERS)
    else:
      features = max(1, round(TOWER_CHANNELS[name] * self.width))
    return dict(features=features, towers=self.exchange.local_towers,
                std=std, bias=bias, dtype=self.dtype, name=name)

  def _dropout(self, x: Array, train: bool) -> Array:
    """Dropout with one key per global tower, whatever the device layout."""
    if not train or self.dropout_rate == 0.0:
      return x
    rng = self.make_rng('dropout')
    first = self.exchange.first_tower()
    kept = []
    for t, xt in enumerate(jnp.split(x, self.exchange.local_towers, axis=-1)):
      key = jax.random.fold_in(rng, first + t)
      keep = jax.random.bernoulli(key, 1.0 - self.dropout_rate, xt.shape)
      kept.append(jnp.where(keep, xt / (1.0 - self.dropout_rate), 0))
    return jnp.concatenate(kept, axis=-1)


def count_params(params: Any) -> int:
  """Number of scalars in a parameter tree."""
  return sum(x.size for x in jax.tree.leaves(params))


def feature_map_size(image_size: int) -> int:
  """Height (= width) of conv5's pooled maps for a square input.

  conv1 is 11x11 stride 4 VALID, each pool 3x3 stride 2 VALID, and the other
  convs keep the size (REFERENCE.md).
  """
  pool = lambda n: (n - 3) // 2 + 1
  conv1 = (image_size - 11) // 4 + 1
  return pool(pool(pool(conv1)))


def smallest_image_size() -> int:
  """The smallest input that leaves at least 1x1 maps for fc6 (67)."""
  size = 11
  while feature_map_size(size) < 1:
    size += 1
  return size
