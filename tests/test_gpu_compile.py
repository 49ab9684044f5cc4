"""--mode=compile for NVIDIA GPUs: the real steps compiled with no GPU.

XLA:GPU comes with JAX's CUDA plugin (jax-cuda12-plugin, in
requirements-test.txt), which compiles for a GPU described by a target file
(alexnet/gpu_targets/) with no GPU and no driver, so these tests run
wherever the suite does.
"""

import functools
import importlib.metadata
import re
import sys

import jax
import jax.numpy as jnp
import pytest

from alexnet import compile_only
from alexnet import flops
from alexnet import gpu
from alexnet import steps
import main


@pytest.mark.parametrize('topology, replicas', [('h100:2', 1), ('h100:4', 2)])
def test_tiny_steps_compile_for_h100s_one_tower_per_gpu(tiny, topology,
                                                        replicas):
  config = tiny()
  target = gpu.target(topology)
  lowered = compile_only.lower_steps(config, target)
  report = compile_only.compile_lowered(lowered, target)

  layout = report.layout
  assert {d.device_kind for d in layout.devices} == {'NVIDIA H100 80GB HBM3'}
  assert (layout.towers_per_device, layout.num_replicas) == (1, replicas)
  assert report.config.conv_impl == 'xla'  # 'auto' as on a GPU backend.
  # Each GPU holds one tower: half of every [2, ...] parameter, float32.
  host = jax.eval_shape(functools.partial(
      steps.initial_tree, config, steps.create_model(config, 10)))
  total = sum(leaf.size * 4 for leaf in jax.tree.leaves(host['params']))
  assert 2 * report.param_bytes == total
  assert report.optimizer_bytes == report.param_bytes
  assert 0 < report.train.total_bytes < 80e9
  assert report.train.flops > 0 and report.eval.flops > 0
  assert 'alexnet/flops.py' in report.flops_source  # XLA:GPU counts none.

  # The program a GPU would run (the compile above, cached): cuDNN's
  # convolutions, 14 of them: the 5 layers forward (their bias and ReLU
  # fused), their 5 kernel gradients and the input gradients of conv2-5;
  # and the all-gathers of the tower exchange (conv3, fc6, fc7, fc8 and
  # the logits), each over the two GPUs of a pair.
  hlo = lowered.steps['train'].lowered.compile().as_text()
  cudnn = re.findall(r'custom_call_target="__cudnn\$conv(\w*)"', hlo)
  assert len(cudnn) == 14
  assert cudnn.count('BiasActivationForward') == 5
  assert 'BackwardFilter' in cudnn and 'BackwardInput' in cudnn
  gathers = re.findall(r'all-gather-start\(.*?replica_groups=(\{\{.*?\}\})',
                       hlo)
  assert len(gathers) >= 4
  pairs = '{{0,1}}' if replicas == 1 else '{{0,1},{2,3}}'
  assert set(gathers) == {pairs}, gathers
  # Two replicas average their gradients over the GPUs of the same tower.
  assert ('all-reduce' in hlo) == (replicas > 1)


def test_the_flop_count_equals_xla_cpus_for_convolutions_and_matmuls():
  # Strides, padding, both dilations; the gradients add the convolutions
  # JAX's transpose rules emit (batch-grouped, with padding and dilation).
  images, kernel = jnp.ones((4, 9, 11, 3)), jnp.ones((3, 3, 3, 8))
  weights = jnp.ones((17 * 6 * 8, 5))

  def net(images, kernel, weights):
    features = jax.lax.conv_general_dilated(
        images, kernel, (1, 2), ((2, 0), (1, 3)), lhs_dilation=(2, 1),
        rhs_dilation=(1, 2), dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return features.reshape(4, -1) @ weights

  for fn in (net, jax.grad(lambda *a: net(*a).sum(), argnums=(0, 1, 2))):
    lowered = jax.jit(fn).lower(images, kernel, weights)
    assert flops.count(lowered) == lowered.compile().cost_analysis()['flops']


def test_gpu_names_a_missing_plugin_and_a_step_too_big_are_refused(
    tiny, monkeypatch):
  assert gpu.parse_topology('a100-40gb:8') == ('a100-40gb', 8)
  # main.py's --topology names either: refused, it lists both.
  with pytest.raises(compile_only.TopologyError,
                     match=r"'v6e'\] \(e.g. v5e:2x2\), or .* GPU one of "
                     r"\['h100', 'a100', 'a100-40gb'\]"):
    main._compile_target('h200:8')
  for name in ('h200:8', 'h100', 'h100:0', 'h100:9', 'h100:x'):
    with pytest.raises(gpu.TopologyError,
                       match=r"'h100', 'a100', 'a100-40gb'"):
      gpu.parse_topology(name)
  # 2**21 uint8 crops per replica are 28 GB before they are made float.
  with pytest.raises(gpu.TopologyError) as refusal:
    compile_only.compile_steps(tiny(batch_size=2**21),
                               gpu.target('a100-40gb:2'))
  message = str(refusal.value)
  assert 'train step does not fit in the memory of one NVIDIA A100' in message
  assert '--config.batch_size=1048576 or --config.dtype=bfloat16' in message
  # As on a CPU-only install: no plugin, not even their namespace package,
  # and no entry point naming one.
  monkeypatch.delitem(sys.modules, 'jax_plugins.xla_cuda12')
  monkeypatch.setitem(sys.modules, 'jax_plugins', None)
  monkeypatch.setattr(importlib.metadata, 'entry_points', lambda **_: [])
  with pytest.raises(gpu.TopologyError,
                     match=r'pip install jax-cuda12-plugin==0\.10\.2'):
    gpu.target('h100:8')
