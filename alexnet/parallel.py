"""The device layout: which device holds which tower of which replica.

Everything the training code needs to know about devices lives here.

* One device: both towers on it (`towers_per_device=2`); the exchange is the
  identity, and the towers run unrolled (not `vmap`-ed, which would turn
  the tower-local convolutions into slow grouped ones).
* Model parallel (the paper's layout, two towers), 2R devices: devices 2r
  and 2r+1 hold tower 0 and tower 1 of data-parallel replica r
  (`towers_per_device=1`). Each device holds only its tower's parameters and optimizer state. The
  exchange is an all-gather inside the pair; gradients are averaged over
  the R replicas of the same tower.
* Data parallel only (`model_parallel=False`), R devices: both towers on
  every device, gradients averaged over all devices. The one-tower net
  (`towers=1`) runs only this way.

One flat `jax.pmap` over all devices serves all three (nested pmaps fail in
this JAX version). Host-side, every tower-stacked tree (parameters,
optimizer state) has a leading axis of `num_towers`; on devices it is laid
out as [devices, towers_per_device, ...].
"""

from collections.abc import Callable
import dataclasses
from typing import Any

import jax
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

from alexnet import errors
from alexnet.model import AllTowersHere

AXIS = 'devices'
PyTree = Any


@dataclasses.dataclass(frozen=True)
class PairExchange:
  """One tower per device: all-gather the channels inside each tower pair."""

  pairs: tuple[tuple[int, ...], ...] | None
  local_towers: int = 1

  def __call__(self, x: jax.Array) -> jax.Array:
    return lax.all_gather(x, AXIS, axis=x.ndim - 1, tiled=True,
                          axis_index_groups=self.pairs)

  def first_tower(self) -> jax.Array:
    return lax.axis_index(AXIS) % 2


@dataclasses.dataclass(frozen=True)
class Layout:
  """Towers and replicas over all devices of all processes.

  Attributes:
    devices: the devices of all processes, in pmap axis order.
    num_towers: towers of the net (2, or 1 for the one-tower net).
    towers_per_device: 1 when the towers sit on separate devices,
      `num_towers` when every device holds all of them.
  """

  devices: tuple[jax.Device, ...]
  num_towers: int
  towers_per_device: int

  @classmethod
  def create(cls, model_parallel: bool,
             devices: tuple[jax.Device, ...] | None = None,
             towers: int = 2) -> 'Layout':
    """The layout over `devices` (default: all devices of all processes).

    Args:
      model_parallel: put the two towers on separate devices when there are
        two or more; otherwise all towers go on every device.
      devices: a subset of devices to use, e.g. in tests.
      towers: towers of the net (config.towers).

    Returns:
      The layout.

    Raises:
      errors.ConfigError: model parallelism with one tower on several
        devices, or with an odd number of devices per process.
    """
    devices = tuple(jax.devices() if devices is None else devices)
    num_local = sum(d.process_index == jax.process_index() for d in devices)
    if not model_parallel or len(devices) < 2:
      return cls(devices, towers, towers_per_device=towers)
    if towers == 1:
      raise errors.ConfigError(
          'config.towers=1 has no second tower to put on another device, '
          f'but config.model_parallel=True and there are {len(devices)} '
          'devices. Set --config.model_parallel=False to use them for data '
          'parallelism (or use one device, --config.num_devices=1).')
    if num_local % towers:
      raise errors.ConfigError(
          f'config.model_parallel=True puts the {towers} towers on separate '
          f'devices, but this process has {num_local} devices, an odd '
          'number. Use an even number of devices per process (e.g. '
          'CUDA_VISIBLE_DEVICES) or set --config.model_parallel=False.')
    return cls(devices, towers, towers_per_device=1)

  # --- Shape of the layout --------------------------------------------------

  @property
  def num_devices(self) -> int:
    return len(self.devices)

  @property
  def num_local_devices(self) -> int:
    return sum(d.process_index == jax.process_index() for d in self.devices)

  @property
  def devices_per_replica(self) -> int:
    return self.num_towers // self.towers_per_device

  @property
  def num_replicas(self) -> int:
    return self.num_devices // self.devices_per_replica

  @property
  def num_local_replicas(self) -> int:
    return self.num_local_devices // self.devices_per_replica

  @property
  def local_replicas(self) -> list[int]:
    """Global indices of this process's data-parallel replicas, in order."""
    per = self.devices_per_replica
    return sorted({i // per for i, device in enumerate(self.devices)
                   if device.process_index == jax.process_index()})

  @property
  def exchange(self) -> AllTowersHere | PairExchange:
    """The tower exchange the model calls under this layout's pmap."""
    if self.towers_per_device == self.num_towers:
      return AllTowersHere(self.num_towers)
    return PairExchange(self._groups(by_replica=True))

  def _groups(self, by_replica: bool) -> tuple[tuple[int, ...], ...] | None:
    """Device groups: the devices of one replica, or those of one tower slot.

    None (all devices) where that is what the groups would be anyway.
    """
    per, replicas = self.devices_per_replica, self.num_replicas
    if by_replica:
      groups = [[r * per + t for t in range(per)] for r in range(replicas)]
    else:
      groups = [[r * per + t for r in range(replicas)] for t in range(per)]
    return None if len(groups) == 1 else tuple(map(tuple, groups))

  # --- Inside the mapped function -------------------------------------------

  def replica_index(self) -> jax.Array:
    """Index of this device's data-parallel replica (inside `pmap`)."""
    return lax.axis_index(AXIS) // self.devices_per_replica

  def mean_over_replicas(self, tree: PyTree) -> PyTree:
    """Averages over the replicas of the same tower (inside `pmap`)."""
    return lax.pmean(tree, AXIS, axis_index_groups=self._groups(False))

  def sum_over_replicas(self, tree: PyTree) -> PyTree:
    """Sums over the replicas of the same tower (inside `pmap`)."""
    return lax.psum(tree, AXIS, axis_index_groups=self._groups(False))

  def grad(self, loss_fn: Callable[..., tuple[jax.Array, Any]]
           ) -> Callable[..., tuple[jax.Array, Any, PyTree]]:
    """Gradient of the global loss w.r.t. this device's parameters.

    Both devices of a tower pair compute the same loss from the all-gathered
    logits, and the transpose of the all-gather sums the cotangents of both,
    so differentiating the loss as is would double every gradient. Each
    device therefore differentiates loss / devices_per_replica. Replicas see
    different images: their gradients are averaged.

    Args:
      loss_fn: (params, *args) -> (loss, aux) on this device's replica batch.

    Returns:
      (params, *args) -> (loss, aux, grads), for use inside `self.pmap`.
    """
    def loss_share(params, *args):
      loss, aux = loss_fn(params, *args)
      return loss / self.devices_per_replica, (loss, aux)

    def grad_fn(params, *args):
      grads, (loss, aux) = jax.grad(loss_share, has_aux=True)(params, *args)
      return loss, aux, self.mean_over_replicas(grads)
    return grad_fn

  def pmap(self, fn: Callable[..., Any], **kwargs) -> Callable[..., Any]:
    """`jax.pmap` over all devices with this layout's axis name."""
    return jax.pmap(fn, axis_name=AXIS, devices=self.devices, **kwargs)

  # --- Between host and devices ---------------------------------------------

  @property
  def _sharding(self) -> NamedSharding:
    """Leading axis split over the devices, in pmap order."""
    return NamedSharding(Mesh(np.array(self.devices), (AXIS,)),
                         PartitionSpec(AXIS))

  def _to_devices(self, local: np.ndarray) -> jax.Array:
    """A global array from this process's [local devices, ...] slice."""
    return jax.make_array_from_process_local_data(
        self._sharding, np.asarray(local),
        (self.num_devices, *local.shape[1:]))

  def shard_towers(self, tree: PyTree) -> PyTree:
    """Host tower-stacked tree ([towers, ...] leaves) -> per-device towers."""
    def shard(leaf):
      leaf = np.asarray(leaf)
      per_replica = leaf.reshape(self.devices_per_replica,
                                 self.towers_per_device, *leaf.shape[1:])
      local = np.broadcast_to(per_replica,
                              (self.num_local_replicas, *per_replica.shape))
      return self._to_devices(local.reshape(-1, *per_replica.shape[1:]))
    return jax.tree.map(shard, tree)

  def gather_towers(self, tree: PyTree) -> PyTree:
    """Per-device towers -> one host copy with [towers, ...] leaves.

    Reads the first replica's devices of this process, so every process
    can produce the copy (tower pairs never straddle processes).
    """
    def gather(leaf):
      shards = sorted(leaf.addressable_shards, key=lambda s: s.index[0].start)
      towers = [np.asarray(s.data) for s in shards[:self.devices_per_replica]]
      return np.concatenate(towers).reshape(self.num_towers, *leaf.shape[2:])
    return jax.tree.map(gather, tree)

  def replicate(self, tree: PyTree) -> PyTree:
    """Host tree -> the same values on every device ([devices, ...])."""
    return jax.tree.map(
        lambda x: self._to_devices(np.broadcast_to(
            np.asarray(x), (self.num_local_devices, *np.shape(x)))), tree)

  def shard_batch(self, batch: PyTree) -> PyTree:
    """[local replicas, per replica, ...] host batch -> devices.

    Each replica's slice goes from the host to the first device of its
    replica once; the other device of a tower pair gets it by a copy
    between devices, not a second host copy.

    Args:
      batch: a tree of [num_local_replicas, per replica, ...] arrays.

    Returns:
      The tree as global [devices, per replica, ...] arrays.
    """
    local = [d for d in self.devices if d.process_index == jax.process_index()]
    per = self.devices_per_replica

    def shard(x):
      x = np.asarray(x)
      arrays = []
      for r in range(self.num_local_replicas):
        first = jax.device_put(x[r:r + 1], local[r * per])
        arrays += [first] + [jax.device_put(first, device)
                             for device in local[r * per + 1:(r + 1) * per]]
      return jax.make_array_from_single_device_arrays(
          (self.num_devices, *x.shape[1:]), self._sharding, arrays)
    return jax.tree.map(shard, batch)
