"""Compiles the real train and eval steps for devices that are not here.

    python main.py --config=configs/alexnet.py --mode=compile --topology=v5e:2x4
    python main.py --config=configs/alexnet.py --mode=compile --topology=h100:8

JAX's compile-only topologies (`jax.experimental.topologies`) give the
devices of a TPU slice (alexnet/tpu.py, with libtpu) or of a GPU host
(alexnet/gpu.py, with the CUDA plugin) on any machine. The mapped steps that
training runs (`steps.map_train_step`, `steps.map_eval_step`) are lowered
here for those devices with abstract arguments of the shapes training feeds
them, and compiled. The compiler's accounting then says, per device, how
much memory a step needs; its FLOPs come from the compiler where it counts
them (TPU) or from the lowered step (alexnet/flops.py, GPU). Against the
device's published peaks (alexnet/roofline.py) that bounds the step time
from below, and so the images per second from above.
"""

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import tensorflow_datasets as tfds

from alexnet import config_checks
from alexnet import errors
from alexnet import flops as flops_lib
from alexnet import model
from alexnet import parallel
from alexnet import roofline
from alexnet import steps
from alexnet.data import info as info_lib
from alexnet.data import sources

Config = ml_collections.ConfigDict
Struct = jax.ShapeDtypeStruct

_MEMORY_ERRORS = ('RESOURCE_EXHAUSTED', 'Ran out of memory')


class TopologyError(errors.UserError):
  """A --topology that cannot be compiled for, or a step that cannot fit."""


@dataclasses.dataclass(frozen=True)
class Target:
  """Compile-only devices, and what the report says about them.

  Attributes:
    topology: the --topology they stand for, e.g. 'v5e:2x2' or 'h100:8'.
    devices: one compile-only JAX device per chip or GPU.
    device: the published figures of one of them.
    compiler: what compiles for them, e.g. 'libtpu 0.0.42.1'.
  """

  topology: str
  devices: tuple[jax.Device, ...]
  device: roofline.Accelerator
  compiler: str


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


def _train_batch(config: Config, layout: parallel.Layout) -> dict[str, Any]:
  """What train.py feeds `map_train_step`: uint8 crops, offsets, flips."""
  side = config.image_size
  return _batch(layout, info_lib.per_replica(config, 'batch_size',
                                             layout.num_replicas), {
      'image': ((side, side, 3), jnp.uint8), 'offset': ((2,), jnp.int32),
      'flip': ((), jnp.bool_), 'shift': ((3,), jnp.float32),
      'label': ((), jnp.int32)})


def _eval_batch(config: Config, layout: parallel.Layout) -> dict[str, Any]:
  """What evaluation feeds `map_eval_step`: uint8 squares with a mask."""
  side = config.resize_size
  return _batch(layout, info_lib.per_replica(config, 'eval_batch_size',
                                             layout.num_replicas), {
      'image': ((side, side, 3), jnp.uint8), 'label': ((), jnp.int32),
      'mask': ((), jnp.bool_)})


def device_bytes(tree: Any) -> int:
  """Bytes of one device's slice of [devices, ...] leaves."""
  return sum(leaf.size // leaf.shape[0] * leaf.dtype.itemsize
             for leaf in jax.tree.leaves(tree))


# --- Compiling --------------------------------------------------------------


def _does_not_fit(config: Config, step: str, field: str,
                  device: roofline.Accelerator, replicas: int,
                  needed: str) -> TopologyError:
  """The refusal of a step too big for the device, with the batch to use."""
  half = max(replicas, config[field] // 2 // replicas * replicas)
  fixes = [f'--config.{field}={half}']
  if config.dtype != 'bfloat16':
    fixes.append('--config.dtype=bfloat16')
  return TopologyError(
      f'the {step} step does not fit in the memory of one {device.name} '
      f'({roofline.format_bytes(device.memory_bytes)}): {needed}. Lower it '
      f'with {" or ".join(fixes)}, or use more {device.unit}s.')


@dataclasses.dataclass(frozen=True)
class LoweredStep:
  """One mapped step lowered for the target, with what the report needs.

  Attributes:
    lowered: the `jax.stages.Lowered` step.
    batch_field: the config field of its global batch size.
    least_bytes_moved: per device, its state read (and written back, when
      training) and its batch read, once each.
  """

  lowered: Any
  batch_field: str
  least_bytes_moved: int


@dataclasses.dataclass(frozen=True)
class LoweredSteps:
  """The train and eval steps lowered for a target (`lower_steps`)."""

  config: Config
  layout: parallel.Layout
  num_classes: int
  state: Any
  steps: dict[str, LoweredStep]


def _compile_step(step: LoweredStep, images: int,
                  refusal: functools.partial) -> tuple[roofline.StepCost, str]:
  """Compiles a lowered step and reads the compiler's costs.

  Returns:
    The step's costs, and who counted its FLOPs.

  Raises:
    TopologyError: the compiler found that the step overflows the memory.
  """
  try:
    compiled = step.lowered.compile()
  except jax.errors.JaxRuntimeError as error:
    if not any(mark in str(error) for mark in _MEMORY_ERRORS):
      raise
    raise refusal(needed=str(error).splitlines()[0].rstrip('.')) from None
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis() or {}
  cost = cost[0] if isinstance(cost, list) else cost
  if cost.get('flops'):
    flops, source = cost['flops'], "XLA's cost analysis"
  else:  # XLA:GPU's compiled programs count nothing.
    flops = flops_lib.count(step.lowered)
    source = 'convolutions and matmuls of the lowered step (alexnet/flops.py)'
  return roofline.StepCost(
      images=images, argument_bytes=memory.argument_size_in_bytes,
      output_bytes=memory.output_size_in_bytes,
      alias_bytes=memory.alias_size_in_bytes,
      temp_bytes=memory.temp_size_in_bytes,
      code_bytes=memory.generated_code_size_in_bytes, flops=flops,
      least_bytes_moved=step.least_bytes_moved,
      bytes_accessed=cost.get('bytes accessed')), source


def _for_accelerator(config: Config) -> Config:
  """A copy with conv_impl resolved, as the report names it."""
  config = config.copy_and_resolve_references()
  config.conv_impl = model.resolve_conv_impl(config.conv_impl)
  return config


def lower_steps(config: Config, target: Target) -> LoweredSteps:
  """Lowers the config's train and eval steps for the target's devices.

  Args:
    config: the experiment config; the target's devices replace
      config.num_devices.
    target: the devices (`tpu.target`, `gpu.target`).

  Returns:
    The lowered steps, with the config (conv_impl resolved), layout and
    abstract state they were lowered for.

  Raises:
    errors.ConfigError: a config that cannot run on the devices.
  """
  config = _for_accelerator(config)
  layout = parallel.Layout.create(config.model_parallel, target.devices,
                                  towers=config.towers)
  config_checks.validate(config, layout)
  classes = num_classes(config)
  host = jax.eval_shape(functools.partial(
      steps.initial_tree, config, steps.create_model(config, classes)))
  state = _per_device({'params': host['params'],
                       'opt_state': host['opt_state']}, layout)
  side = config.resize_size
  mean = Struct((layout.num_devices, side, side, 3), jnp.float32)
  train_batch, eval_batch = (_train_batch(config, layout),
                             _eval_batch(config, layout))
  # A Python float and int in train.py: weakly typed scalars.
  scalars = (Struct((), jnp.float32, weak_type=True),
             Struct((), jnp.int32, weak_type=True))
  net = steps.create_model(config, classes, layout.exchange)
  train = steps.map_train_step(net, layout, config).lower(
      state, train_batch, mean, *scalars)
  evaluate = steps.map_eval_step(net, layout, config).lower(
      state['params'], eval_batch, mean)
  return LoweredSteps(config, layout, classes, state, {
      'train': LoweredStep(train, 'batch_size', 2 * device_bytes(state)
                           + device_bytes(train_batch)),
      'eval': LoweredStep(evaluate, 'eval_batch_size',
                          device_bytes(state['params'])
                          + device_bytes(eval_batch))})


def compile_lowered(lowered: LoweredSteps,
                    target: Target) -> roofline.Report:
  """Compiles steps lowered by `lower_steps` and reports their costs.

  Args:
    lowered: the steps, lowered for the target.
    target: the devices they were lowered for.

  Returns:
    The per-device report.

  Raises:
    TopologyError: a step that does not fit.
  """
  start = time.perf_counter()
  config, layout = lowered.config, lowered.layout
  costs = {}
  for name, step in lowered.steps.items():
    refusal = functools.partial(_does_not_fit, config, name, step.batch_field,
                                target.device, layout.num_replicas)
    costs[name], source = _compile_step(step, config[step.batch_field],
                                        refusal)
    if costs[name].total_bytes > target.device.memory_bytes:
      raise refusal(
          needed=roofline.format_bytes(costs[name].total_bytes))
  state = lowered.state
  return roofline.Report(
      target.topology, target.device, target.compiler, source, config,
      layout, lowered.num_classes, device_bytes(state['params']),
      device_bytes(state['opt_state']), costs['train'], costs['eval'],
      time.perf_counter() - start)


def compile_steps(config: Config, target: Target) -> roofline.Report:
  """Compiles the config's train and eval steps for the target's devices.

  Args:
    config: the experiment config; the target's devices replace
      config.num_devices.
    target: the devices (`tpu.target`, `gpu.target`).

  Returns:
    The per-device report.

  Raises:
    TopologyError: a step that does not fit.
    errors.ConfigError: a config that cannot run on the devices.
  """
  return compile_lowered(lower_steps(config, target), target)
