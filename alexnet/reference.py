"""A plain one-device AlexNet written as a grouped net: the test oracle.

On one device the paper's two towers are exactly a grouped net: conv2, conv4
and conv5 with two groups, everything else dense (docs/REFERENCE.md,
Architecture); the one-tower net (`towers=1`) is the same net with one
group of half the kernels. This module
writes that net with stock Flax layers and `feature_group_count=2`, with an
LRN computed differently from `model.local_response_norm`, so that the tower
model can be checked against it. It is not the fast path (XLA's grouped
convolutions are slow on CPU).

It also trains: `train_step` is the paper's SGD rule written out by hand
(section 5: momentum, weight decay on kernels, the learning rate inside the
velocity), with dropout masks derived from (seed, step, replica, global
tower) as the training step promises, over all replicas' images at once.
The tests run `steps.train_step` under every device layout against it.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from alexnet import model as tower_model

Array = jax.Array


def _grouped_lrn(x: Array, groups: int, k: float, size: int, alpha: float,
                 beta: float) -> Array:
  """LRN as a matmul with a block-diagonal band of ones (one block a group)."""
  channels = x.shape[-1]
  index = np.arange(channels)
  same_group = (index[:, None] // (channels // groups)
                == index[None, :] // (channels // groups))
  in_window = np.abs(index[:, None] - index[None, :]) <= size // 2
  band = jnp.asarray(same_group & in_window, x.dtype)
  return x / (k + alpha * jnp.square(x) @ band) ** beta


class GroupedAlexNet(nn.Module):
  """The same net as `model.AlexNet`, in one piece, grouped convolutions.

  `groups` plays the part of `model.AlexNet.towers`.
  """

  num_classes: int = 1000
  width: float = 1.0
  groups: int = 2
  lrn_k: float = 2.0
  lrn_size: int = 5
  lrn_alpha: float = 1e-4
  lrn_beta: float = 0.75
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, images: Array, train: bool = False) -> Array:
    towers = self.groups
    ch = {name: towers * max(1, round(c * self.width))
          for name, c in tower_model.TOWER_CHANNELS.items()}
    if towers == 1:  # The paper's one-GPU net: conv5 and fc6-7 full size.
      ch.update({name: max(1, round(2 * tower_model.TOWER_CHANNELS[name]
                                    * self.width))
                 for name in ('conv5', 'fc6', 'fc7')})
    lrn = lambda x: _grouped_lrn(x, towers, self.lrn_k, self.lrn_size,
                                 self.lrn_alpha, self.lrn_beta)
    pool = lambda x: nn.max_pool(x, (3, 3), strides=(2, 2))
    pad1, pad2 = ((1, 1), (1, 1)), ((2, 2), (2, 2))

    x = nn.Conv(ch['conv1'], (11, 11), strides=4, padding='VALID',
                name='conv1')(images)
    x = pool(lrn(nn.relu(x)))
    x = nn.Conv(ch['conv2'], (5, 5), padding=pad2, feature_group_count=towers,
                name='conv2')(x)
    x = pool(lrn(nn.relu(x)))
    x = nn.relu(nn.Conv(ch['conv3'], (3, 3), padding=pad1, name='conv3')(x))
    x = nn.relu(nn.Conv(ch['conv4'], (3, 3), padding=pad1,
                        feature_group_count=towers, name='conv4')(x))
    x = nn.relu(nn.Conv(ch['conv5'], (3, 3), padding=pad1,
                        feature_group_count=towers, name='conv5')(x))
    x = pool(x).reshape(x.shape[0], -1)
    x = self._dropout(nn.relu(nn.Dense(ch['fc6'], name='fc6')(x)), train)
    x = self._dropout(nn.relu(nn.Dense(ch['fc7'], name='fc7')(x)), train)
    fc8_features = towers * math.ceil(self.num_classes / towers)
    return nn.Dense(fc8_features, name='fc8')(x)[:, :self.num_classes]

  def _dropout(self, x: Array, train: bool) -> Array:
    """Group g's units keep a Bernoulli mask drawn from fold_in(rng, g).

    `rng` is this layer's draw from the 'dropout' stream (Flax numbers the
    draws of a module in call order), so group g of this net and global
    tower g of the tower model get the same mask wherever that tower runs.
    """
    if not train or self.dropout_rate == 0.0:
      return x
    rng = self.make_rng('dropout')
    keep = 1.0 - self.dropout_rate
    units = x.shape[-1] // self.groups
    mask = jnp.concatenate(
        [jax.random.bernoulli(jax.random.fold_in(rng, g), keep,
                              (x.shape[0], units))
         for g in range(self.groups)], axis=-1)
    return x * mask / keep


def _merge_towers(leaf: Any) -> Any:
  """[towers, ..., out] -> [..., towers * out], tower 0's outputs first."""
  return jnp.moveaxis(leaf, 0, -2).reshape(*leaf.shape[1:-1], -1)


def _split_towers(leaf: Any, towers: int) -> Any:
  """Inverse of `_merge_towers`."""
  split = leaf.reshape(*leaf.shape[:-1], towers, leaf.shape[-1] // towers)
  return jnp.moveaxis(split, -2, 0)


def to_grouped(tower_params: Any) -> Any:
  """Maps stacked tower parameters to `GroupedAlexNet` parameters."""
  return jax.tree.map(_merge_towers, tower_params)


def from_grouped(grouped_params: Any, towers: int = 2) -> Any:
  """Maps `GroupedAlexNet` parameters to stacked tower parameters."""
  return jax.tree.map(lambda leaf: _split_towers(leaf, towers), grouped_params)


def dropout_key(seed: int, step: int | Array, replica: int) -> Array:
  """The dropout key of `replica` at `step`: seed, step, replica folded in."""
  return jax.random.fold_in(
      jax.random.fold_in(jax.random.key(seed), step), replica)


def momentum_sgd(params: Any, velocity: Any, grads: Any,
                 learning_rate: float | Array, momentum: float,
                 weight_decay: float) -> tuple[Any, Any]:
  """The paper's update, leaf by leaf; biases are not decayed.

  v <- momentum * v - weight_decay * lr * w - lr * g;  w <- w + v.

  Returns:
    (new params, new velocity).
  """
  def update(path, w, v, g):
    decay = weight_decay if path[-1].key == 'kernel' else 0.0
    return momentum * v - decay * learning_rate * w - learning_rate * g
  velocity = jax.tree_util.tree_map_with_path(update, params, velocity, grads)
  return jax.tree.map(lambda w, v: w + v, params, velocity), velocity


def train_step(net: GroupedAlexNet, params: Any, velocity: Any,
               images: Array, labels: Array, learning_rate: float | Array,
               step: int | Array, *, seed: int, momentum: float,
               weight_decay: float) -> tuple[Any, Any, Array]:
  """One step of data-parallel training, all replicas here.

  Args:
    net: the grouped net (with its dropout rate).
    params, velocity: grouped parameters and their momentum.
    images, labels: [replicas, per replica, ...]: replica r's batch.
    learning_rate: this step's rate.
    step: the global step (keys dropout).
    seed: the run's seed (keys dropout).
    momentum, weight_decay: the update's constants.

  Returns:
    (params, velocity, loss): the loss is the mean of the replicas' mean
    cross-entropies, and its gradient the mean of theirs.
  """
  def loss_fn(p):
    losses = []
    for replica in range(images.shape[0]):
      logits = net.apply({'params': p}, images[replica], train=True,
                         rngs={'dropout': dropout_key(seed, step, replica)})
      log_probs = jax.nn.log_softmax(logits)
      losses.append(-jnp.take_along_axis(
          log_probs, labels[replica][:, None], axis=-1).mean())
    return jnp.mean(jnp.stack(losses))

  loss, grads = jax.value_and_grad(loss_fn)(params)
  params, velocity = momentum_sgd(params, velocity, grads, learning_rate,
                                  momentum, weight_decay)
  return params, velocity, loss
