"""A plain one-device AlexNet written as a grouped net: the test oracle.

On one device the paper's two towers are exactly a grouped net: conv2, conv4
and conv5 with two groups, everything else dense (docs/REFERENCE.md,
Architecture); the one-tower net (`towers=1`) is the same net with one
group of half the kernels. This module
writes that net with stock Flax layers and `feature_group_count=2`, with an
LRN computed differently from `model.local_response_norm`, so that the tower
model can be checked against it. It has no dropout and is not the fast path
(XLA's grouped convolutions are slow on CPU).
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

  @nn.compact
  def __call__(self, images: Array) -> Array:
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
    x = nn.relu(nn.Dense(ch['fc6'], name='fc6')(x))
    x = nn.relu(nn.Dense(ch['fc7'], name='fc7')(x))
    fc8_features = towers * math.ceil(self.num_classes / towers)
    return nn.Dense(fc8_features, name='fc8')(x)[:, :self.num_classes]


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
