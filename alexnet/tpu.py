"""Compiles the real train and eval steps for a TPU slice, with no TPU.

    python main.py --config=configs/alexnet.py --mode=compile --topology=v5e:2x4

libtpu (`pip install 'jax[tpu]==0.10.2'`) holds the TPU compiler, and JAX's
compile-only topologies (`jax.experimental.topologies`) give the devices of
any slice shape, on any machine. The mapped steps that training runs
(`steps.map_train_step`, `steps.map_eval_step`) are lowered here for those
devices with abstract arguments and compiled. The compiler's accounting then
says, per chip, how much HBM a step needs and how many FLOPs it does;
against the chip's published peak (alexnet/roofline.py, docs/TPU.md) that
bounds the step time from below, and so the images per second from above.
"""

import contextlib
import functools
import importlib.metadata
import importlib.util
import math
import os
import pkgutil
import re
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import topologies
import ml_collections
import tensorflow_datasets as tfds

from alexnet import config_checks
from alexnet import distributed
from alexnet import errors
from alexnet import parallel
from alexnet import roofline
from alexnet import steps
from alexnet.data import info as info_lib
from alexnet.data import sources

Config = ml_collections.ConfigDict
Struct = jax.ShapeDtypeStruct


class TopologyError(errors.UserError):
  """A --topology that cannot be compiled for, or a step that cannot fit."""


# 'v5e:2x2', 'v4:2x2x1': a generation and the chips along each axis.
_TOPOLOGY = re.compile(r'([a-z0-9]+):(\d+)x(\d+)(?:x(\d+))?')
_MEMORY_ERRORS = ('RESOURCE_EXHAUSTED', 'Ran out of memory')


# --- The devices ----------------------------------------------------------


def _accelerator_plugins() -> list[str]:
  """JAX's PJRT plugins installed besides libtpu (CUDA, ROCm, ...)."""
  names = [entry.name for entry in
           importlib.metadata.entry_points(group='jax_plugins')]
  try:
    import jax_plugins  # pylint: disable=g-import-not-at-top
  except ImportError:
    return names
  return names + [module.name
                  for module in pkgutil.iter_modules(jax_plugins.__path__)]


def keep_jax_off_absent_tpu() -> bool:
  """Starts JAX on the CPU where libtpu is installed but no TPU is attached.

  requirements.txt installs libtpu for --mode=compile. With it, JAX tries
  the TPU backend first at start-up even without a TPU, and libtpu prints
  warnings before JAX falls back to the CPU. Where the CPU is all JAX could
  use (JAX_PLATFORMS unset, no TPU on the PCI bus, no other accelerator
  plugin installed) this says so before JAX starts; TPU and GPU hosts are
  left to JAX. Compile-only TPU devices still work (`topology_devices`).

  Returns:
    Whether it restricted JAX to the CPU.
  """
  if (os.environ.get('JAX_PLATFORMS') or distributed.tpu_present()
      or importlib.util.find_spec('libtpu') is None
      or _accelerator_plugins()):
    return False
  jax.config.update('jax_platforms', 'cpu')
  return True


def parse_topology(name: str) -> tuple[str, tuple[int, int, int]]:
  """'v5e:2x4' -> ('v5e', (2, 4, 1)).

  Raises:
    TopologyError: not GENERATION:AxB[xC], GENERATION in `roofline.CHIPS`.
  """
  match = _TOPOLOGY.fullmatch(name or '')
  if not match or match[1] not in roofline.CHIPS:
    raise TopologyError(
        f'--topology={name!r} is not a TPU slice this code knows: give '
        'GENERATION:AxB or AxBxC chips, GENERATION one of '
        f'{list(roofline.CHIPS)}, e.g. --topology=v5e:2x2 or v4:2x2x1.')
  return match[1], (int(match[2]), int(match[3]), int(match[4] or 1))


def require_libtpu() -> None:
  """Refuses to go on without the TPU compiler, naming the install."""
  if importlib.util.find_spec('libtpu') is None:
    raise TopologyError(
        '--mode=compile needs libtpu, the TPU compiler, which is not '
        f"installed: pip install 'jax[tpu]=={jax.__version__}'.")


@contextlib.contextmanager
def _slice_described_to_libtpu(generation: str,
                               chips: int) -> Iterator[None]:
  """Tells libtpu the slice, where no TPU VM metadata server can.

  On start-up libtpu asks the Cloud TPU metadata for the accelerator type
  and the worker hosts, and prints warnings to stderr where there are none.
  Without chips to guard, several compiling processes (tests, a compile
  next to another) may load libtpu at once, which its lock file refuses.
  libtpu reads these at its first start, inside the block; the variables
  are removed after it, as `distributed.detect_cluster` takes
  TPU_WORKER_HOSTNAMES for a Cloud TPU cluster. A TPU VM keeps its own.
  """
  chip = roofline.CHIPS[generation]
  settings = {
      'ALLOW_MULTIPLE_LIBTPU_LOAD': '1',
      'TPU_ACCELERATOR_TYPE':
          f'{chip.accelerator}-{chip.cores_per_chip * chips}',
      'TPU_WORKER_HOSTNAMES': 'localhost'}
  added = ([] if distributed.tpu_present()
           else [name for name in settings if name not in os.environ])
  os.environ.update({name: settings[name] for name in added})
  try:
    yield
  finally:
    for name in added:
      del os.environ[name]


def topology_devices(name: str) -> tuple[jax.Device, ...]:
  """Compile-only devices of the TPU slice `name`, one per chip.

  All chips are put on one host, so that every device is this process's, as
  the layout expects; the program compiled for a chip does not depend on it.

  Args:
    name: e.g. 'v5e:2x2'.

  Returns:
    The devices, in the slice's order.

  Raises:
    TopologyError: unknown name, no libtpu, or a shape libtpu refuses.
  """
  generation, bounds = parse_topology(name)
  require_libtpu()
  try:
    with _slice_described_to_libtpu(generation, math.prod(bounds)):
      topology = topologies.get_topology_desc(
          platform='tpu', topology_name=name,
          chip_config_name=roofline.CHIPS[generation].chip_config,
          chips_per_host_bounds=bounds, num_slices=1)
  except jax.errors.JaxRuntimeError as error:
    raise TopologyError(
        f'--topology={name!r}: libtpu could not describe this slice '
        f'({str(error).splitlines()[0]}); use a shape Cloud TPU offers, '
        'e.g. v5e:2x2, v5e:2x4, v4:2x2x1.') from None
  return tuple(topology.devices)


# --- The abstract arguments -------------------------------------------------


def num_classes(config: Config) -> int:
  """The dataset's number of labels, without reading (or needing) its data.

  A TFDS catalogue dataset (imagenet2012) declares it in its builder's code;
  the offline datasets and image folders read it from their source, which
  prepares in seconds with no network.

  Raises:
    errors.DatasetError: an unknown dataset, or an unreadable source.
  """
  local = (*sources.OFFLINE_BUILDERS, 'folder')
  if config.dataset in local or (config.dataset == 'fashion_mnist'
                                 and config.fashion_mnist_dir):
    return sources.make_source(config).num_classes
  try:
    builder = tfds.builder(config.dataset, data_dir=sources.data_root(config))
  except tfds.core.registered.DatasetNotFoundError as error:
    raise errors.DatasetError(
        f'config.dataset={config.dataset!r} is not a TFDS dataset: '
        f'{str(error).splitlines()[0]}') from None
  _, label_key = builder.info.supervised_keys or ('image', 'label')
  return builder.info.features[label_key].num_classes


def _per_device(tree: Any, layout: parallel.Layout) -> Any:
  """Host [towers, ...] leaves -> the steps' [devices, towers here, ...]."""
  return jax.tree.map(lambda leaf: Struct(
      (layout.num_devices, layout.towers_per_device, *leaf.shape[1:]),
      leaf.dtype), tree)


def _batch(layout: parallel.Layout, per_replica: int,
           fields: dict[str, tuple[tuple[int, ...], Any]]) -> dict[str, Any]:
  """{name: [devices, per_replica, *shape]} of the given dtypes."""
  return {name: Struct((layout.num_devices, per_replica, *shape), dtype)
          for name, (shape, dtype) in fields.items()}


def _train_arguments(config: Config, layout: parallel.Layout,
                     state: Any, mean: Struct) -> tuple[Any, ...]:
  """What train.py feeds `map_train_step`: uint8 crops, offsets, flips."""
  side = config.image_size
  batch = _batch(layout, info_lib.per_replica(config, 'batch_size',
                                              layout.num_replicas), {
      'image': ((side, side, 3), jnp.uint8), 'offset': ((2,), jnp.int32),
      'flip': ((), jnp.bool_), 'shift': ((3,), jnp.float32),
      'label': ((), jnp.int32)})
  # A Python float and int in train.py: weakly typed scalars.
  return (state, batch, mean, Struct((), jnp.float32, weak_type=True),
          Struct((), jnp.int32, weak_type=True))


def _eval_arguments(config: Config, layout: parallel.Layout,
                    params: Any, mean: Struct) -> tuple[Any, ...]:
  """What evaluation feeds `map_eval_step`: uint8 squares with a mask."""
  side = config.resize_size
  batch = _batch(layout, info_lib.per_replica(config, 'eval_batch_size',
                                              layout.num_replicas), {
      'image': ((side, side, 3), jnp.uint8), 'label': ((), jnp.int32),
      'mask': ((), jnp.bool_)})
  return params, batch, mean


# --- Compiling --------------------------------------------------------------


def _does_not_fit(config: Config, step: str, field: str, generation: str,
                  replicas: int, needed: str) -> TopologyError:
  """The refusal of a step too big for the chip, with the batch that helps."""
  half = max(replicas, config[field] // 2 // replicas * replicas)
  fixes = [f'--config.{field}={half}']
  if config.dtype != 'bfloat16':
    fixes.append('--config.dtype=bfloat16')
  return TopologyError(
      f'the {step} step does not fit in the HBM of a {generation} chip '
      f'({roofline.format_bytes(roofline.CHIPS[generation].hbm_bytes)}): '
      f'{needed}. Lower it with {" or ".join(fixes)}, or use more chips.')


def _compile_step(step: Any, arguments: tuple[Any, ...], images: int,
                  refusal: functools.partial) -> roofline.StepCost:
  """Compiles a mapped step for its devices and reads the compiler's costs.

  Raises:
    TopologyError: the compiler found that the step overflows the HBM.
  """
  try:
    compiled = step.lower(*arguments).compile()
  except jax.errors.JaxRuntimeError as error:
    if not any(mark in str(error) for mark in _MEMORY_ERRORS):
      raise
    raise refusal(needed=str(error).splitlines()[0].rstrip('.')) from None
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return roofline.StepCost(
      images=images, argument_bytes=memory.argument_size_in_bytes,
      output_bytes=memory.output_size_in_bytes,
      alias_bytes=memory.alias_size_in_bytes,
      temp_bytes=memory.temp_size_in_bytes,
      code_bytes=memory.generated_code_size_in_bytes,
      flops=cost.get('flops', 0.0),
      bytes_accessed=cost.get('bytes accessed', 0.0))


def _chip_bytes(tree: Any) -> int:
  """Bytes of one device's slice of [devices, ...] leaves."""
  return sum(leaf.size // leaf.shape[0] * leaf.dtype.itemsize
             for leaf in jax.tree.leaves(tree))


def _for_tpu(config: Config) -> Config:
  """A copy with conv_impl 'auto' resolved as on a TPU backend: 'xla'."""
  config = config.copy_and_resolve_references()
  if config.conv_impl == 'auto':
    config.conv_impl = 'xla'
  return config


def compile_steps(config: Config, topology: str) -> roofline.Report:
  """Compiles the config's train and eval steps for a TPU slice.

  Args:
    config: the experiment config; the slice's chips replace
      config.num_devices.
    topology: the slice, e.g. 'v5e:2x2' (see `parse_topology`).

  Returns:
    The per-chip report.

  Raises:
    TopologyError: unknown slice, no libtpu, or a step that does not fit.
    errors.ConfigError: a config that cannot run on the slice.
  """
  devices = topology_devices(topology)
  generation = parse_topology(topology)[0]
  config = _for_tpu(config)
  layout = parallel.Layout.create(config.model_parallel, devices,
                                  towers=config.towers)
  config_checks.validate(config, layout)
  classes = num_classes(config)
  host = jax.eval_shape(functools.partial(
      steps.initial_tree, config, steps.create_model(config, classes)))
  state = _per_device({'params': host['params'],
                       'opt_state': host['opt_state']}, layout)
  side = config.resize_size
  mean = Struct((layout.num_devices, side, side, 3), jnp.float32)
  model = steps.create_model(config, classes, layout.exchange)
  start = time.perf_counter()
  costs = {}
  for name, field, step, arguments in [
      ('train', 'batch_size', steps.map_train_step(model, layout, config),
       _train_arguments(config, layout, state, mean)),
      ('eval', 'eval_batch_size', steps.map_eval_step(model, layout, config),
       _eval_arguments(config, layout, state['params'], mean))]:
    refusal = functools.partial(_does_not_fit, config, name, field,
                                generation, layout.num_replicas)
    costs[name] = _compile_step(step, arguments, config[field], refusal)
    if costs[name].total_bytes > roofline.CHIPS[generation].hbm_bytes:
      raise refusal(
          needed=roofline.format_bytes(costs[name].total_bytes))
  return roofline.Report(
      topology, config, layout, classes, _chip_bytes(state['params']),
      _chip_bytes(state['opt_state']),
                costs['train'], costs['eval'], time.perf_counter() - start)
