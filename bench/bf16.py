"""Per-layer gradient cosines of bfloat16 options against float64.

One loss-and-gradient evaluation of the net (no dropout) on random
mean-subtracted-scale images and random labels, in float64 (the reference,
with jax_enable_x64), float32, and bfloat16 compute in two variants:

  bf16             the model as it is (`config.dtype='bfloat16'`);
  bf16 + conv1 f32 conv1 and its ReLU, LRN and pool in float32 (conv1 is
                   run as a float32 clone of itself through Flax's public
                   method interception, `nn.intercept_methods`).

Prints the cosine of each layer's kernel gradient to float64's (1.0: same
direction). It also checks whether float32 accumulation could change
anything: it compares each bfloat16 convolution of the net's shapes, as the
model runs it (`cpu_ops.xla_conv`), with the same convolution accumulating
in float32 (`preferred_element_type`).

  python bench/bf16.py                              # tiny net, 67 pixels
  python bench/bf16.py --image_size=227 --width=1   # the paper's net
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # pylint: disable=g-import-not-at-top
import jax  # pylint: disable=g-import-not-at-top
from jax import lax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import optax  # pylint: disable=g-import-not-at-top

from alexnet import backend, cpu_ops, model  # pylint: disable=g-import-not-at-top

jax.config.update('jax_enable_x64', True)

# name -> (compute dtype, conv1 in float32).
OPTIONS = {
    'float32': (jnp.float32, False),
    'bf16': (jnp.bfloat16, False),
    'bf16 + conv1 f32': (jnp.bfloat16, True),
}


def _conv1_in_float32(next_fun, args, kwargs, context):
  """A Flax interceptor: runs conv1 as a float32 copy of itself."""
  module = context.module
  if (module.name != 'conv1' or context.method_name != '__call__'
      or module.dtype == jnp.float32):  # Not conv1, or the copy itself.
    return next_fun(*args, **kwargs)
  float32 = module.clone(parent=None, dtype=jnp.float32)
  return float32.apply({'params': module.variables['params']}, *args,
                       **kwargs)


def gradients(args, dtype, conv1_float32):
  """(loss, kernel gradients) of one batch; parameters made in float32."""
  # The float64 reference takes XLA's convolutions.
  conv_impl = 'xla' if dtype == jnp.float64 else args.conv_impl
  net = model.AlexNet(num_classes=args.num_classes, width=args.width,
                      init_scheme=args.init_scheme, conv_impl=conv_impl,
                      dtype=dtype, dropout_rate=0.0)
  size = args.image_size
  images = 50 * jax.random.normal(jax.random.key(1),
                                  (args.batch_size, size, size, 3))
  labels = jax.random.randint(jax.random.key(2), (args.batch_size,), 0,
                              args.num_classes)
  params = jax.jit(lambda: net.init(jax.random.key(0), images[:1],
                                    train=False)['params'])()
  wide = jnp.promote_types(dtype, jnp.float32)
  params = jax.tree.map(lambda p: p.astype(wide), params)

  def loss(p):
    logits = net.apply({'params': p}, images.astype(wide), train=False)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, labels).mean()

  def value_and_grad(p):
    if not conv1_float32:
      return jax.value_and_grad(loss)(p)
    with nn.intercept_methods(_conv1_in_float32):
      return jax.value_and_grad(loss)(p)

  value, grads = jax.jit(value_and_grad)(params)
  return float(value), {k: np.asarray(v['kernel'], np.float64)
                        for k, v in grads.items()}


def accumulation_gap(args) -> dict[str, float]:
  """Max |difference| of bf16 convs with and without float32 accumulation.

  Args:
    args: uses image_size, width and batch_size.

  Returns:
    {layer: max |y - y_f32acc|} over conv1 and conv2 of the net's shapes;
    0.0 means XLA already accumulates this convolution in float32.
  """
  conv1_out = max(1, round(48 * args.width))
  conv2_out = max(1, round(128 * args.width))
  size1 = (args.image_size - 11) // 4 + 1
  size2 = (size1 - 3) // 2 + 1
  shapes = {  # layer: (input, kernel, stride, pads)
      'conv1': ((args.batch_size, args.image_size, args.image_size, 3),
                (11, 11, 3, 2 * conv1_out), 4, ((0, 0), (0, 0))),
      'conv2': ((args.batch_size, size2, size2, conv1_out),
                (5, 5, conv1_out, conv2_out), 1, ((2, 2), (2, 2)))}
  gaps = {}
  for name, (x_shape, k_shape, stride, pads) in shapes.items():
    x = (50 * jax.random.normal(jax.random.key(3), x_shape)).astype(
        jnp.bfloat16)
    kernel = (0.01 * jax.random.normal(jax.random.key(4), k_shape)).astype(
        jnp.bfloat16)
    plain = jax.jit(cpu_ops.xla_conv, static_argnums=(2, 3))(
        x, kernel, stride, pads)
    wide = jax.jit(lambda x, k: lax.conv_general_dilated(
        x, k, (stride, stride), pads,
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        preferred_element_type=jnp.float32).astype(jnp.bfloat16))(x, kernel)
    gaps[name] = float(jnp.max(jnp.abs(plain.astype(jnp.float32) -
                                       wide.astype(jnp.float32))))
  return gaps


def _cosine(a, b):
  a, b = a.ravel(), b.ravel()
  return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--image_size', type=int, default=67)
  parser.add_argument('--width', type=float, default=0.125)
  parser.add_argument('--batch_size', type=int, default=16)
  parser.add_argument('--num_classes', type=int, default=1000)
  parser.add_argument('--init_scheme', default='caffe',
                      choices=tuple(model.INITIALIZATIONS))
  parser.add_argument('--conv_impl', default='xla',
                      choices=model.CONV_IMPLS)
  args = parser.parse_args()
  backend.start()  # As main.py does: the backend and its CPU options.
  print(f'{jax.default_backend()}; image {args.image_size}, width '
        f'{args.width}, batch {args.batch_size}, init {args.init_scheme}, '
        f'conv_impl {args.conv_impl}; cosine of kernel gradients to float64')
  _, reference = gradients(args, jnp.float64, False)
  print(f'{"option":<18} {"loss":>8} ' +
        ' '.join(f'{name:>6}' for name in reference))
  for option, (dtype, conv1_float32) in OPTIONS.items():
    loss, grads = gradients(args, dtype, conv1_float32)
    print(f'{option:<18} {loss:8.4f} ' + ' '.join(
        f'{_cosine(grads[n], reference[n]):6.3f}' for n in reference))
  gaps = accumulation_gap(args)
  print('bf16 convolution vs the same accumulating in float32, max |diff|: '
        + ', '.join(f'{name} {gap:g}' for name, gap in gaps.items()))


if __name__ == '__main__':
  main()
