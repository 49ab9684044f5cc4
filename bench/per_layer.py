"""Per-layer forward and forward+backward times, JAX model vs PyTorch peer.

Each layer of the two-tower net runs alone on a random input of the shape it
sees in the full net at the given batch size: the JAX side through the
layer code of `alexnet.model` (both towers on one device, as
`towers_per_device=2` runs them), the PyTorch side through the modules of
`bench.peer_torch`'s grouped net. Backward computes the gradients of the
layer's parameters and of its input (not of the image at conv1, which
training never needs). 'update' is the paper's optimizer update over all 61M
parameters. Used by `bench/train_step.py --per_layer` to find where XLA loses.

`print_kernel_table` (`bench/train_step.py --kernels`) times each kernel of
`alexnet.cpu_ops` against the stock JAX expression it replaces: the figures
behind `conv_impl='patches'` and the hand-written LRN gradient and pooling.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from alexnet import cpu_ops
from alexnet import model
from bench import peer_torch

PAD1, PAD2 = ((1, 1), (1, 1)), ((2, 2), (2, 2))
LRN = dict(k=2.0, size=5, alpha=1e-4, beta=0.75)


@dataclasses.dataclass(frozen=True)
class Layer:
  """One row of the table.

  Attributes:
    name: row label.
    shape: input shape without the batch axis (NHWC or [features]).
    jax_fn: (params, x, key) -> y; params None for parameter-free layers.
    init: flax module whose init gives the params, or None.
    torch_index: index of the module in peer_torch's nn.Sequential.
    input_grad: whether backward needs the gradient of the input.
  """

  name: str
  shape: tuple[int, ...]
  jax_fn: Callable[..., Any]
  init: Any = None
  torch_index: int | None = None
  input_grad: bool = True


def _module_layer(name, shape, module, torch_index, input_grad=True):
  fn = lambda params, x, key: module.apply({'params': params}, x)
  return Layer(name, shape, fn, module, torch_index, input_grad)


def _dropout(params, x, key):
  del params
  return model.AlexNet().apply({}, x, True, method=model.AlexNet.dropout,
                               rngs={'dropout': key})


def layers(dtype, conv_impl: str = 'auto', image_size: int = 227,
           num_classes: int = 1000) -> list[Layer]:
  """The net's layers in order, with the input shapes an image of
  `image_size` gives them."""
  impl = model.resolve_conv_impl(conv_impl)
  conv = lambda f, k, **kw: model.TowerConv(features=f, kernel_size=k,
                                            dtype=dtype, conv_impl=impl, **kw)
  dense = lambda f: model.TowerDense(features=f, dtype=dtype)
  lrn = lambda p, x, key: cpu_ops.local_response_norm(x, groups=2, **LRN)
  pool = lambda p, x, key: cpu_ops.max_pool(x)
  pooled = lambda n: (n - 3) // 2 + 1
  s1 = (image_size - 11) // 4 + 1  # conv1's maps (55 at 227)
  s2 = pooled(s1)                  # conv2's (27)
  s3 = pooled(s2)                  # conv3-conv5's (13)
  s6 = pooled(s3)                  # pool5's (6)
  return [
      _module_layer('conv1', (image_size, image_size, 3),
                    conv(48, 11, strides=4, padding='VALID',
                         shared_input=True), 0, input_grad=False),
      Layer('lrn1', (s1, s1, 96), lrn, torch_index=2),
      Layer('pool1', (s1, s1, 96), pool, torch_index=3),
      _module_layer('conv2', (s2, s2, 96), conv(128, 5, padding=PAD2), 4),
      Layer('lrn2', (s2, s2, 256), lrn, torch_index=6),
      Layer('pool2', (s2, s2, 256), pool, torch_index=7),
      _module_layer('conv3', (s3, s3, 256),
                    conv(192, 3, padding=PAD1, shared_input=True), 8),
      _module_layer('conv4', (s3, s3, 384), conv(192, 3, padding=PAD1), 10),
      _module_layer('conv5', (s3, s3, 384), conv(128, 3, padding=PAD1), 12),
      Layer('pool5', (s3, s3, 256), pool, torch_index=14),
      _module_layer('fc6', (s6 * s6 * 256,), dense(2048), 16),
      Layer('drop6', (4096,), _dropout, torch_index=18),
      _module_layer('fc7', (4096,), dense(2048), 19),
      _module_layer('fc8', (4096,), dense(-(-num_classes // 2)), 22),
  ]


def _mean_seconds(run: Callable[[], Any], steps: int, warmup: int) -> float:
  for _ in range(warmup):
    jax.block_until_ready(run())
  start = time.perf_counter()
  for _ in range(steps):
    jax.block_until_ready(run())
  return (time.perf_counter() - start) / steps


def time_jax(layer: Layer, batch: int, dtype, steps: int, warmup: int
             ) -> tuple[float, float]:
  """(forward, forward+backward) seconds of one JAX layer."""
  x = 50 * jax.random.normal(jax.random.key(0), (batch, *layer.shape), dtype)
  params = None
  if layer.init is not None:
    params = layer.init.init(jax.random.key(1), x[:1])['params']
  key = jax.random.key(2)
  forward = jax.jit(layer.jax_fn)

  @jax.jit
  def backward(params, x, key):
    if layer.input_grad:
      y, vjp = jax.vjp(lambda p, x: layer.jax_fn(p, x, key), params, x)
    else:
      y, vjp = jax.vjp(lambda p: layer.jax_fn(p, x, key), params)
    # Returning y keeps XLA from dropping the forward of linear layers,
    # whose backward does not read their output.
    return y, vjp(jnp.ones_like(y))

  fwd = _mean_seconds(lambda: forward(params, x, key), steps, warmup)
  bwd = _mean_seconds(lambda: backward(params, x, key), steps, warmup)
  return fwd, bwd


def time_torch(layer: Layer, batch: int, steps: int, warmup: int,
               **net) -> tuple[float, float]:
  """(forward, forward+backward) seconds of the PyTorch peer's layer; `net`:
  `peer_torch.build_model`'s image_size and num_classes."""
  import torch  # pylint: disable=g-import-not-at-top
  module = peer_torch.build_model(**net)[layer.torch_index]
  module.train()
  # NCHW shape in channels_last memory, like the peer's activations.
  x = 50 * torch.randn(batch, *layer.shape[-1:], *layer.shape[:-1])
  if x.ndim == 4:
    x = x.contiguous(memory_format=torch.channels_last)
  x.requires_grad_(layer.input_grad)

  def forward():
    with torch.no_grad():
      return module(x)

  def backward():
    module.zero_grad(set_to_none=True)
    x.grad = None
    y = module(x)
    y.backward(torch.ones_like(y))

  def seconds(run):
    for _ in range(warmup):
      run()
    start = time.perf_counter()
    for _ in range(steps):
      run()
    return (time.perf_counter() - start) / steps

  return seconds(forward), seconds(backward)


def time_update(tx: optax.GradientTransformation, steps: int, warmup: int,
                torch_ok: bool, image_size: int = 227,
                num_classes: int = 1000) -> tuple[float, float | None]:
  """Seconds of one optimizer update `tx` (JAX) and torch SGD, over the
  parameters of the net for `image_size` and `num_classes`."""
  shape = (1, image_size, image_size, 3)
  params = jax.eval_shape(
      lambda: model.AlexNet(num_classes=num_classes).init(
          jax.random.key(0), jnp.zeros(shape), train=False))
  params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype),
                        params['params'])
  state = tx.init(params)

  @jax.jit
  def update(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  jax_seconds = _mean_seconds(lambda: update(params, state, params), steps,
                              warmup)
  if not torch_ok:
    return jax_seconds, None
  import torch  # pylint: disable=g-import-not-at-top
  net = peer_torch.build_model(image_size=image_size, num_classes=num_classes)
  for p in net.parameters():
    p.grad = torch.ones_like(p)
  sgd = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9,
                        weight_decay=5e-4)
  start = None
  for i in range(warmup + steps):
    if i == warmup:
      start = time.perf_counter()
    sgd.step()
  return jax_seconds, (time.perf_counter() - start) / steps


def print_table(batch: int, dtype, selected: list[str], steps: int,
                warmup: int, torch_ok: bool,
                tx: optax.GradientTransformation,
                conv_impl: str = 'auto', image_size: int = 227,
                num_classes: int = 1000) -> None:
  """Prints ms per layer, JAX and PyTorch, forward and forward+backward.

  Args:
    batch: images per step.
    dtype: JAX compute dtype.
    selected: row names to run; empty runs all.
    steps, warmup: timed and untimed repetitions per figure.
    torch_ok: whether to run the PyTorch side.
    tx: the optimizer whose update is the 'update' row.
    conv_impl: the convolutions' config.conv_impl.
    image_size, num_classes: the net's input side and classes.
  """
  net = dict(image_size=image_size, num_classes=num_classes)
  print(f'\nper layer, {image_size}x{image_size} images, batch {batch}, ms (mean of {steps} after {warmup} '
        'warm-up); speed = PyTorch ms / JAX ms, >1: JAX faster')
  print(f'{"layer":<8} {"JAX fwd":>9} {"torch fwd":>9} {"speed":>6}  '
        f'{"JAX f+b":>9} {"torch f+b":>9} {"speed":>6}')
  totals = np.zeros(4)
  for layer in layers(dtype, conv_impl, **net):
    if selected and layer.name not in selected:
      continue
    jf, jb = time_jax(layer, batch, dtype, steps, warmup)
    tf, tb = (time_torch(layer, batch, steps, warmup, **net) if torch_ok
              else (float('nan'),) * 2)
    totals += [jf, tf, jb, tb]
    _print_row(layer.name, jf, tf, jb, tb)
  if not selected or 'update' in selected:
    ju, tu = time_update(tx, steps, warmup, torch_ok, **net)
    tu = float('nan') if tu is None else tu
    totals += [0, 0, ju, tu]
    _print_row('update', float('nan'), float('nan'), ju, tu)
  _print_row('total', *totals)


def _print_row(name, jf, tf, jb, tb):
  ms = lambda s: f'{1e3 * s:9.1f}'
  print(f'{name:<8} {ms(jf)} {ms(tf)} {tf / jf:6.2f}  '
        f'{ms(jb)} {ms(tb)} {tb / jb:6.2f}')


def _lrn_by_autodiff(p, x, key):
  """The LRN formula as plain jnp, differentiated by JAX."""
  del p, key
  *lead, channels = x.shape
  a = x.reshape(*lead, 2, channels // 2)
  padded = jnp.pad(jnp.square(a), [(0, 0)] * (a.ndim - 1) + [(2, 2)])
  window = sum(padded[..., i:i + a.shape[-1]] for i in range(LRN['size']))
  d = LRN['k'] + LRN['alpha'] * window
  return (a / d ** LRN['beta']).reshape(x.shape)


def print_kernel_table(batch: int, steps: int, warmup: int,
                       image_size: int = 227) -> None:
  """Prints ms of each `cpu_ops` kernel and of the stock JAX it replaces.

  Args:
    batch: images per step.
    steps, warmup: timed and untimed repetitions per figure.
    image_size: the net's input side.
  """
  by_name = {layer.name: layer
             for layer in layers(jnp.float32, 'patches', image_size)}
  stock = {layer.name: layer
           for layer in layers(jnp.float32, 'xla', image_size)}
  flax_pool = lambda p, x, key: nn.max_pool(x, (3, 3), strides=(2, 2))
  pairs = [(name, stock[name], by_name[name])
           for name in ('conv1', 'conv2', 'conv3', 'conv4', 'conv5')]
  pairs += [('lrn1', dataclasses.replace(by_name['lrn1'],
                                         jax_fn=_lrn_by_autodiff),
             by_name['lrn1']),
            ('pool1', dataclasses.replace(by_name['pool1'], jax_fn=flax_pool),
             by_name['pool1'])]
  print(f'\ncpu_ops kernels vs stock JAX, {image_size}x{image_size} images, '
        f'batch {batch}, ms (mean of {steps} '
        f'after {warmup} warm-up); speed = stock ms / cpu_ops ms')
  print(f'{"layer":<8} {"ops fwd":>9} {"stock fwd":>9} {"speed":>6}  '
        f'{"ops f+b":>9} {"stock f+b":>9} {"speed":>6}')
  timed = functools.partial(time_jax, batch=batch, dtype=jnp.float32,
                            steps=steps, warmup=warmup)
  for name, plain, fast in pairs:
    (sf, sb), (ff, fb) = timed(plain), timed(fast)
    _print_row(name, ff, sf, fb, sb)
