"""--mode=compile: the real steps compiled for a TPU slice, with no TPU.

libtpu, the TPU compiler, comes with requirements-test.txt, and the
compile-only devices of `jax.experimental.topologies` need no TPU, so these
tests run wherever the suite does.
"""

import functools
import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from alexnet import compile_only
from alexnet import flops
from alexnet import roofline
from alexnet import steps
from alexnet import tpu

# What libtpu prints when it starts without a TPU VM's metadata, and what
# JAX prints when the CUDA plugin fails to start without a GPU.
LIBTPU_WARNINGS = ('TPU_ACCELERATOR_TYPE', 'TPU_WORKER_HOSTNAMES',
                   'libtpu', 'InitGoogle', 'plugin configuration error',
                   'Traceback')


def _forward_flops_on_cpu(config, num_classes: int, images: int) -> float:
  """XLA:CPU's FLOP count of the whole two-tower net on `images` views.

  The config's conv_impl must be 'xla' (XLA counts the CPU's patch matmuls
  differently).
  """
  model = steps.create_model(config, num_classes)
  params = jax.eval_shape(functools.partial(steps.initial_tree, config,
                                            model))['params']
  views = jax.ShapeDtypeStruct(
      (images, config.image_size, config.image_size, 3), jnp.float32)
  forward = jax.jit(lambda p, x: model.apply({'params': p}, x, train=False))
  return forward.lower(params, views).compile().cost_analysis()['flops']


def test_tiny_steps_compile_for_v5e_2x2_one_tower_per_chip(tiny, capfd):
  config = tiny()
  target = tpu.target('v5e:2x2')
  lowered = compile_only.lower_steps(config, target)
  report = compile_only.compile_lowered(lowered, target)
  assert not [line for line in capfd.readouterr().err.splitlines()
              if any(mark in line for mark in LIBTPU_WARNINGS)]
  # What libtpu was told is not left for distributed.detect_cluster to
  # take for a Cloud TPU cluster.
  assert 'TPU_WORKER_HOSTNAMES' not in os.environ

  layout = report.layout
  assert {d.device_kind for d in layout.devices} == {'TPU v5 lite'}
  assert (layout.num_devices, layout.towers_per_device,
          layout.num_replicas) == (4, 1, 2)
  assert report.config.conv_impl == 'xla'  # 'auto' as on a TPU backend.
  # Each chip holds one tower: half of every [2, ...] parameter, float32,
  # and the momentum of the same shapes.
  host = jax.eval_shape(functools.partial(
      steps.initial_tree, config, steps.create_model(config, 10)))
  total = sum(leaf.size * 4 for leaf in jax.tree.leaves(host['params']))
  assert report.num_classes == 10
  assert 2 * report.param_bytes == total
  assert report.optimizer_bytes == report.param_bytes
  assert report.train.argument_bytes >= 2 * report.param_bytes
  # Per chip, an evaluation batch is half the net (one tower) on the
  # replica's 8 images x 10 crops: the TPU compiler's count matches
  # XLA:CPU's count of the whole net on those 80 views, halved.
  oracle = _forward_flops_on_cpu(report.config, 10, images=8 * 10) / 2
  assert report.eval.flops == pytest.approx(oracle, rel=0.05)
  assert report.flops_source == "XLA's cost analysis"
  # The GPU roofline's own count (XLA:GPU counts nothing) of the same
  # lowered steps: their convolutions and matmuls, 85% of libtpu's count
  # of the tiny net's train step (narrow layers: relatively more
  # elementwise work), 98.8% of the paper config's (docs/GPU.md).
  for step, cost in ((lowered.steps['train'], report.train),
                     (lowered.steps['eval'], report.eval)):
    assert 0.8 * cost.flops < flops.count(step.lowered) <= cost.flops
  assert 0 < report.train.total_bytes < roofline.CHIPS['v5e'].memory_bytes
  lines = report.lines()
  assert lines[0].startswith('Compiled for v5e:2x2: 4 x TPU v5e, by libtpu')
  assert '2 replicas, one tower per chip' in lines[0]
  seconds = report.train.seconds(roofline.CHIPS['v5e'], 'float32')
  assert seconds >= report.train.flops / 197e12 > 0


def test_a_step_too_big_for_the_chip_is_refused_with_the_batch_to_use(tiny):
  # 2**20 uint8 crops per replica are 14 GB before they are made float.
  with pytest.raises(tpu.TopologyError) as refusal:
    compile_only.compile_steps(tiny(batch_size=2**21), tpu.target('v5e:2x2'))
  message = str(refusal.value)
  assert 'train step does not fit' in message
  assert '--config.batch_size=1048576' in message
  assert '--config.dtype=bfloat16' in message


def test_topology_names_and_a_missing_libtpu_are_refused(monkeypatch):
  assert tpu.parse_topology('v5e:2x4') == ('v5e', (2, 4, 1))
  assert tpu.parse_topology('v4:2x2x2') == ('v4', (2, 2, 2))
  for name in ('v9:2x2', 'v5e', 'v5e:2', ''):
    with pytest.raises(tpu.TopologyError, match=r"v4', 'v5e', 'v5p', 'v6e'"):
      tpu.parse_topology(name)
  monkeypatch.setattr(importlib.util, 'find_spec', lambda name: None)
  with pytest.raises(tpu.TopologyError,
                     match=r"pip install 'jax\[tpu\]==0\.10\.2'"):
    tpu.require_libtpu()


def test_main_starts_quietly_on_the_cpu_and_refuses_in_one_line(repo,
                                                               data_dir):
  # Without JAX_PLATFORMS, as a user runs it (this machine has no TPU).
  env = {k: v for k, v in os.environ.items() if k != 'JAX_PLATFORMS'}
  # JAX alone would try libtpu and the CUDA plugin first and print their
  # warnings and a traceback; main.py's start-up rule keeps JAX on the CPU
  # instead.
  start = subprocess.run(
      [sys.executable, '-c', 'from alexnet import backend; import jax; '
       'print(backend.start(), jax.default_backend())'],
      cwd=repo, env=env, capture_output=True, text=True, timeout=300)
  assert start.stdout.split() == ['cpu', 'cpu']
  # libtpu, describing the slice, prints nothing either; a config the
  # slice cannot run is refused in one line.
  run = subprocess.run(
      [sys.executable, 'main.py', '--config=configs/alexnet.py:tiny',
       f'--config.data_dir={data_dir}', '--mode=compile',
       '--topology=v5e:2x2', '--config.batch_size=7'],
      cwd=repo, env=env, capture_output=True, text=True, timeout=300)
  assert run.returncode == 1
  lines = run.stderr.strip().splitlines()
  assert lines[-1] == ('error: config.batch_size=7 must be divisible by the 2 '
                       'data-parallel replicas; e.g. --config.batch_size=6.')
  assert not [line for line in start.stderr.splitlines() + lines
              if any(mark in line for mark in LIBTPU_WARNINGS)]
