"""Test set-up and the helpers every test module shares.

Four fake CPU devices, set before JAX starts its backend, let one process
check the one-device, two-device (one tower each) and four-device (two
replicas of a tower pair) layouts side by side. A persistent compilation
cache lets the many short training runs (and the `main.py` subprocesses,
which inherit the environment) compile each step once per session.
"""

import os
import shutil
import tempfile

import pytest

from alexnet import backend  # Imports JAX, but starts no backend.
from configs import alexnet as configs  # Plain Python: does not import JAX.

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=4')
# LLVM's optimisation of the CPU code costs the suite's many small programs,
# each compiled once and run a few steps, more than it saves: without it
# the suite needs about a third less CPU time. The programs (XLA's
# optimised HLO) are the same; name another level in XLA_FLAGS to test the
# code at it, e.g. XLA_FLAGS=--xla_backend_optimization_level=3.
if '--xla_backend_optimization_level' not in os.environ['XLA_FLAGS']:
  os.environ['XLA_FLAGS'] += ' --xla_backend_optimization_level=0'
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# The CPU convolutions that training uses (main.py sets them the same way).
backend.set_cpu_flags()
# The tests run on the CPU. libtpu (installed for --mode=compile) would
# otherwise be tried first, with warnings, where there is no TPU.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Made by the first process that reads this file (pytest, or its xdist
# controller, whose workers inherit it), which removes it at the end.
_OWN_CACHE = 'JAX_COMPILATION_CACHE_DIR' not in os.environ
if _OWN_CACHE:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(
      prefix='alexnet-jax-cache-')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')


def pytest_unconfigure(config):
  del config
  if _OWN_CACHE:
    shutil.rmtree(os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)


_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='session')
def repo() -> str:
  """The repository's root directory."""
  return _REPO


@pytest.fixture(scope='session')
def testdata(repo) -> str:
  """tests/testdata: metadata for TFDS's mock data (see its README.md)."""
  return os.path.join(repo, 'tests', 'testdata')


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory) -> str:
  """One TFDS data directory per module: the offline digits are prepared
  there once, on first use, and shared by the module's runs."""
  return str(tmp_path_factory.mktemp('data'))


@pytest.fixture(scope='module')
def tiny(data_dir):
  """tiny(**overrides): the few-second config variant reading `data_dir`."""
  def make(**overrides):
    config = configs.get_config('tiny')
    config.data_dir = data_dir
    config.update(overrides)
    return config
  return make
