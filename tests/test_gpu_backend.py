"""The backend a run starts on: quietly on the CPU where there is no
accelerator, never on the CPU beside NVIDIA GPUs that JAX cannot use.

The machines are fake: a directory standing for '/', with the PCI devices
(sys/bus/pci/devices/ADDRESS/{vendor,device,class}) and the NVIDIA driver's
list (proc/driver/nvidia/gpus/ADDRESS/information) of a GPU host.
"""

import os
import subprocess
import sys
import types

import jax
import pytest

from alexnet import backend

_H100 = ('0x10de', '0x2330', '0x030200')  # NVIDIA 3D controller.
_A100_VGA = ('0x10de', '0x20b2', '0x030000')  # NVIDIA VGA controller.
_NVIDIA_AUDIO = ('0x10de', '0x22ba', '0x040300')  # A GPU's HDMI audio.
_GVNIC = ('0x1ae0', '0x0042', '0x020000')  # Google's network card.


def _machine(root, pci=(), driver=()):
  """A fake root: PCI devices (vendor, device, class) at 0000:00:0N.0, and
  the driver's model names of the first len(driver) of them."""
  for number, ids in enumerate(pci):
    device = root / 'sys/bus/pci/devices' / f'0000:00:0{number}.0'
    device.mkdir(parents=True)
    for name, value in zip(('vendor', 'device', 'class'), ids):
      (device / name).write_text(value + '\n')
  for number, model in enumerate(driver):
    gpu = root / 'proc/driver/nvidia/gpus' / f'0000:00:0{number}.0'
    gpu.mkdir(parents=True)
    (gpu / 'information').write_text(
        f'Model: \t\t {model}\nIRQ:   \t\t 42\nBus Location: \t '
        f'0000:00:0{number}.0\n')
  return str(root)


def test_nvidia_gpus_are_found_on_the_pci_bus_and_named_by_the_driver(
    tmp_path):
  root = _machine(tmp_path, [_H100, _H100, _NVIDIA_AUDIO, _GVNIC],
                  driver=['NVIDIA H100 80GB HBM3'])
  # The second has no driver entry: its PCI ids name it.
  assert backend.nvidia_gpus(root) == ['NVIDIA H100 80GB HBM3',
                                       'NVIDIA GPU 10de:2330']
  assert backend.nvidia_gpus(_machine(tmp_path / 'vga', [_A100_VGA])) == [
      'NVIDIA GPU 10de:20b2']
  # A container may show the driver's list without the PCI bus.
  only_driver = _machine(tmp_path / 'container', driver=['NVIDIA A100'] * 2)
  assert backend.nvidia_gpus(only_driver) == ['NVIDIA A100'] * 2
  assert backend.nvidia_gpus(_machine(tmp_path / 'cpu', [_GVNIC])) == []
  assert backend.nvidia_gpus(str(tmp_path / 'absent')) == []


def _environ(root, **more):
  return {backend.ROOT_VARIABLE: root, **more}


def test_start_refuses_gpus_without_the_cuda_plugin_in_one_line(
    tmp_path, monkeypatch):
  root = _machine(tmp_path, [_H100] * 2, driver=['NVIDIA H100 80GB HBM3'] * 2)
  monkeypatch.setattr(backend, '_jax_plugins', set)  # No plugin installed.
  with pytest.raises(backend.GpuError) as refusal:
    backend.start(_environ(root))
  message = str(refusal.value)
  assert '\n' not in message
  assert message.startswith('this machine has 2 NVIDIA GPUs (2 x NVIDIA H100 '
                            '80GB HBM3) but JAX has no CUDA plugin')
  assert backend.GPU_INSTALL in message and 'JAX_PLATFORMS=cpu' in message
  # Chosen on purpose, the CPU; and --mode=compile uses no device.
  assert backend.start(_environ(root, JAX_PLATFORMS='cpu')) is None
  assert backend.start(_environ(root), need_gpus=False) is None


def test_start_keeps_jax_to_the_hardware_there(tmp_path, monkeypatch):
  chosen = []
  monkeypatch.setattr(jax.config, 'update',
                      lambda name, value: chosen.append((name, value)))
  gpus = _machine(tmp_path / 'gpu', [_H100])
  cpu_only = _machine(tmp_path / 'cpu', [_GVNIC])
  tpu = _machine(tmp_path / 'tpu', [('0x1ae0', '0x0063', '0x088000')])
  monkeypatch.setattr(backend, '_jax_plugins', lambda: {'xla_cuda12'})
  # GPUs: JAX's CUDA plugin, and no fallback to another backend but the
  # CPU's; for --mode=compile, JAX's own choice.
  assert backend.start(_environ(gpus)) == 'cuda,cpu'
  assert backend.start(_environ(gpus), need_gpus=False) is None
  assert backend.start(_environ(tpu)) is None  # libtpu runs.
  # The CUDA plugin (and libtpu) installed, no GPU or TPU: the CPU, without
  # JAX trying them first.
  assert backend.start(_environ(cpu_only)) == 'cpu'
  assert chosen == [('jax_platforms', 'cuda,cpu'), ('jax_platforms', 'cpu')]
  # A plugin for hardware this code cannot see: left to JAX.
  monkeypatch.setattr(backend, '_jax_plugins',
                      lambda: {'xla_cuda12', 'xla_rocm7'})
  assert backend.start(_environ(cpu_only)) is None


def test_gpus_jax_cannot_start_on_are_refused_after_it_starts(
    tmp_path, monkeypatch):
  # The tests run JAX on the CPU: as where the CUDA plugin finds no GPU.
  assert jax.default_backend() == 'cpu'
  root = _machine(tmp_path, [_H100], driver=['NVIDIA H100 80GB HBM3'])
  with pytest.raises(backend.GpuError,
                     match=r'1 NVIDIA GPU \(1 x NVIDIA H100 80GB HBM3\) but '
                     'JAX started on its cpu backend'):
    backend.check_started(_environ(root))
  backend.check_started(_environ(root, JAX_PLATFORMS='cpu'))
  backend.check_started(_environ(_machine(tmp_path / 'cpu', [_GVNIC])))
  # With JAX's platforms set to 'cuda,cpu', a CUDA backend that fails to
  # start is JAX's error: its first line joins the refusal.
  def fail():
    raise RuntimeError("Unable to initialize backend 'cuda': INTERNAL: no "
                       'supported devices found for platform CUDA.\nmore')
  monkeypatch.setattr(jax, 'default_backend', fail)
  with pytest.raises(backend.GpuError) as refusal:
    backend.check_started(_environ(root))
  assert ("but JAX's CUDA backend did not start (Unable to initialize "
          "backend 'cuda': INTERNAL: no supported devices found for platform "
          'CUDA). Install the GPU set') in str(refusal.value)


def test_the_start_up_line_names_kind_count_and_memory():
  def gpu(stats):
    return types.SimpleNamespace(device_kind='NVIDIA H100 80GB HBM3',
                                 platform='gpu', memory_stats=lambda: stats)
  assert backend.describe_devices([gpu({'bytes_limit': 63.8e9})] * 8) == (
      '8 x NVIDIA H100 80GB HBM3 (gpu, 63.8 GB for JAX each)')
  assert backend.describe_devices(jax.devices()[:1]) == '1 x cpu (cpu)'


def test_main_refuses_a_gpu_host_jax_cannot_use_and_trains_when_told_to(
    repo, tiny, tmp_path):
  root = _machine(tmp_path / 'host', [_H100] * 2,
                  driver=['NVIDIA H100 80GB HBM3'] * 2)
  env = {name: value for name, value in os.environ.items()
         if name != 'JAX_PLATFORMS'}
  env[backend.ROOT_VARIABLE] = root
  command = [sys.executable, 'main.py', '--config=configs/alexnet.py:tiny',
             f'--config.data_dir={tiny().data_dir}',
             f'--workdir={tmp_path / "run"}']
  # The CUDA plugin is installed here but finds no GPU (no driver): JAX
  # would start on the CPU. (Its own traceback comes first.)
  refused = subprocess.run(command, cwd=repo, env=env, capture_output=True,
                           text=True, timeout=300)
  assert refused.returncode == 1
  errors = [line for line in refused.stderr.splitlines()
            if line.startswith('error:')]
  assert errors == [refused.stderr.strip().splitlines()[-1]]
  assert errors[0].startswith('error: this machine has 2 NVIDIA GPUs (2 x '
                              'NVIDIA H100 80GB HBM3) but JAX started on its '
                              'cpu backend')
  assert backend.GPU_INSTALL in errors[0]
  assert not os.path.exists(tmp_path / 'run')  # Stopped before any work.
  trained = subprocess.run(command, cwd=repo, env=dict(env, JAX_PLATFORMS='cpu'),
                           capture_output=True, text=True, timeout=600)
  assert trained.returncode == 0, trained.stderr[-2000:]
  assert os.listdir(tmp_path / 'run' / 'checkpoints')
