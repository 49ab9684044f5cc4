"""XLA's CPU options that `backend.start` sets before JAX starts: XLA's own
(Eigen) convolutions instead of YNNPACK's, which this jaxlib uses by default.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp

from alexnet import backend
from alexnet import cpu_ops

_OPTION = '--xla_cpu_experimental_ynn_fusion_type'


def _conv_hlo() -> str:
  """The optimised CPU program of a 3x3 convolution and its gradients."""
  conv = lambda x, k: cpu_ops.xla_conv(x, k, 1, ((1, 1), (1, 1)))

  def forward_and_gradients(x, k, g):
    y, vjp = jax.vjp(conv, x, k)
    return y, vjp(g)

  x, k = jnp.ones((8, 13, 13, 64)), jnp.ones((3, 3, 64, 64))
  return jax.jit(forward_and_gradients).lower(
      x, k, jnp.ones((8, 13, 13, 64))).compile().as_text()


def test_the_flags_are_added_once_and_a_users_own_option_wins():
  environ = {'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}
  backend.set_cpu_flags(environ)
  backend.set_cpu_flags(environ)
  assert environ['XLA_FLAGS'].split() == [
      '--xla_force_host_platform_device_count=2', *backend.CPU_XLA_FLAGS]
  assert backend.set_cpu_flags({}) == ' '.join(backend.CPU_XLA_FLAGS)
  mine = {'XLA_FLAGS': f'{_OPTION}=individual_convolution'}
  assert backend.set_cpu_flags(mine) == f'{_OPTION}=individual_convolution'


def test_the_tests_run_xlas_own_convolutions():
  # conftest.py sets the flags as main.py does: the tests check the
  # convolutions that training runs. Without them each of the three
  # convolutions here would be a YNNPACK fusion.
  hlo = _conv_hlo()
  assert hlo.count('convolution(') == 3
  assert '__ynn_fusion' not in hlo


def test_start_sets_them_before_jax_starts_and_yields_to_the_user(repo):
  script = ('from alexnet import backend; backend.start(); '
            'from tests import test_cpu_flags as t; '
            'print(t._conv_hlo().count("__ynn_fusion"))')
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}

  def ynn_fusions(**extra):
    run = subprocess.run([sys.executable, '-c', script], cwd=repo,
                         env={**env, **extra}, capture_output=True,
                         text=True, timeout=300, check=True)
    return int(run.stdout.split()[-1])

  assert ynn_fusions() == 0
  # A user who wants YNNPACK's convolutions back names the option.
  assert ynn_fusions(XLA_FLAGS=f'{_OPTION}=individual_convolution') == 3
