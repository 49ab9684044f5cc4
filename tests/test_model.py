"""Tests of the tower model and its CPU kernels: shapes, parameter counts,
LRN, pooling, convolutions, init, dropout, bfloat16 and the ablation switches.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from alexnet import cpu_ops
from alexnet import errors
from alexnet import model

SMALL = dict(num_classes=10, width=0.125)
LAYERS = ('conv1', 'conv2', 'conv3', 'conv4', 'conv5', 'fc6', 'fc7', 'fc8')


def _full_size_shapes(size=227, **kwargs):
  net = model.AlexNet(**kwargs)
  images = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
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
  # docs/REFERENCE.md, Architecture: 60,965,224 parameters for 1000 classes.
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
  got = cpu_ops.local_response_norm(jnp.asarray(a), groups=groups, **constants)
  want = _lrn_by_loops(a.astype(np.float64), groups, **constants)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  if groups == 2:
    # The window stops at the tower boundary: channel 5 (the last of tower
    # 0) must not see channels 6-7, which a single window would.
    one_window = _lrn_by_loops(a.astype(np.float64), 1, **constants)
    assert not np.allclose(got[..., 5], one_window[..., 5], rtol=1e-6)


# The published initialisations, written out here rather than read from
# model.INITIALIZATIONS: (kernel std, bias) per layer. The paper (Section
# 5): weights from a zero-mean Gaussian with standard deviation 0.01; biases
# 1 in conv2, conv4, conv5 and the fully-connected hidden layers, 0 in the
# others. Caffe's bvlc_alexnet (train_val.prototxt): std 0.005 in fc6 and
# fc7, biases 0.1 where the paper has 1.
PUBLISHED_INIT = {
    'paper': {'conv1': (0.01, 0), 'conv2': (0.01, 1), 'conv3': (0.01, 0),
              'conv4': (0.01, 1), 'conv5': (0.01, 1), 'fc6': (0.01, 1),
              'fc7': (0.01, 1), 'fc8': (0.01, 0)},
    'caffe': {'conv1': (0.01, 0), 'conv2': (0.01, 0.1), 'conv3': (0.01, 0),
              'conv4': (0.01, 0.1), 'conv5': (0.01, 0.1),
              'fc6': (0.005, 0.1), 'fc7': (0.005, 0.1), 'fc8': (0.01, 0)},
}


@pytest.mark.parametrize('scheme', ['paper', 'caffe'])
def test_initialization_statistics(scheme):
  net = model.AlexNet(num_classes=1000, width=0.5, init_scheme=scheme)
  params = _init(net)['params']
  assert sorted(params) == sorted(PUBLISHED_INIT[scheme])
  for name, (std, bias) in PUBLISHED_INIT[scheme].items():
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
  with pytest.raises(errors.ConfigError, match='init_scheme'):
    model.AlexNet(init_scheme='xavier').init(
        jax.random.key(0), jnp.zeros((1, 67, 67, 3)), train=False)


@pytest.mark.parametrize('field,value', [
    ('activation', 'sigmoid'), ('conv_impl', 'cudnn'), ('towers', 4)])
def test_invalid_choices_are_refused_naming_field_and_choices(field, value):
  with pytest.raises(errors.ConfigError,
                     match=rf'config\.{field}={value!r}: choose one of'):
    model.AlexNet(**{field: value})


def test_non_positive_pooling_is_refused():
  with pytest.raises(errors.ConfigError, match='config.pool_stride=0'):
    model.AlexNet(pool_stride=0)


def _init(net):
  """net's variables for 67-pixel inputs, initialised as one compiled call
  (op by op, a conv net's init costs seconds of dispatch)."""
  return jax.jit(lambda key: net.init(key, jnp.zeros((1, 67, 67, 3)),
                                      train=False))(jax.random.key(0))


def _evaluate(net, variables, images):
  return jax.jit(lambda v, x: net.apply(v, x, train=False))(variables, images)


def _small_net_and_params(**kwargs):
  net = model.AlexNet(**SMALL, **kwargs)
  return net, _init(net)['params']


def test_odd_class_count_gives_exactly_that_many_logits():
  net = model.AlexNet(num_classes=7, width=0.125)
  variables = _init(net)
  assert variables['params']['fc8']['kernel'].shape[-1] == 4
  assert _evaluate(net, variables, jnp.ones((3, 67, 67, 3))).shape == (3, 7)


def test_dropout_rate_and_train_eval_switch():
  net, params = _small_net_and_params(dropout_rate=0.5)
  images = jax.random.normal(jax.random.key(1), (4, 67, 67, 3)) * 50
  evaluate = lambda: _evaluate(net, {'params': params}, images)
  np.testing.assert_array_equal(evaluate(), evaluate())  # Deterministic.
  train = jax.jit(lambda seed: net.apply(
      {'params': params}, images, train=True,
      rngs={'dropout': jax.random.key(seed)}))
  assert not np.allclose(train(0), evaluate())
  assert not np.allclose(train(0), train(1))
  np.testing.assert_array_equal(train(0), train(0))

  ones = jnp.ones((64, 2 * 512))
  dropped = net.apply({}, ones, True, method=model.AlexNet.dropout,
                      rngs={'dropout': jax.random.key(2)})
  kept = np.asarray(dropped) != 0
  assert abs(kept.mean() - 0.5) < 0.01
  np.testing.assert_array_equal(np.asarray(dropped)[kept], 2.0)  # 1/(1-p).
  # Each tower draws its own mask.
  assert not np.array_equal(kept[:, :512], kept[:, 512:])


def _layer_outputs(net, params, images):
  """{layer: its output} of one forward pass."""
  forward = jax.jit(lambda p, x: net.apply(
      {'params': p}, x, train=False, capture_intermediates=True)[1])
  state = forward(params, images)
  return {name: state['intermediates'][name]['__call__'][0]
          for name in LAYERS}


def test_bfloat16_compute_keeps_float32_parameters():
  net, params = _small_net_and_params(dtype=jnp.bfloat16)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  images = jax.random.normal(jax.random.key(1), (2, 67, 67, 3)) * 50
  # Every layer computes in bfloat16 ...
  outputs = _layer_outputs(net, params, images)
  assert {name: x.dtype for name, x in outputs.items()} == dict.fromkeys(
      LAYERS, jnp.bfloat16)
  # ... and the float32 logits follow float32's to bfloat16's precision
  # (8 bits of mantissa: ~0.4% per rounding, a few percent of the logits'
  # spread after eight layers), without equalling them.
  logits = _evaluate(net, {'params': params}, images)
  reference = _evaluate(model.AlexNet(**SMALL), {'params': params}, images)
  assert logits.dtype == jnp.float32
  spread = float(np.std(reference))
  error = float(np.abs(logits - reference).max())
  assert 0 < error < 0.05 * spread, (error, spread)


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
  got = jax.vjp(lambda x: cpu_ops.local_response_norm(
      x, groups=groups, **constants), a)[1](cotangent)[0]
  want = jax.vjp(lambda x: _lrn_by_autodiff(x, groups, **constants),
                 a)[1](cotangent)[0]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('size,stride', [(3, 2), (2, 2)])
@pytest.mark.parametrize('shape', [(2, 13, 13, 4), (1, 6, 7, 2)])
def test_max_pool_equals_flax_max_pool_ties_included(shape, size, stride):
  """The first maximum of a window (row-major) gets the gradient."""
  rng = np.random.default_rng(2)
  # Few distinct values: most windows hold tied maxima.
  x = jnp.asarray(rng.integers(-2, 3, size=shape), jnp.float32)
  flax_pool = lambda x: nn.max_pool(x, (size, size), strides=(stride, stride),
                                    padding='VALID')
  want, want_vjp = jax.vjp(flax_pool, x)
  got, got_vjp = jax.vjp(
      lambda x: cpu_ops.max_pool(x, size=size, stride=stride), x)
  np.testing.assert_array_equal(got, want)
  cotangent = jnp.asarray(rng.normal(size=want.shape), jnp.float32)
  # Overlapping windows add their cotangents in another order: ulps only.
  np.testing.assert_allclose(got_vjp(cotangent)[0], want_vjp(cotangent)[0],
                             rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('kernel_size,strides,padding,size', [
    (11, 4, 'VALID', 35), (5, 1, ((2, 2), (2, 2)), 8),
    (3, 1, ((1, 1), (1, 1)), 8)])
def test_blocked_patch_convolutions_equal_xla_gradients_included(
    kernel_size, strides, padding, size):
  """conv1's, conv2's and the 3x3 layers' patch paths (maps of 8, the
  narrowest that take them), over several image blocks."""
  conv = model.TowerConv(features=4, kernel_size=kernel_size,
                         strides=strides, padding=padding, shared_input=True,
                         conv_impl='patches')
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
  # The patch path: its kernel gradient is summed over image blocks.
  assert 'scan' in str(jax.make_jaxpr(got_vjp)(cotangent))
  for g, w in zip(jax.tree.leaves(got_vjp(cotangent)),
                  jax.tree.leaves(want_vjp(cotangent))):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * np.abs(w).max())


def test_one_tower_net_is_the_papers_one_gpu_net():
  params, layers, logits = _full_size_shapes(towers=1)
  # Written out from the paper's layer table and its footnote to section
  # 3.2: half the kernels of conv1-conv4, conv5 and the fully connected
  # layers at full size; (kernel scalars, outputs) per layer.
  layer_sizes = [(11 * 11 * 3 * 48, 48), (5 * 5 * 48 * 128, 128),
                 (3 * 3 * 128 * 192, 192), (3 * 3 * 192 * 192, 192),
                 (3 * 3 * 192 * 256, 256), (6 * 6 * 256 * 4096, 4096),
                 (4096 * 4096, 4096), (4096 * 1000, 1000)]
  assert model.count_params(params) == sum(k + b for k, b in layer_sizes)
  assert model.count_params(params) == 59_798_312
  assert layers['conv1'] == (2, 55, 55, 48)
  assert layers['conv5'] == (2, 13, 13, 256)
  assert layers['fc6'] == (2, 4096)
  assert layers['fc8'] == (2, 1000) and logits == (2, 1000)
  assert params['fc8']['kernel'].shape == (1, 4096, 1000)


def test_non_overlapping_pooling_changes_the_map_sizes():
  # 71 pixels: conv1 gives 16x16 maps; 3/2 pooling 7, 3, 1; 2/2 pooling
  # 8, 4, 2.
  _, overlapping, _ = _full_size_shapes(71, num_classes=10, width=0.125)
  _, plain, _ = _full_size_shapes(71, num_classes=10, width=0.125,
                                  pool_size=2, pool_stride=2)
  assert overlapping['conv2'][1:3] == (7, 7)
  assert overlapping['conv3'][1:3] == (3, 3)
  assert plain['conv2'][1:3] == (8, 8)
  assert plain['conv3'][1:3] == (4, 4)
  assert model.feature_map_size(71) == 1
  assert model.feature_map_size(71, pool_size=2, pool_stride=2) == 2
  assert model.smallest_image_size() == 67
  assert model.smallest_image_size(pool_size=2, pool_stride=2) == 39
  assert model.feature_map_size(38, 2, 2) == 0


def test_lrn_disabled_is_the_identity():
  x = jnp.asarray(np.random.default_rng(3).uniform(0, 300, (2, 5, 5, 8)),
                  jnp.float32)
  lrn = lambda enabled: model.AlexNet(lrn_enabled=enabled).apply(
      {}, x, method=model.AlexNet._lrn)
  np.testing.assert_array_equal(lrn(False), x)
  assert not np.allclose(lrn(True), x)
  _, params = _small_net_and_params()
  images = jax.random.normal(jax.random.key(1), (2, 67, 67, 3)) * 50
  logits = lambda **kw: _evaluate(model.AlexNet(**SMALL, **kw),
                                  {'params': params}, images)
  assert not np.allclose(logits(lrn_enabled=False), logits())


def test_tanh_replaces_every_relu(monkeypatch):
  """The activation the config names is applied to the output of each of
  the seven hidden layers (conv1-5, fc6, fc7), and no other one is."""
  _, params = _small_net_and_params()
  images = jax.random.normal(jax.random.key(1), (2, 67, 67, 3)) * 50
  applied = []
  for name, function in model.ACTIVATIONS.items():
    monkeypatch.setitem(
        model.ACTIVATIONS, name,
        lambda x, name=name, function=function: (
            applied.append((name, x)), function(x))[1])
  run = lambda activation: model.AlexNet(**SMALL, activation=activation).apply(
      {'params': params}, images, train=False, capture_intermediates=True)
  for activation in ('relu', 'tanh'):
    applied.clear()
    logits, state = run(activation)
    outputs = [state['intermediates'][name]['__call__'][0]
               for name in LAYERS[:-1]]
    assert [name for name, _ in applied] == [activation] * 7
    for (_, x), output in zip(applied, outputs, strict=True):
      np.testing.assert_array_equal(x, output)
    if activation == 'relu':
      relu_logits = logits
  assert not np.allclose(relu_logits, logits)


@pytest.mark.parametrize('conv_impl', ['xla', 'patches'])
def test_bfloat16_gradient_step_follows_float32(conv_impl):
  """One SGD step in bfloat16 against float32, per layer.

  Tolerance: loss within 1%, each layer's update (the gradient) with cosine
  >= 0.9 to float32's. bfloat16 keeps 8 bits of mantissa, so activations and
  cotangents carry ~0.4% relative error each; at initialisation the early
  convolutions' gradients are sums of many cancelling terms, where that
  error shows most (`bench/bf16.py` prints the cosines).
  """
  _, params = _small_net_and_params(init_scheme='caffe')
  images = jax.random.normal(jax.random.key(1), (16, 67, 67, 3)) * 50
  labels = jax.random.randint(jax.random.key(2), (16,), 0, 10)

  def loss_and_grads(dtype):
    net = model.AlexNet(**SMALL, init_scheme='caffe', dtype=dtype,
                        conv_impl=conv_impl)
    def loss(p):
      logits = net.apply({'params': p}, images, train=False)
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, labels).mean()
    return jax.jit(jax.value_and_grad(loss))(params)

  loss32, grads32 = loss_and_grads(jnp.float32)
  loss16, grads16 = loss_and_grads(jnp.bfloat16)
  assert loss16 != loss32 and abs(loss16 / loss32 - 1) < 0.01
  for name in grads32:
    a = np.asarray(grads16[name]['kernel'], np.float64).ravel()
    b = np.asarray(grads32[name]['kernel'], np.float64).ravel()
    cosine = a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    # Below 1: bfloat16 rounding reaches every layer's gradient.
    assert 0.9 <= cosine < 1 - 1e-6, (name, cosine)
  net16 = model.AlexNet(**SMALL, init_scheme='caffe', dtype=jnp.bfloat16,
                        conv_impl=conv_impl)
  outputs = _layer_outputs(net16, params, images[:2])
  assert {name: x.dtype for name, x in outputs.items()} == dict.fromkeys(
      LAYERS, jnp.bfloat16)


def test_both_forms_of_the_fully_connected_layer_agree(monkeypatch):
  # fc8 (few outputs) reads its input once for both towers; fc6/fc7 as a
  # tower batch. The small nets of the other tests use only the first.
  layer = model.TowerDense(features=6)
  x = jax.random.normal(jax.random.key(0), (4, 32))
  params = layer.init(jax.random.key(1), x)

  def value_and_grads():
    loss = lambda p, x: jnp.sum(jnp.sin(layer.apply(p, x)))
    return layer.apply(params, x), jax.grad(loss, argnums=(0, 1))(params, x)

  few = value_and_grads()
  monkeypatch.setattr(model, '_FEW_FEATURES', 0)
  batched = value_and_grads()
  assert few[0].shape == (4, 12)
  for got, want in zip(jax.tree.leaves(batched), jax.tree.leaves(few),
                       strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
