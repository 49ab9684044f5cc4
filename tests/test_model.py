"""Tests of the tower model: shapes, parameter count, LRN, init, dropout."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alexnet import model

SMALL = dict(num_classes=10, width=0.125)


def _full_size_shapes():
  net = model.AlexNet()
  images = jax.ShapeDtypeStruct((2, 227, 227, 3), jnp.float32)
  variables = jax.eval_shape(
      lambda x: net.init(jax.random.key(0), x, train=False), images)
  (logits, state) = jax.eval_shape(
      lambda v, x: net.apply(v, x, train=False, capture_intermediates=True),
      variables, images)
  layers = {name: out['__call__'][0].shape
            for name, out in state['intermediates'].items()
            if name != '__call__'}
  return variables['params'], layers, logits.shape


def test_full_size_parameter_count_and_layer_shapes():
  params, layers, logits = _full_size_shapes()
  # REFERENCE.md: 60,965,224 parameters for 1000 classes (= Caffe's).
  assert model.count_params(params) == 60_965_224
  assert layers == {
      'conv1': (2, 55, 55, 96), 'conv2': (2, 27, 27, 256),
      'conv3': (2, 13, 13, 384), 'conv4': (2, 13, 13, 384),
      'conv5': (2, 13, 13, 256), 'fc6': (2, 4096), 'fc7': (2, 4096),
      'fc8': (2, 1000)}
  assert logits == (2, 1000)
  # One tower each: half the kernels, stacked on a leading axis of 2.
  assert params['conv1']['kernel'].shape == (2, 11, 11, 3, 48)
  assert params['conv2']['kernel'].shape == (2, 5, 5, 48, 128)
  assert params['conv3']['kernel'].shape == (2, 3, 3, 256, 192)
  assert params['fc6']['kernel'].shape == (2, 9216, 2048)
  assert params['fc8']['kernel'].shape == (2, 4096, 500)


def _lrn_by_loops(a, groups, k, size, alpha, beta):
  """The paper's formula, written out index by index."""
  out = np.zeros_like(a)
  n = a.shape[-1] // groups
  for g in range(groups):
    for i in range(n):
      lo, hi = max(0, i - size // 2), min(n - 1, i + size // 2)
      window = a[..., g * n + lo:g * n + hi + 1]
      out[..., g * n + i] = a[..., g * n + i] / (
          k + alpha * np.sum(window ** 2, axis=-1)) ** beta
  return out


@pytest.mark.parametrize('groups', [1, 2])
def test_lrn_matches_the_papers_formula_inside_each_tower(groups):
  rng = np.random.default_rng(0)
  # Large activations so that the normalisation term matters.
  a = rng.uniform(0, 300, size=(2, 3, 3, 12)).astype(np.float32)
  constants = dict(k=2.0, size=5, alpha=1e-4, beta=0.75)
  got = model.local_response_norm(jnp.asarray(a), groups=groups, **constants)
  want = _lrn_by_loops(a.astype(np.float64), groups, **constants)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  if groups == 2:
    # The window stops at the tower boundary: channel 5 (the last of tower
    # 0) must not see channels 6-7, which a single window would.
    one_window = _lrn_by_loops(a.astype(np.float64), 1, **constants)
    assert not np.allclose(got[..., 5], one_window[..., 5], rtol=1e-6)


@pytest.mark.parametrize('scheme', ['paper', 'caffe'])
def test_initialization_statistics(scheme):
  net = model.AlexNet(num_classes=1000, width=0.5, init_scheme=scheme)
  params = net.init(jax.random.key(0), jnp.zeros((1, 67, 67, 3)),
                    train=False)['params']
  for name, (std, bias) in model.INITIALIZATIONS[scheme].items():
    kernel = np.asarray(params[name]['kernel'])
    for tower in kernel:  # Each tower drawn with its own key.
      assert abs(tower.std() / std - 1) < 0.05, name
      assert abs(tower.mean()) < 0.05 * std, name
    np.testing.assert_array_equal(params[name]['bias'], np.float32(bias))
  assert not np.allclose(params['conv1']['kernel'][0],
                         params['conv1']['kernel'][1])


def test_schemes_differ_where_the_papers_say():
  paper, caffe = model.INITIALIZATIONS['paper'], model.INITIALIZATIONS['caffe']
  assert {n for n, (_, b) in paper.items() if b == 1.0} == {
      'conv2', 'conv4', 'conv5', 'fc6', 'fc7'}
  assert caffe['fc6'] == (0.005, 0.1) and caffe['fc7'] == (0.005, 0.1)


def test_unknown_init_scheme_is_refused():
  with pytest.raises(ValueError, match='init_scheme'):
    model.AlexNet(init_scheme='xavier').init(
        jax.random.key(0), jnp.zeros((1, 67, 67, 3)), train=False)


def _small_net_and_params(**kwargs):
  net = model.AlexNet(**SMALL, **kwargs)
  params = net.init(jax.random.key(0), jnp.zeros((1, 67, 67, 3)),
                    train=False)['params']
  return net, params


def test_odd_class_count_gives_exactly_that_many_logits():
  net = model.AlexNet(num_classes=7, width=0.125)
  variables = net.init(jax.random.key(0), jnp.zeros((1, 67, 67, 3)),
                       train=False)
  assert variables['params']['fc8']['kernel'].shape[-1] == 4
  assert net.apply(variables, jnp.ones((3, 67, 67, 3)), train=False).shape == (
      3, 7)


def test_dropout_rate_and_train_eval_switch():
  net, params = _small_net_and_params(dropout_rate=0.5)
  images = jax.random.normal(jax.random.key(1), (4, 67, 67, 3)) * 50
  evaluate = lambda: net.apply({'params': params}, images, train=False)
  np.testing.assert_array_equal(evaluate(), evaluate())  # Deterministic.
  train = lambda seed: net.apply({'params': params}, images, train=True,
                                 rngs={'dropout': jax.random.key(seed)})
  assert not np.allclose(train(0), evaluate())
  assert not np.allclose(train(0), train(1))
  np.testing.assert_array_equal(train(0), train(0))

  ones = jnp.ones((64, 2 * 512))
  dropped = net.apply({}, ones, True, method=model.AlexNet._dropout,
                      rngs={'dropout': jax.random.key(2)})
  kept = np.asarray(dropped) != 0
  assert abs(kept.mean() - 0.5) < 0.01
  np.testing.assert_array_equal(np.asarray(dropped)[kept], 2.0)  # 1/(1-p).
  # Each tower draws its own mask.
  assert not np.array_equal(kept[:, :512], kept[:, 512:])


def test_bfloat16_compute_keeps_float32_parameters():
  net, params = _small_net_and_params(dtype=jnp.bfloat16)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  logits = net.apply({'params': params}, jnp.ones((2, 67, 67, 3)), train=False)
  reference = model.AlexNet(**SMALL).apply({'params': params},
                                           jnp.ones((2, 67, 67, 3)),
                                           train=False)
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, reference, rtol=0.05, atol=0.05)


def _lrn_by_autodiff(x, groups, k, size, alpha, beta):
  """The formula with jnp.pow, for jax.grad to differentiate."""
  *lead, channels = x.shape
  a = x.reshape(*lead, groups, channels // groups)
  half = size // 2
  padded = jnp.pad(jnp.square(a), [(0, 0)] * (a.ndim - 1) + [(half, half)])
  window = sum(padded[..., i:i + a.shape[-1]] for i in range(size))
  return (a / (k + alpha * window) ** beta).reshape(x.shape)


@pytest.mark.parametrize('groups,beta', [(1, 0.75), (2, 0.75), (2, 0.6)])
def test_lrn_hand_written_gradient_equals_autodiff(groups, beta):
  rng = np.random.default_rng(1)
  a = jnp.asarray(rng.uniform(-300, 300, size=(2, 3, 3, 12)), jnp.float32)
  cotangent = jnp.asarray(rng.normal(size=a.shape), jnp.float32)
  constants = dict(k=2.0, size=5, alpha=1e-4, beta=beta)
  got = jax.vjp(lambda x: model.local_response_norm(
      x, groups=groups, **constants), a)[1](cotangent)[0]
  want = jax.vjp(lambda x: _lrn_by_autodiff(x, groups, **constants),
                 a)[1](cotangent)[0]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('shape', [(2, 13, 13, 4), (1, 6, 7, 2)])
def test_max_pool_equals_flax_max_pool_ties_included(shape):
  """The first maximum of a window (row-major) gets the gradient."""
  rng = np.random.default_rng(2)
  # Few distinct values: most windows hold tied maxima.
  x = jnp.asarray(rng.integers(-2, 3, size=shape), jnp.float32)
  flax_pool = lambda x: nn.max_pool(x, (3, 3), strides=(2, 2),
                                    padding='VALID')
  want, want_vjp = jax.vjp(flax_pool, x)
  got, got_vjp = jax.vjp(model.max_pool, x)
  np.testing.assert_array_equal(got, want)
  cotangent = jnp.asarray(rng.normal(size=want.shape), jnp.float32)
  # Overlapping windows add their cotangents in another order: ulps only.
  np.testing.assert_allclose(got_vjp(cotangent)[0], want_vjp(cotangent)[0],
                             rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('kernel_size,strides,padding,size', [
    (11, 4, 'VALID', 35), (3, 1, ((1, 1), (1, 1)), 7)])
def test_blocked_patch_convolutions_equal_xla_gradients_included(
    kernel_size, strides, padding, size):
  """conv1's and the 3x3 layers' patch paths, over several image blocks."""
  conv = model.TowerConv(features=4, kernel_size=kernel_size,
                         strides=strides, padding=padding, shared_input=True)
  images = jax.random.normal(jax.random.key(0), (40, size, size, 3))
  params = conv.init(jax.random.key(1), images[:1])['params']

  def plain(params, x):
    kernel = jnp.concatenate(list(params['kernel']), axis=-1)
    y = jax.lax.conv_general_dilated(
        x, kernel, (strides, strides), padding,
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return y + params['bias'].reshape(-1)

  got, got_vjp = jax.vjp(lambda p, x: conv.apply({'params': p}, x),
                         params, images)
  want, want_vjp = jax.vjp(plain, params, images)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  cotangent = jax.random.normal(jax.random.key(2), want.shape)
  for g, w in zip(jax.tree.leaves(got_vjp(cotangent)),
                  jax.tree.leaves(want_vjp(cotangent))):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * np.abs(w).max())
