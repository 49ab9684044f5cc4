"""Which JAX backend a run starts on, and the GPUs it must not ignore.

JAX picks its backend at the first device it touches: a TPU where libtpu
finds one, a GPU where its CUDA plugin finds one, else the CPU. Two cases
need help from `start`, called before that:

* No accelerator on the machine, but their compilers installed (libtpu and
  the CUDA plugin come with requirements-test.txt for --mode=compile): JAX
  would try each, and each prints warnings or a traceback before JAX falls
  back to the CPU. `start` starts JAX on the CPU directly.
* NVIDIA GPUs on the machine that JAX cannot use (no CUDA plugin, or one
  that fails to start): JAX would train on the CPU, days slower, with one
  warning at most. `start` gives JAX the platforms 'cuda,cpu' (no other
  plugin tried, no silent fallback) and, with `check_started`, refuses
  instead, naming the GPUs and the install line. JAX_PLATFORMS=cpu, set on
  purpose, is obeyed.

The GPUs are found as the kernel lists them: a PCI device of NVIDIA's vendor
id whose class is a display or 3D controller, named by the NVIDIA driver
where it is loaded (/proc/driver/nvidia/gpus/ADDRESS/information).

`start` also sets XLA's CPU compiler options (`CPU_XLA_FLAGS`), which must
be in XLA_FLAGS before JAX starts its CPU backend.
"""

import collections
from collections.abc import Mapping, MutableMapping, Sequence
import importlib.metadata
import importlib.util
import os
import pkgutil

import jax

from alexnet import distributed
from alexnet import errors

NVIDIA_PCI_VENDOR = '0x10de'
# PCI base class 0x03, display controller: VGA (0x0300xx) or 3D (0x0302xx),
# as data-centre GPUs without a display output list themselves.
_DISPLAY_CLASS = '0x03'
# The directory read as the machine's root for its hardware (sys/bus/pci,
# proc/driver/nvidia): '/' unless set, which the tests do to give main.py a
# fake NVIDIA GPU.
ROOT_VARIABLE = 'ALEXNET_HARDWARE_ROOT'
GPU_INSTALL = ('python3 -m venv .venv && .venv/bin/pip install -r '
               'requirements-gpu.txt')
# This jaxlib's XLA:CPU hands convolutions to YNNPACK; its own (Eigen) ran
# each of AlexNet's 1.1-3x faster on the x86 machine measured, kernel
# gradients most (docs/performance.md, "CPU convolutions"). Only the CPU
# backend reads xla_cpu_* options. A user's XLA_FLAGS that name one win.
CPU_XLA_FLAGS = (
    '--xla_cpu_experimental_ynn_fusion_type=-individual_convolution',)


class GpuError(errors.UserError):
  """NVIDIA GPUs on the machine that JAX cannot use."""


def hardware_root(environ: Mapping[str, str] = os.environ) -> str:
  return environ.get(ROOT_VARIABLE) or '/'


def _read(path: str) -> str:
  try:
    with open(path) as f:
      return f.read()
  except OSError:
    return ''


def _driver_models(root: str) -> dict[str, str]:
  """{PCI address: model name} of the GPUs the NVIDIA driver has loaded."""
  gpus = os.path.join(root, 'proc/driver/nvidia/gpus')
  try:
    addresses = sorted(os.listdir(gpus))
  except OSError:
    return {}  # No driver loaded.
  models = {}
  for address in addresses:
    for line in _read(os.path.join(gpus, address, 'information')).splitlines():
      key, _, value = line.partition(':')
      if key.strip() == 'Model':
        models[address] = value.strip()
  return models


def nvidia_gpus(root: str = '/') -> list[str]:
  """The NVIDIA GPUs of this machine, one name each, in PCI order.

  Args:
    root: the directory standing for '/' (a fake tree in tests).

  Returns:
    The driver's model name of each GPU (e.g. 'NVIDIA H100 80GB HBM3'), or
    'NVIDIA GPU 10de:2330' (its PCI ids) where no driver names it.
  """
  models = _driver_models(root)
  pci = os.path.join(root, 'sys/bus/pci/devices')
  try:
    addresses = sorted(os.listdir(pci))
  except OSError:
    addresses = []  # No PCI bus visible (a container): the driver's list.
  found = []
  for address in addresses:
    device = os.path.join(pci, address)
    if (_read(os.path.join(device, 'vendor')).strip() == NVIDIA_PCI_VENDOR
        and _read(os.path.join(device, 'class')).startswith(_DISPLAY_CLASS)):
      found.append(models.get(address) or 'NVIDIA GPU 10de:'
                   + _read(os.path.join(device, 'device')).strip()[2:])
  return found or list(models.values())


def count_names(names: Sequence[str]) -> str:
  """['A', 'A', 'B'] -> '2 x A, 1 x B'."""
  return ', '.join(f'{count} x {name}'
                   for name, count in collections.Counter(names).items())


def _jax_plugins() -> set[str]:
  """JAX's installed PJRT plugins, e.g. {'xla_cuda12'}, as JAX finds them."""
  names = {entry.name for entry in
           importlib.metadata.entry_points(group='jax_plugins')}
  if importlib.util.find_spec('jax_plugins') is not None:
    import jax_plugins  # pylint: disable=g-import-not-at-top
    names |= {module.name
              for module in pkgutil.iter_modules(jax_plugins.__path__)}
  return names


def cuda_plugin_installed() -> bool:
  """Whether JAX has a CUDA plugin (XLA:GPU), e.g. jax-cuda12-plugin."""
  return any('cuda' in name for name in _jax_plugins())


def _refusal(gpus: list[str], why: str) -> GpuError:
  return GpuError(
      f'this machine has {len(gpus)} NVIDIA '
      f'{"GPU" if len(gpus) == 1 else "GPUs"} ({count_names(gpus)}) but '
      f'{why}. Install the GPU set: {GPU_INSTALL} (docs/GPU.md); or set '
      'JAX_PLATFORMS=cpu to train on the CPU.')


def set_cpu_flags(environ: MutableMapping[str, str] = os.environ) -> str:
  """Adds `CPU_XLA_FLAGS` to XLA_FLAGS, except options XLA_FLAGS names.

  Only effective before JAX starts its CPU backend (its first device or
  computation): XLA reads XLA_FLAGS once.

  Returns:
    The XLA_FLAGS it leaves.
  """
  flags = environ.get('XLA_FLAGS', '')
  for flag in CPU_XLA_FLAGS:
    if flag.partition('=')[0] not in flags:
      flags = f'{flags} {flag}'.strip()
  environ['XLA_FLAGS'] = flags
  return flags


def start(environ: MutableMapping[str, str] = os.environ,
          need_gpus: bool = True) -> str | None:
  """Chooses JAX's backends where JAX alone would choose badly.

  Call it before anything touches a device. It also sets the CPU's XLA
  options (`set_cpu_flags`), on every machine.

  Args:
    environ: the environment (a parameter for tests).
    need_gpus: refuse NVIDIA GPUs that JAX has no plugin for, and start JAX
      on them and the CPU only (False for --mode=compile, which uses no
      device).

  Returns:
    The platforms it gave JAX: 'cpu' (no accelerator here), 'cuda,cpu'
    (NVIDIA GPUs: no other plugin tried, and a CUDA plugin that fails is an
    error, not a fallback); or None where JAX chooses: JAX_PLATFORMS set, a
    TPU present, or a plugin for hardware this code cannot see (ROCm).

  Raises:
    GpuError: NVIDIA GPUs present, no CUDA plugin, `need_gpus`.
  """
  set_cpu_flags(environ)
  root = hardware_root(environ)
  if environ.get('JAX_PLATFORMS') or distributed.tpu_present(
      os.path.join(root, 'sys/bus/pci/devices')):
    return None
  plugins = _jax_plugins()
  cuda = {name for name in plugins if 'cuda' in name}
  gpus = nvidia_gpus(root)
  if gpus and not need_gpus:
    return None
  if gpus and not cuda:
    raise _refusal(gpus, 'JAX has no CUDA plugin to run on them')
  if not gpus and plugins - cuda:
    return None
  platforms = 'cuda,cpu' if gpus else 'cpu'
  jax.config.update('jax_platforms', platforms)
  return platforms


def check_started(environ: Mapping[str, str] = os.environ) -> None:
  """Refuses a run that JAX cannot start on the NVIDIA GPUs it has.

  Call it after `start`; it starts JAX's backends.

  Raises:
    GpuError: NVIDIA GPUs present, JAX_PLATFORMS unset, and JAX's CUDA
      backend failed to start, or JAX's default backend is not the GPU.
  """
  if environ.get('JAX_PLATFORMS'):
    return
  gpus = nvidia_gpus(hardware_root(environ))
  if not gpus:
    return
  try:
    platform = jax.default_backend()
  except RuntimeError as error:  # 'Unable to initialize backend 'cuda'...'
    raise _refusal(gpus, 'JAX\'s CUDA backend did not start ('
                   + str(error).splitlines()[0].rstrip('.') + ')') from None
  if platform != 'gpu':
    raise _refusal(gpus, f'JAX started on its {platform} backend: its '
                   'CUDA plugin found no GPU it can use')


def describe_devices(devices: Sequence[jax.Device]) -> str:
  """'8 x NVIDIA H100 80GB HBM3 (gpu, 63.8 GB for JAX each)', or 'cpu'.

  The memory is what JAX's allocator may use on one device (by default 75%
  of a GPU's memory, XLA_PYTHON_CLIENT_MEM_FRACTION).
  """
  kinds = count_names([device.device_kind for device in devices])
  stats = devices[0].memory_stats() or {}
  memory = (f', {stats["bytes_limit"] / 1e9:.1f} GB for JAX each'
            if 'bytes_limit' in stats else '')
  return f'{kinds} ({devices[0].platform}{memory})'
