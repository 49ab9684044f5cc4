"""Per-layer gradient cosines of bfloat16 options against float64.

One loss-and-gradient evaluation of the net (no dropout) on random
mean-subtracted-scale images and random labels, in float64 (the reference,
with jax_enable_x64), float32, and bfloat16 compute in three variants:

  bf16             the model as it is (`config.dtype='bfloat16'`);
  bf16 + f32 acc   every convolution with preferred_element_type=float32;
  bf16 + conv1 f32 conv1 and its ReLU, LRN and pool in float32.

The two variants are applied by replacing `cpu_ops.xla_conv` and the model's
per-layer settings for the measurement only. Prints the cosine of each
layer's kernel gradient to float64's (1.0: same direction).

  python bench/bf16.py                              # tiny net, 67 pixels
  python bench/bf16.py --image_size=227 --width=1   # the paper's net
"""

from __future__ import annotations

import argparse
import os
import sys
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
from jax import lax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import optax  # pylint: disable=g-import-not-at-top

from alexnet import cpu_ops, model  # pylint: disable=g-import-not-at-top

jax.config.update('jax_enable_x64', True)
_XLA_CONV = cpu_ops.xla_conv
_LAYER_KWARGS = model.AlexNet._layer_kwargs  # pylint: disable=protected-access


def _f32_accumulating_conv(x, kernel, stride, pads):
  y = lax.conv_general_dilated(
      x, kernel, (stride, stride), pads,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      preferred_element_type=jnp.promote_types(x.dtype, jnp.float32))
  return y.astype(x.dtype)


def _conv1_in_float32(self, name):
  kwargs = _LAYER_KWARGS(self, name)
  if name == 'conv1':
    kwargs['dtype'] = jnp.float32
  return kwargs


# name -> (compute dtype, xla_conv, _layer_kwargs).
OPTIONS = {
    'float32': (jnp.float32, _XLA_CONV, _LAYER_KWARGS),
    'bf16': (jnp.bfloat16, _XLA_CONV, _LAYER_KWARGS),
    'bf16 + f32 acc': (jnp.bfloat16, _f32_accumulating_conv, _LAYER_KWARGS),
    'bf16 + conv1 f32': (jnp.bfloat16, _XLA_CONV, _conv1_in_float32),
}


def gradients(args, dtype, conv, layer_kwargs):
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

  with mock.patch.object(cpu_ops, 'xla_conv', conv), \
       mock.patch.object(model.AlexNet, '_layer_kwargs', layer_kwargs):
    value, grads = jax.jit(jax.value_and_grad(loss))(params)
  return float(value), {k: np.asarray(v['kernel'], np.float64)
                        for k, v in grads.items()}


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
  print(f'{jax.default_backend()}; image {args.image_size}, width '
        f'{args.width}, batch {args.batch_size}, init {args.init_scheme}, '
        f'conv_impl {args.conv_impl}; cosine of kernel gradients to float64')
  _, reference = gradients(args, jnp.float64, _XLA_CONV, _LAYER_KWARGS)
  print(f'{"option":<18} {"loss":>8} ' +
        ' '.join(f'{name:>6}' for name in reference))
  for option, (dtype, conv, layer_kwargs) in OPTIONS.items():
    loss, grads = gradients(args, dtype, conv, layer_kwargs)
    print(f'{option:<18} {loss:8.4f} ' + ' '.join(
        f'{_cosine(grads[n], reference[n]):6.3f}' for n in reference))


if __name__ == '__main__':
  main()
