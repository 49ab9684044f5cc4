"""The compile-only devices of a TPU slice, with no TPU.

    python main.py --config=configs/alexnet.py --mode=compile --topology=v5e:2x4

libtpu (`pip install 'jax[tpu]==0.10.2'`, in requirements-tpu.txt and
requirements-test.txt) holds the TPU compiler, and JAX's compile-only
topologies (`jax.experimental.topologies`) give the chips of any slice
shape, on any machine. alexnet/compile_only.py compiles the steps for them;
docs/TPU.md has the chips' published figures.
"""

import contextlib
import importlib.metadata
import importlib.util
import math
import os
import re
from collections.abc import Iterator

import jax
from jax.experimental import topologies

from alexnet import compile_only
from alexnet import distributed
from alexnet import roofline

TopologyError = compile_only.TopologyError

# 'v5e:2x2', 'v4:2x2x1': a generation and the chips along each axis.
_TOPOLOGY = re.compile(r'([a-z0-9]+):(\d+)x(\d+)(?:x(\d+))?')
# How libtpu names each generation: its chip configuration giving one JAX
# device per chip ('megacore' joins v4's two TensorCores, as JAX does on a
# v4 VM), Cloud TPU's accelerator type prefix, and TensorCores per chip
# (the accelerator type counts them).
_LIBTPU_NAMES = {
    'v4': ('megacore', 'v4', 2),
    'v5e': ('default', 'v5litepod', 1),
    'v5p': ('default', 'v5p', 2),
    'v6e': ('default', 'v6e', 1),
}


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
  _, accelerator, cores_per_chip = _LIBTPU_NAMES[generation]
  settings = {
      'ALLOW_MULTIPLE_LIBTPU_LOAD': '1',
      'TPU_ACCELERATOR_TYPE': f'{accelerator}-{cores_per_chip * chips}',
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
          chip_config_name=_LIBTPU_NAMES[generation][0],
          chips_per_host_bounds=bounds, num_slices=1)
  except jax.errors.JaxRuntimeError as error:
    raise TopologyError(
        f'--topology={name!r}: libtpu could not describe this slice '
        f'({str(error).splitlines()[0]}); use a shape Cloud TPU offers, '
        'e.g. v5e:2x2, v5e:2x4, v4:2x2x1.') from None
  return tuple(topology.devices)


def target(name: str) -> compile_only.Target:
  """The chips of the TPU slice `name` (e.g. 'v5e:2x2'), to compile for.

  Raises:
    TopologyError: unknown name, no libtpu, or a shape libtpu refuses.
  """
  return compile_only.Target(
      name, topology_devices(name), roofline.CHIPS[parse_topology(name)[0]],
      f'libtpu {importlib.metadata.version("libtpu")}')
