"""Cluster detection: what makes a process start `jax.distributed`."""

import os

import jax
import pytest

from alexnet import distributed
from configs import alexnet as configs

# PCI ids as Linux lists them in /sys/bus/pci/devices/<address>/.
_GOOGLE = '0x1ae0'
_GVNIC = '0x0042'  # Google's virtual NIC: on every Google Cloud GPU VM.
_TPU_V5E = '0x0063'
_NVIDIA, _H100 = '0x10de', '0x2330'


def _sysfs(root, *devices):
  """A fake /sys/bus/pci/devices holding (vendor, device) id pairs."""
  for slot, (vendor, device) in enumerate(devices):
    folder = root / f'0000:00:{slot + 4:02x}.0'
    folder.mkdir(parents=True)
    (folder / 'vendor').write_text(vendor + '\n')
    (folder / 'device').write_text(device + '\n')
  return str(root)


@pytest.fixture
def config():
  return configs.get_config('tiny')  # No coordinator, processes: auto.


def test_a_gpu_vm_with_google_network_card_runs_one_plain_process(
    tmp_path, config, monkeypatch):
  pci = _sysfs(tmp_path, (_GOOGLE, _GVNIC), (_NVIDIA, _H100))
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize',
                      lambda *args, **kwargs: calls.append((args, kwargs)))
  assert not distributed.tpu_present(pci)
  assert distributed.detect_cluster({}, pci) is None
  assert distributed.settings(config, {}, pci) is None
  distributed.initialize(config, {}, pci)
  assert calls == []


def test_a_tpu_vm_is_detected_as_a_cloud_tpu_cluster(tmp_path, config):
  pci = _sysfs(tmp_path, (_GOOGLE, _GVNIC), (_GOOGLE, _TPU_V5E))
  assert distributed.tpu_present(pci)
  assert distributed.detect_cluster({}, pci) == 'Cloud TPU'
  # JAX finds the coordinator and process ids of a TPU VM by itself.
  assert distributed.settings(config, {}, pci) == distributed.Settings(
      None, None, None, 'Cloud TPU')


def test_no_pci_bus_or_unreadable_ids_is_no_tpu(tmp_path):
  assert not distributed.tpu_present(str(tmp_path / 'absent'))
  pci = _sysfs(tmp_path / 'pci', (_GOOGLE, _TPU_V5E))
  os.remove(os.path.join(pci, '0000:00:04.0', 'device'))
  assert not distributed.tpu_present(pci)
