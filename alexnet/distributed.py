"""Multi-process start-up (`jax.distributed`) and preemption.

One JAX process per host (or per launcher task) sees the devices of all
processes; `jax.distributed.initialize` connects them through a coordinator
run by process 0. `initialize(config)` decides whether to call it:

* explicitly, when `config.coordinator_address`, `config.num_processes` or
  `config.process_id` is set, or the environment variables
  JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID are (fields win);
* automatically, in the cluster environments JAX detects by itself: a SLURM
  job step of two or more tasks (`srun`), an Open MPI job of two or more
  ranks (`mpirun`), or a Cloud TPU VM (one process per TPU host), found as
  JAX finds it: a PCI device of Google's vendor id *and* a TPU device id
  (`tpu_present`). The vendor id alone is not a TPU: Google Cloud's gVNIC
  network card has it too, on every GPU VM;
* never otherwise: a plain machine runs one process over all its devices,
  where `jax.distributed.initialize()` would fail for want of a coordinator.

Preemption: with several processes every one of them must stop after the
same step (each step holds collectives across all of them). JAX's
coordination service provides that: its notifier catches SIGTERM on any
process and `multihost_utils.reached_preemption_sync_point(step)` becomes
true at the same step on all of them. `StopSignal` uses it there, and a
plain Python handler with one process.
"""

import dataclasses
import os
import signal
import types
from collections.abc import Mapping

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections

from alexnet import errors

# How JAX itself recognises a TPU VM (its module jax._src.hardware_utils,
# jax 0.10): a PCI device of Google's vendor id with one of these device ids.
_GOOGLE_PCI_VENDOR = '0x1ae0'
_TPU_PCI_DEVICES = {
    '0x0027': 'TPU v2/v3',
    '0x0056': 'TPU (plc)',
    '0x005e': 'TPU v4',
    '0x0062': 'TPU v5p',
    '0x0063': 'TPU v5e',
    '0x006f': 'TPU v6e',
    '0x0076': 'TPU7x',
}
# Where Linux lists PCI devices, one directory each with `vendor` and
# `device` files.
PCI_DEVICES = '/sys/bus/pci/devices'


@dataclasses.dataclass(frozen=True)
class Settings:
  """Arguments of `jax.distributed.initialize`; None lets JAX detect them."""

  coordinator_address: str | None
  num_processes: int | None
  process_id: int | None
  reason: str


def _int_env(environ: Mapping[str, str], name: str) -> int | None:
  value = environ.get(name, '')
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise errors.ConfigError(
        f'{name}={value!r} must be an integer.') from None


def _read_id(path: str) -> str | None:
  try:
    with open(path) as f:
      return f.read().strip()
  except OSError:
    return None


def tpu_present(pci_root: str = PCI_DEVICES) -> bool:
  """Whether a TPU chip is attached through PCI (as JAX decides it).

  Args:
    pci_root: the directory of PCI devices (a parameter for tests).

  Returns:
    True if some device there has Google's vendor id and a TPU device id.
    Other Google devices (e.g. the gVNIC network card, device 0x0042, on
    Google Cloud GPU VMs) are not TPUs.
  """
  try:
    names = os.listdir(pci_root)
  except OSError:
    return False  # Not Linux, or no PCI bus visible (a container).
  for name in names:
    device = os.path.join(pci_root, name)
    if (_read_id(os.path.join(device, 'vendor')) == _GOOGLE_PCI_VENDOR
        and _read_id(os.path.join(device, 'device')) in _TPU_PCI_DEVICES):
      return True
  return False


def detect_cluster(environ: Mapping[str, str] = os.environ,
                   pci_root: str = PCI_DEVICES) -> str | None:
  """The multi-process cluster this process runs in, if JAX can detect it.

  Args:
    environ: the environment (a parameter for tests).
    pci_root: the directory of PCI devices (a parameter for tests).

  Returns:
    'SLURM', 'Open MPI' or 'Cloud TPU', or None on a plain machine (or a
    one-task job, which needs no coordinator).
  """
  slurm = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS',
           'SLURM_PROCID', 'SLURM_LOCALID')  # What JAX's detection reads.
  if all(name in environ for name in slurm):
    if (_int_env(environ, 'SLURM_NTASKS') or 1) > 1:
      return 'SLURM'
  if 'OMPI_MCA_orte_hnp_uri' in environ:
    if (_int_env(environ, 'OMPI_COMM_WORLD_SIZE') or 1) > 1:
      return 'Open MPI'
  if 'TPU_WORKER_HOSTNAMES' in environ or tpu_present(pci_root):
    return 'Cloud TPU'
  return None


def settings(config: ml_collections.ConfigDict,
             environ: Mapping[str, str] = os.environ,
             pci_root: str = PCI_DEVICES) -> Settings | None:
  """How to call `jax.distributed.initialize`, or None for one process.

  Args:
    config: uses coordinator_address, num_processes and process_id.
    environ: the environment (a parameter for tests).
    pci_root: the directory of PCI devices (a parameter for tests).

  Returns:
    The settings, or None where this is the only process.

  Raises:
    errors.ConfigError: explicit settings that are incomplete or
      inconsistent.
  """
  address = (config.coordinator_address
             or environ.get('JAX_COORDINATOR_ADDRESS') or None)
  count = config.num_processes or _int_env(environ, 'JAX_NUM_PROCESSES')
  index = (config.process_id if config.process_id >= 0
           else _int_env(environ, 'JAX_PROCESS_ID'))
  cluster = detect_cluster(environ, pci_root)
  explicit = (address, count, index) != (None, None, None)
  if not explicit:
    return None if cluster is None else Settings(None, None, None, cluster)
  if count is not None and count < 1:
    raise errors.ConfigError(
        f'config.num_processes={count} must be positive (0: auto).')
  if count == 1 and cluster is None:
    return None
  if cluster is None and None in (address, count, index):
    missing = [name for name, value in (
        ('coordinator_address', address), ('num_processes', count),
        ('process_id', index)) if value is None]
    raise errors.ConfigError(
        'Several processes need all of config.coordinator_address (host:port '
        'of process 0), config.num_processes and config.process_id (or the '
        'JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID '
        f'environment variables) outside SLURM, Open MPI or Cloud TPU; '
        f'missing: {", ".join("config." + m for m in missing)}.')
  if index is not None and count is not None and not 0 <= index < count:
    raise errors.ConfigError(
        f'config.process_id={index} must be in [0, config.num_processes='
        f'{count}).')
  return Settings(address, count, index,
                  'explicit settings' + (f' in {cluster}' if cluster else ''))


def initialize(config: ml_collections.ConfigDict,
               environ: Mapping[str, str] = os.environ,
               pci_root: str = PCI_DEVICES) -> None:
  """Connects the processes of a multi-process run; no-op for one process.

  Call it before anything touches a device (it must precede JAX's backend
  initialisation).

  Args:
    config: uses coordinator_address, num_processes and process_id.
    environ: the environment (a parameter for tests).
    pci_root: the directory of PCI devices (a parameter for tests).
  """
  found = settings(config, environ, pci_root)
  if found is None:
    return
  # CPU devices talk through gloo across processes (GPUs and TPUs use their
  # own collectives; the option only affects the CPU backend).
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  logging.info('Starting jax.distributed (%s).', found.reason)
  jax.distributed.initialize(coordinator_address=found.coordinator_address,
                             num_processes=found.num_processes,
                             process_id=found.process_id)


class StopSignal:
  """Turns SIGTERM/SIGINT into "finish this step, checkpoint and stop".

  One process: a Python handler records the first signal; a second one gets
  the previous handler (e.g. KeyboardInterrupt on a second Ctrl-C).

  Several processes: SIGTERM is left to JAX's preemption notifier (a Python
  handler would replace it), and `should_stop(step)` is JAX's preemption
  sync point, true at the same step on every process once any process got
  SIGTERM. SIGINT (Ctrl-C) is turned into a SIGTERM to this process.
  `should_stop` must then be called once after every step, by all processes.
  """

  def __init__(self):
    self.received: str | None = None
    self._multi_process = jax.process_count() > 1
    self._previous = {}

  def __enter__(self) -> 'StopSignal':
    signals = ((signal.SIGINT,) if self._multi_process
               else (signal.SIGTERM, signal.SIGINT))
    for sig in signals:
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum: int, frame: types.FrameType | None) -> None:
    del frame
    self.received = signal.Signals(signum).name
    signal.signal(signum, self._previous[signum])
    logging.warning('%s received: finishing the step, saving a checkpoint '
                    'and stopping.', self.received)
    if self._multi_process:
      os.kill(os.getpid(), signal.SIGTERM)  # To JAX's preemption notifier.

  def should_stop(self, step: int) -> bool:
    """Whether to checkpoint and stop after `step` (the same on all)."""
    if self._multi_process:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.received is not None

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
