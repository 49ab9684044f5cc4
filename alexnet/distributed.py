"""Multi-process start-up (`jax.distributed`) and preemption.

One JAX process per host (or per launcher task) sees the devices of all
processes; `jax.distributed.initialize` connects them through a coordinator
run by process 0. `initialize(config)` decides whether to call it:

* explicitly, when `config.coordinator_address`, `config.num_processes` or
  `config.process_id` is set, or the environment variables
  JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID are (fields win);
* automatically, in the cluster environments JAX detects by itself: a SLURM
  job step of two or more tasks (`srun`), an Open MPI job of two or more
  ranks (`mpirun`), or a Cloud TPU VM (one process per TPU host);
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
import glob
import os
import signal
import types
from collections.abc import Mapping

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections

from alexnet import errors

# PCI vendor id of Google's TPU chips (what JAX itself checks for a TPU VM).
_GOOGLE_PCI_VENDOR = '0x1ae0'


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


def _has_tpu() -> bool:
  for path in glob.glob('/sys/bus/pci/devices/*/vendor'):
    try:
      with open(path) as f:
        if f.read().strip() == _GOOGLE_PCI_VENDOR:
          return True
    except OSError:
      continue
  return False


def tpu_present() -> bool:
  """Whether a TPU chip is attached to this machine (its PCI vendor id)."""
  return _has_tpu()


def detect_cluster(environ: Mapping[str, str] = os.environ) -> str | None:
  """The multi-process cluster this process runs in, if JAX can detect it.

  Args:
    environ: the environment (a parameter for tests).

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
  if 'TPU_WORKER_HOSTNAMES' in environ or _has_tpu():
    return 'Cloud TPU'
  return None


def settings(config: ml_collections.ConfigDict,
             environ: Mapping[str, str] = os.environ) -> Settings | None:
  """How to call `jax.distributed.initialize`, or None for one process.

  Args:
    config: uses coordinator_address, num_processes and process_id.
    environ: the environment (a parameter for tests).

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
  cluster = detect_cluster(environ)
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


def initialize(config: ml_collections.ConfigDict) -> None:
  """Connects the processes of a multi-process run; no-op for one process.

  Call it before anything touches a device (it must precede JAX's backend
  initialisation).

  Args:
    config: uses coordinator_address, num_processes and process_id.
  """
  found = settings(config)
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
