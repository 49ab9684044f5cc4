"""The real training step under every device layout equals the grouped oracle.

Runs with four fake CPU devices (conftest.py): one device (both towers
unrolled), two devices (one tower each), four devices (two replicas of a
tower pair) and, for data parallelism alone, two devices holding both towers
(also with the one-tower net). On each, three real training steps, dropout
on, are compared with alexnet/reference.py's grouped net trained by the
paper's rule written out by hand: `steps.train_step` mapped as training maps
it, with XLA's convolutions (what GPUs and TPUs run), and the step training
runs, `steps.map_train_step` (uint8 in, normalised on the device), with the
CPU's patch matmuls.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from alexnet import errors, parallel, reference, steps
from configs import alexnet as configs

NET = dict(num_classes=10, width=0.125)  # The tiny config's net.
BATCH, SIZE, RESIZE = 8, 67, 76
# (devices, model_parallel) -> replicas; the last is data parallel only.
LAYOUTS = [(1, True), (2, True), (4, True), (2, False)]
# (global step, learning rate) of the three steps: the rate drops before the
# last, which tells a rate inside the velocity from one outside it.
STEP_PLAN = ((5, 0.05), (6, 0.05), (7, 0.005))


def _layout(num_devices, model_parallel, towers=2):
  return parallel.Layout.create(model_parallel,
                                devices=jax.devices()[:num_devices],
                                towers=towers)


@functools.cache
def _initial_state(towers=2):
  """The tiny net's step-0 state (the same for every layout and conv_impl)."""
  config = _train_config(towers, 'xla')
  return steps.create_train_state(
      config, steps.create_model(config, NET['num_classes']))


def _init_params(towers=2):
  return _initial_state(towers).params


# --- Three real training steps against the oracle ---------------------------


def _train_config(towers, conv_impl):
  """The tiny net, with a weight decay large enough to show in 3 steps."""
  config = configs.get_config('tiny')
  config.update(towers=towers, conv_impl=conv_impl, seed=7,
                weight_decay=0.05)
  return config


def _uint8_batch(num_replicas, index):
  """One global batch as the input pipeline sends it, [replicas, b, ...]."""
  rng = np.random.default_rng(index)
  shape = (num_replicas, BATCH // num_replicas)
  return {'image': rng.integers(0, 256, (*shape, SIZE, SIZE, 3), np.uint8),
          'offset': rng.integers(0, RESIZE - SIZE + 1, (*shape, 2),
                                 np.int32),
          'flip': rng.random(shape) < 0.5,
          'shift': rng.normal(0, 20, (*shape, 3)).astype(np.float32),
          'label': rng.integers(0, NET['num_classes'], shape, np.int32)}


def _normalised(batch, mean_image):
  """Numpy: crop - its (reflected) window of the mean image + shift."""
  flat = {k: v.reshape(-1, *v.shape[2:]) for k, v in batch.items()}
  images = []
  for image, (top, left), flip, shift in zip(
      flat['image'], flat['offset'], flat['flip'], flat['shift']):
    mean = mean_image[top:top + SIZE, left:left + SIZE]
    images.append(image - (mean[:, ::-1] if flip else mean) + shift)
  return np.stack(images).astype(np.float32).reshape(batch['image'].shape)


@functools.cache
def _oracle_step(towers, dropout_rate, seed, momentum, weight_decay):
  net = reference.GroupedAlexNet(**NET, groups=towers,
                                 dropout_rate=dropout_rate)
  return jax.jit(functools.partial(
      reference.train_step, net, seed=seed, momentum=momentum,
      weight_decay=weight_decay))


def _real_step(config, layout, mapped):
  """The step as training maps it: (state, batch, [mean,] lr, step)."""
  net = steps.create_model(config, NET['num_classes'], layout.exchange)
  if mapped:
    return steps.map_train_step(net, layout, config)
  return layout.pmap(
      functools.partial(steps.train_step, model=net, layout=layout,
                        config=config),
      in_axes=(0, 0, None, None), out_axes=(0, None))


# The mapped step that training runs (uint8 in) on XLA's convolutions, as
# training runs it, and the raw step on the patch convolutions.
STEP_FORMS = [(False, 'patches'), (True, 'xla')]


# Every two-tower layout in both forms; the one-tower net once in each form.
@pytest.mark.parametrize(
    'num_devices,model_parallel,towers,mapped,conv_impl',
    [(*layout, 2, *form) for layout in LAYOUTS for form in STEP_FORMS]
    + [(1, True, 1, *STEP_FORMS[1]), (2, False, 1, *STEP_FORMS[0])])
def test_three_train_steps_equal_grouped_oracle(num_devices, model_parallel,
                                                towers, mapped, conv_impl):
  """Parameters, momentum and loss after each of three real steps.

  Dropout is on, so each replica's masks must be keyed by (seed, step,
  replica, global tower) whatever device holds the tower; the pair layouts
  catch a doubled gradient of a differentiated all-gather; the one-tower
  net (towers=1) is checked against the oracle with one group.
  """
  config = _train_config(towers, conv_impl)
  layout = _layout(num_devices, model_parallel, towers)
  state = _initial_state(towers)
  device_state = layout.shard_towers({'params': state.params,
                                      'opt_state': state.opt_state})
  real_step = _real_step(config, layout, mapped)
  oracle_step = _oracle_step(towers, config.dropout_rate, config.seed,
                             config.momentum, config.weight_decay)
  grouped = reference.to_grouped(state.params)
  velocity = jax.tree.map(jnp.zeros_like, grouped)
  mean_image = np.random.default_rng(99).uniform(
      0, 255, (RESIZE, RESIZE, 3)).astype(np.float32)
  for index, (step, lr) in enumerate(STEP_PLAN):
    batch = _uint8_batch(layout.num_replicas, index)
    images = _normalised(batch, mean_image)
    if mapped:
      device_state, metrics = real_step(
          device_state, layout.shard_batch(batch),
          layout.replicate(mean_image), lr, step)
    else:
      device_state, metrics = real_step(
          device_state,
          layout.shard_batch({'image': images, 'label': batch['label']}),
          lr, step)
    grouped, velocity, loss = oracle_step(grouped, velocity, images,
                                          batch['label'], lr, step)
    np.testing.assert_allclose(metrics['loss'], loss, rtol=1e-5)
    got = layout.gather_towers(device_state)
    _assert_trees_close(got['params'],
                        reference.from_grouped(grouped, towers))
    _assert_trees_close(optax.tree_utils.tree_get(got['opt_state'], 'trace'),
                        reference.from_grouped(velocity, towers))


def _assert_trees_close(got, want):
  """Leaf by leaf, of trees with the same structure (no leaf left out)."""
  assert jax.tree.structure(got) == jax.tree.structure(want), (
      jax.tree.structure(got), jax.tree.structure(want))
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got),
                          jax.tree.leaves(want), strict=True):
    scale = float(np.abs(w).max())
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * scale,
                               err_msg=jax.tree_util.keystr(path))


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
