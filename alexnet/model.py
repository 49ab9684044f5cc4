"""The paper's two-tower AlexNet as a Flax Linen module.

The network is written for the towers that one device holds: `local_towers`
is 2 when both towers share a device and 1 when each device holds one tower
(the paper's model parallelism, see `parallel.py`). Every parameter is
stacked on a leading tower axis of size `local_towers`; a host copy of the
whole net therefore has a leading axis of `towers` (2) on every leaf.

Inside the module the activations of the local towers sit side by side on
the channel axis, tower 0 first. Layers that read only their own tower
(conv2, conv4, conv5, LRN, dropout) run once per tower on its channels;
layers that read both towers (conv3, fc6, fc7, fc8) first call the injected
`exchange`, which returns the channels of all towers, and conv1, which reads
the image, is shared the same way. Nothing else crosses towers, except with
`lrn_across_towers` (Caffe's bvlc_alexnet): its LRN windows read the
neighbouring tower's edge channels.

Shapes for a 227x227 input (docs/REFERENCE.md, Architecture; both towers):
conv1 55x55x96 -> pool 27x27x96 -> conv2 27x27x256 -> pool 13x13x256 ->
conv3 13x13x384 -> conv4 13x13x384 -> conv5 13x13x256 -> pool 6x6x256 ->
fc6 4096 -> fc7 4096 -> fc8 1000.

The paper's ablations (docs/REFERENCE.md, Ablations) are attributes: LRN
off, 2x2 non-overlapping pooling, tanh units, and `towers=1`, the paper's
one-GPU comparison net: one tower with half the kernels of conv1-conv4 and,
as the paper's footnote to section 3.2 says, conv5 and the fully connected
layers at full size (`ONE_TOWER_FULL_SIZE`); its fc8 gives all classes. The
layers' CPU kernels live in `cpu_ops.py`.
"""

from collections.abc import Callable
import dataclasses
import functools
import math
from typing import Any, Protocol

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from alexnet import cpu_ops
from alexnet import errors

Array = jax.Array

# Kernels per tower at width 1.0 (docs/REFERENCE.md, Architecture).
TOWER_CHANNELS = {'conv1': 48, 'conv2': 128, 'conv3': 192, 'conv4': 192,
                  'conv5': 128, 'fc6': 2048, 'fc7': 2048}
# Layers the paper's one-tower comparison net keeps at the two towers' total
# width: most parameters sit in fc6, which reads conv5, so halving these too
# would have compared against a far smaller net (docs/REFERENCE.md,
# Architecture).
ONE_TOWER_FULL_SIZE = ('conv5', 'fc6', 'fc7')

# (weight std, bias) per layer. 'paper': section 5 of the paper. 'caffe':
# BVLC Caffe's bvlc_alexnet, which learns from 0-1 scaled or tiny inputs where
# the paper's biases of 1 keep the loss flat (docs/REFERENCE.md,
# Initialization).
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

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    'relu': nn.relu, 'tanh': jnp.tanh}

# 'xla': lax.conv_general_dilated everywhere (cuDNN on GPUs, the MXU on
# TPUs, Eigen on CPUs with backend.CPU_XLA_FLAGS). 'patches':
# cpu_ops.patch_conv, patch-matmul kernel gradients, for an XLA:CPU whose
# own kernel gradients are slow (YNNPACK's, without those flags). 'auto':
# 'xla', the fastest on every backend measured (docs/performance.md).
CONV_IMPLS = ('auto', 'xla', 'patches')


def resolve_conv_impl(conv_impl: str) -> str:
  """'auto' -> 'xla'; the others as they are."""
  return 'xla' if conv_impl == 'auto' else conv_impl


class Exchange(Protocol):
  """How the towers of one forward pass see each other.

  `__call__` takes the local towers' activations, side by side on the last
  axis, and returns those of all towers in tower order. `first_tower` is
  the global index of the first local tower (it keys dropout, so that masks
  do not depend on the device layout).
  """

  local_towers: int

  def __call__(self, x: Array) -> Array:
    ...

  def first_tower(self) -> Array | int:
    ...


@dataclasses.dataclass(frozen=True)
class AllTowersHere:
  """All towers on this device: their channels are already side by side."""

  local_towers: int = 2

  def __call__(self, x: Array) -> Array:
    return x

  def first_tower(self) -> int:
    return 0


def _stacked_normal(std: float):
  """N(0, std) for a [towers, ...] parameter, each tower from its own key."""
  def init(key, shape, dtype=jnp.float32):
    towers = [std * jax.random.normal(jax.random.fold_in(key, t), shape[1:],
                                      dtype) for t in range(shape[0])]
    return jnp.stack(towers)
  return init


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
  is several times slower on CPU (docs/REFERENCE.md, Speed anchors).
  """

  features: int
  kernel_size: int
  strides: int = 1
  padding: str | tuple[tuple[int, int], tuple[int, int]] = 'SAME'
  shared_input: bool = False
  towers: int = 2
  std: float = 0.01
  bias: float = 0.0
  dtype: Any = jnp.float32
  # 'xla' or 'patches' (resolved, see `resolve_conv_impl`).
  conv_impl: str = 'xla'

  @nn.compact
  def __call__(self, x: Array) -> Array:
    in_features = x.shape[-1] // (1 if self.shared_input else self.towers)
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
    conv = {'xla': cpu_ops.xla_conv,
            'patches': cpu_ops.patch_conv}[self.conv_impl]
    return conv(x, kernel, self.strides, tuple(map(tuple, pads)))


# Outputs per tower up to which TowerDense reads its input once for all.
_FEW_FEATURES = 512


class TowerDense(nn.Module):
  """A fully connected layer per tower, all towers reading the same input."""

  features: int
  towers: int = 2
  std: float = 0.01
  bias: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel, bias = _tower_params(self, (x.shape[-1], self.features))
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    # Kernels are read where they lie (a copy as one [in, towers * out]
    # matrix costs, on the CPU, as much again as fc7's matmul). Forward and
    # gradients, batch 128, CPU: 2 x 5 outputs from 4096 (fc8, 10 classes)
    # take 0.4 ms as 'bi,tio' and 9.0 ms as a tower batch; fc7 145 and 84.
    if self.features <= _FEW_FEATURES:
      y = jnp.einsum('bi,tio->bto', x, kernel)
    else:
      towers = jnp.broadcast_to(x, (self.towers, *x.shape))
      y = jnp.moveaxis(jnp.einsum('tbi,tio->tbo', towers, kernel), 0, 1)
    return y.reshape(x.shape[0], -1) + bias.reshape(-1).astype(self.dtype)


def _refuse_unless(ok: bool, message: str) -> None:
  if not ok:
    raise errors.ConfigError(message)


class AlexNet(nn.Module):
  """The paper's net, for the towers one device holds (see module docstring).

  Invalid values are refused with an `errors.ConfigError` that names the
  config field setting them (the field of the same name; `lrn_enabled` is
  config.lrn.enabled).

  Attributes:
    num_classes: logits returned. fc8 gives ceil(num_classes / towers) per
      tower (500 for ImageNet); an odd count drops the last unit.
    width: channel multiplier for every layer; 1.0 is the paper's net.
    towers: 2 (the paper) or 1 (its one-GPU comparison net).
    lrn_enabled: False makes every LRN the identity.
    lrn_k, lrn_size, lrn_alpha, lrn_beta: LRN constants (paper: 2, 5, 1e-4,
      0.75).
    lrn_alpha_over_size: scale the sum of squares by lrn_alpha / lrn_size,
      as Caffe does (paper: False, lrn_alpha itself).
    lrn_across_towers: let the LRN window cross from one tower's channels
      into the other's, as Caffe's LRN over all 96 (256) channels does
      (paper: False, each tower apart). On a tower pair the neighbouring
      tower's edge channels are exchanged.
    pool_size, pool_stride: max pooling windows (paper: 3, 2).
    activation: a key of ACTIVATIONS (paper: 'relu').
    dropout_rate: dropout after fc6 and fc7 in training.
    init_scheme: a key of INITIALIZATIONS.
    conv_impl: one of CONV_IMPLS.
    dtype: compute dtype of every layer; parameters are always float32.
      In bfloat16, float32 accumulation or a float32 conv1 barely change
      the gradients' direction (`bench/bf16.py`), so neither is used.
    exchange: the tower exchange; None for all towers on one device.
  """

  num_classes: int = 1000
  width: float = 1.0
  towers: int = 2
  lrn_enabled: bool = True
  lrn_k: float = 2.0
  lrn_size: int = 5
  lrn_alpha: float = 1e-4
  lrn_beta: float = 0.75
  lrn_alpha_over_size: bool = False
  lrn_across_towers: bool = False
  pool_size: int = 3
  pool_stride: int = 2
  activation: str = 'relu'
  dropout_rate: float = 0.5
  init_scheme: str = 'paper'
  conv_impl: str = 'auto'
  dtype: Any = jnp.float32
  exchange: Exchange | None = None

  def __post_init__(self):
    choices = {'init_scheme': tuple(INITIALIZATIONS), 'conv_impl': CONV_IMPLS,
               'activation': tuple(ACTIVATIONS), 'towers': (1, 2)}
    for field, allowed in choices.items():
      value = getattr(self, field)
      _refuse_unless(value in allowed,
                     f'config.{field}={value!r}: choose one of {allowed}.')
    _refuse_unless(
        self.pool_size >= 1 and self.pool_stride >= 1,
        f'config.pool_size={self.pool_size} and config.pool_stride='
        f'{self.pool_stride} must be positive (paper: 3 and 2).')
    super().__post_init__()

  @nn.compact
  def __call__(self, images: Array, *, train: bool) -> Array:
    """Maps [B, H, W, 3] mean-subtracted 0-255 images to [B, classes] logits.

    Args:
      images: the same batch on every device of a tower pair.
      train: enables dropout (needs a 'dropout' rng).

    Returns:
      float32 logits of all classes (all towers).
    """
    exchange = self._exchange
    layer = self._layer_kwargs
    act = ACTIVATIONS[self.activation]
    pool = functools.partial(cpu_ops.max_pool, size=self.pool_size,
                             stride=self.pool_stride)
    conv = functools.partial(TowerConv,
                             conv_impl=resolve_conv_impl(self.conv_impl))
    pad1, pad2 = ((1, 1), (1, 1)), ((2, 2), (2, 2))

    x = conv(kernel_size=11, strides=4, padding='VALID', shared_input=True,
             **layer('conv1'))(images)
    x = pool(self._lrn(act(x)))
    x = conv(kernel_size=5, padding=pad2, **layer('conv2'))(x)
    x = pool(self._lrn(act(x)))
    x = conv(kernel_size=3, padding=pad1, shared_input=True,
             **layer('conv3'))(exchange(x))
    x = conv(kernel_size=3, padding=pad1, **layer('conv4'))(act(x))
    x = conv(kernel_size=3, padding=pad1, **layer('conv5'))(act(x))
    x = pool(act(x))
    # Gather all towers' maps before flattening, so fc6's rows follow the
    # one-device grouped net's (h, w, channel) order.
    x = exchange(x).reshape(x.shape[0], -1)
    x = self.dropout(act(TowerDense(**layer('fc6'))(x)), train)
    x = self.dropout(act(TowerDense(**layer('fc7'))(exchange(x))), train)
    x = TowerDense(**layer('fc8'))(exchange(x))
    logits = exchange(x)[:, :self.num_classes]
    return logits.astype(jnp.float32)

  @property
  def _exchange(self) -> Exchange:
    if self.exchange is None:
      return AllTowersHere(self.towers)
    return self.exchange

  def _lrn(self, x: Array) -> Array:
    """LRN inside each tower or across all channels; identity if disabled."""
    if not self.lrn_enabled:
      return x
    alpha = self.lrn_alpha
    if self.lrn_alpha_over_size:
      alpha /= self.lrn_size
    lrn = functools.partial(cpu_ops.local_response_norm, k=self.lrn_k,
                            size=self.lrn_size, alpha=alpha,
                            beta=self.lrn_beta)
    exchange = self._exchange
    if not self.lrn_across_towers:
      return lrn(x, groups=exchange.local_towers)
    halo = self.lrn_size // 2
    if exchange.local_towers == self.towers or halo == 0:
      return lrn(x, groups=1)
    left, right = _neighbour_edges(x, halo, exchange, self.towers)
    wide = lrn(jnp.concatenate([left, x, right], axis=-1), groups=1)
    return wide[..., halo:halo + x.shape[-1]]

  def _layer_kwargs(self, name: str) -> dict[str, Any]:
    std, bias = INITIALIZATIONS[self.init_scheme][name]
    if name == 'fc8':
      features = math.ceil(self.num_classes / self.towers)
    else:
      channels = TOWER_CHANNELS[name]
      if self.towers == 1 and name in ONE_TOWER_FULL_SIZE:
        channels *= 2
      features = max(1, round(channels * self.width))
    return dict(features=features, towers=self._exchange.local_towers,
                std=std, bias=bias, dtype=self.dtype, name=name)

  def dropout(self, x: Array, train: bool) -> Array:
    """Dropout with one key per global tower, whatever the device layout.

    Args:
      x: the local towers' activations, side by side on the last axis.
      train: False (or dropout_rate 0) returns x unchanged.

    Returns:
      x with dropout_rate of its units zeroed, the rest scaled up.
    """
    if not train or self.dropout_rate == 0.0:
      return x
    rng = self.make_rng('dropout')
    exchange = self._exchange
    first = exchange.first_tower()
    kept = []
    for t, xt in enumerate(jnp.split(x, exchange.local_towers, axis=-1)):
      key = jax.random.fold_in(rng, first + t)
      keep = jax.random.bernoulli(key, 1.0 - self.dropout_rate, xt.shape)
      kept.append(jnp.where(keep, xt / (1.0 - self.dropout_rate), 0))
    return jnp.concatenate(kept, axis=-1)


def _neighbour_edges(x: Array, halo: int, exchange: Exchange,
                     towers: int) -> tuple[Array, Array]:
  """The channels an LRN window across towers reads from the neighbours.

  For the one tower on this device (`exchange.local_towers` is 1): the last
  `halo` channels of the tower before it and the first `halo` of the tower
  after it, zeros where there is none (the zero padding of the window at
  the net's outer channels). Only these edges travel, not whole maps.

  Args:
    x: [..., C] this tower's activations.
    halo: channels on each side of the window's centre (size // 2).
    exchange: the tower exchange (one local tower).
    towers: towers of the net.

  Returns:
    (left, right), each [..., halo].
  """
  if x.shape[-1] < halo:
    raise errors.ConfigError(
        f'config.lrn.size reaches {halo} channels into the next tower, but '
        f'a tower has only {x.shape[-1]} here: raise config.width or lower '
        'config.lrn.size.')
  edges = exchange(jnp.concatenate([x[..., :halo], x[..., -halo:]], -1))
  edges = edges.reshape(*x.shape[:-1], towers, 2, halo)
  tower = exchange.first_tower()
  zeros = jnp.zeros_like(x[..., :halo])
  before = jnp.take(edges, jnp.maximum(tower - 1, 0), axis=-3)[..., 1, :]
  after = jnp.take(edges, jnp.minimum(tower + 1, towers - 1),
                   axis=-3)[..., 0, :]
  return (jnp.where(tower > 0, before, zeros),
          jnp.where(tower < towers - 1, after, zeros))


def count_params(params: Any) -> int:
  """Number of scalars in a parameter tree."""
  return sum(x.size for x in jax.tree.leaves(params))


def feature_map_size(image_size: int, pool_size: int = 3,
                     pool_stride: int = 2) -> int:
  """Height (= width) of conv5's pooled maps for a square input.

  conv1 is 11x11 stride 4 VALID, each of the three pools VALID, and the
  other convs keep the size (docs/REFERENCE.md, Architecture).

  Args:
    image_size: input height (= width).
    pool_size, pool_stride: the pooling windows.

  Returns:
    The size; below 1 when the input is too small for the net.
  """
  pool = lambda n: (n - pool_size) // pool_stride + 1
  conv1 = (image_size - 11) // 4 + 1
  return pool(pool(pool(conv1)))


def smallest_image_size(pool_size: int = 3, pool_stride: int = 2) -> int:
  """The smallest input that leaves at least 1x1 maps for fc6.

  67 with the paper's 3x3 stride-2 pooling, 39 with 2x2 stride 2.
  """
  size = 11
  while feature_map_size(size, pool_size, pool_stride) < 1:
    size += 1
  return size
