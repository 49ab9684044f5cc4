"""The tower model under every device layout equals the grouped oracle.

Runs with four fake CPU devices (conftest.py): one device (both towers
unrolled), two devices (one tower each), four devices (two replicas of a
tower pair) and, for data parallelism alone, two devices holding both towers;
each with both convolution implementations, XLA's (what GPUs and TPUs run)
and the CPU's patch matmuls.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from alexnet import errors, model, parallel, reference

NET = dict(num_classes=10, width=0.125)
BATCH, SIZE, LR = 8, 67, 0.01
# (devices, model_parallel) -> replicas; the last is data parallel only.
LAYOUTS = [(1, True), (2, True), (4, True), (2, False)]
CONV_IMPLS = ['xla', 'patches']


def _layout(num_devices, model_parallel, towers=2):
  return parallel.Layout.create(model_parallel,
                                devices=jax.devices()[:num_devices],
                                towers=towers)


def _data(seed=0):
  key_x, key_y = jax.random.split(jax.random.key(seed))
  images = 50.0 * jax.random.normal(key_x, (BATCH, SIZE, SIZE, 3))
  labels = jax.random.randint(key_y, (BATCH,), 0, NET['num_classes'])
  return np.asarray(images), np.asarray(labels)


def _init_params(towers=2):
  net = model.AlexNet(**NET, init_scheme='caffe', towers=towers)
  return net.init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)),
                  train=False)['params']


def _split_for_replicas(layout, x):
  return x.reshape(layout.num_local_replicas, -1, *x.shape[1:])


def _oracle_loss(grouped, images, labels, towers=2):
  logits = reference.GroupedAlexNet(**NET, groups=towers).apply(
      {'params': grouped}, images)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _mapped_sgd_step(layout, conv_impl):
  """A plain SGD step through the layout's mapped gradient."""
  net = model.AlexNet(**NET, init_scheme='caffe', towers=layout.num_towers,
                      conv_impl=conv_impl, exchange=layout.exchange)

  def loss_fn(params, images, labels):
    logits = net.apply({'params': params}, images, train=False)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return loss.mean(), None

  def step(params, images, labels):
    loss, _, grads = layout.grad(loss_fn)(params, images, labels)
    new = jax.tree.map(lambda p, g: p - LR * g, params, grads)
    return layout.mean_over_replicas(loss), grads, new
  return layout.pmap(step, out_axes=(None, 0, 0))


@pytest.mark.parametrize('conv_impl', CONV_IMPLS)
@pytest.mark.parametrize('num_devices,model_parallel', LAYOUTS)
def test_forward_equals_grouped_oracle(num_devices, model_parallel,
                                       conv_impl):
  layout = _layout(num_devices, model_parallel)
  params = _init_params()
  images, _ = _data()
  net = model.AlexNet(**NET, conv_impl=conv_impl, exchange=layout.exchange)
  forward = layout.pmap(lambda p, x: net.apply({'params': p}, x, train=False))
  logits = forward(layout.shard_towers(params),
                   layout.shard_batch(_split_for_replicas(layout, images)))
  # Both devices of a pair return the whole logits; keep one per replica.
  logits = np.asarray(logits)[::layout.devices_per_replica].reshape(BATCH, -1)
  want = reference.GroupedAlexNet(**NET).apply(
      {'params': reference.to_grouped(params)}, images)
  np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('conv_impl', CONV_IMPLS)
@pytest.mark.parametrize('num_devices,model_parallel,towers',
                         [(*layout, 2) for layout in LAYOUTS]
                         + [(1, True, 1), (2, False, 1)])
def test_three_sgd_steps_equal_grouped_oracle(num_devices, model_parallel,
                                              towers, conv_impl):
  """Catches the doubled gradient of a differentiated all-gather.

  The one-tower net (towers=1) is checked against the oracle with one group,
  on one device and data-parallel on two.
  """
  layout = _layout(num_devices, model_parallel, towers)
  params = _init_params(towers)
  grouped = reference.to_grouped(params)
  device_params = layout.shard_towers(params)
  step = _mapped_sgd_step(layout, conv_impl)
  oracle_grad = jax.jit(jax.value_and_grad(
      lambda *args: _oracle_loss(*args, towers=towers)))
  for seed in range(3):
    images, labels = _data(seed)
    loss, grads, device_params = step(
        device_params,
        layout.shard_batch(_split_for_replicas(layout, images)),
        layout.shard_batch(_split_for_replicas(layout, labels)))
    want_loss, want_grads = oracle_grad(grouped, images, labels)
    grouped = jax.tree.map(lambda p, g: p - LR * g, grouped, want_grads)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    _assert_trees_close(layout.gather_towers(grads),
                        reference.from_grouped(want_grads, towers))
  _assert_trees_close(layout.gather_towers(device_params),
                      reference.from_grouped(grouped, towers))


def _assert_trees_close(got, want):
  for path, g, w in zip(jax.tree_util.tree_leaves_with_path(got),
                        jax.tree.leaves(got), jax.tree.leaves(want)):
    scale = float(np.abs(w).max())
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * scale,
                               err_msg=jax.tree_util.keystr(path[0]))


def test_each_device_holds_only_its_towers_parameters():
  layout = _layout(2, True)
  params = _init_params()
  device_params = layout.shard_towers(params)
  total_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  for device in layout.devices:
    shards = [s for leaf in jax.tree.leaves(device_params)
              for s in leaf.addressable_shards if s.device == device]
    assert sum(s.data.nbytes for s in shards) == total_bytes // 2
  kernel = device_params['conv2']['kernel']
  for tower, shard in enumerate(sorted(kernel.addressable_shards,
                                       key=lambda s: s.index[0].start)):
    # [this device, its one tower, kh, kw, in, out].
    assert shard.data.shape == (1, 1, 5, 5, 6, 16)
    np.testing.assert_array_equal(shard.data[0, 0],
                                  params['conv2']['kernel'][tower])


@pytest.mark.parametrize('num_devices,model_parallel', LAYOUTS)
def test_towers_round_trip_through_devices(num_devices, model_parallel):
  layout = _layout(num_devices, model_parallel)
  params = _init_params()
  back = layout.gather_towers(layout.shard_towers(params))
  jax.tree.map(np.testing.assert_array_equal, back, params)


def test_dropout_masks_do_not_depend_on_the_layout():
  """Dropout keys fold in the global tower, never the device."""
  params = _init_params()
  images, _ = _data()
  outputs = []
  for layout in (_layout(1, True), _layout(2, True)):
    net = model.AlexNet(**NET, exchange=layout.exchange)
    forward = layout.pmap(
        lambda p, x, key, net=net: net.apply(
            {'params': p}, x, train=True, rngs={'dropout': key}),
        in_axes=(0, 0, None))
    out = forward(layout.shard_towers(params),
                  layout.shard_batch(images[None]), jax.random.key(3))
    outputs.append(np.asarray(out)[0])
  np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-5, atol=1e-6)


def test_model_parallel_refuses_an_odd_device_count():
  with pytest.raises(errors.ConfigError, match='odd number'):
    _layout(3, True)
  assert _layout(3, False).num_replicas == 3


def test_one_tower_runs_data_parallel_only():
  with pytest.raises(errors.ConfigError,
                     match=r'config\.towers=1.*--config\.model_parallel=False'):
    _layout(2, True, towers=1)
  one = _layout(1, True, towers=1)
  assert (one.num_replicas, one.towers_per_device) == (1, 1)
  two = _layout(2, False, towers=1)
  assert (two.num_replicas, two.devices_per_replica) == (2, 1)


def test_both_devices_of_a_pair_get_their_replicas_batch():
  layout = _layout(4, True)
  batch = np.arange(2 * 3 * 5, dtype=np.float32).reshape(2, 3, 5)
  sharded = layout.shard_batch({'x': batch})['x']
  assert sharded.shape == (4, 3, 5)
  shards = sorted(sharded.addressable_shards, key=lambda s: s.index[0].start)
  assert [s.device for s in shards] == list(layout.devices)
  for device_index, shard in enumerate(shards):
    np.testing.assert_array_equal(shard.data[0], batch[device_index // 2])


def test_layout_shapes():
  one = _layout(1, True)
  assert (one.num_replicas, one.towers_per_device) == (1, 2)
  four = _layout(4, True)
  assert (four.num_replicas, four.towers_per_device) == (2, 1)
  assert four._groups(by_replica=True) == ((0, 1), (2, 3))
  assert four._groups(by_replica=False) == ((0, 2), (1, 3))
