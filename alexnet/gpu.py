"""The compile-only devices of an NVIDIA GPU host, with no GPU.

    python main.py --config=configs/alexnet.py --mode=compile --topology=h100:8

JAX's CUDA plugin (jax-cuda12-plugin, in requirements-gpu.txt and
requirements-test.txt) holds XLA:GPU, which compiles with no GPU and no
driver for a GPU described by a `GpuTargetConfigProto`: the project's files
in alexnet/gpu_targets/, one per GPU, with the source of every number.
alexnet/compile_only.py compiles the steps for these devices; docs/GPU.md
has the measured reports.
"""

import dataclasses
import importlib.metadata
import os
import re

import jax
from jax.experimental import topologies

from alexnet import backend
from alexnet import compile_only
from alexnet import roofline

TopologyError = compile_only.TopologyError

_TARGETS_DIR = os.path.join(os.path.dirname(__file__), 'gpu_targets')
# HGX and DGX boards, the hosts these GPUs come in, hold 8.
MAX_GPUS_PER_HOST = 8
CUDA_PLUGIN = f'jax-cuda12-plugin=={jax.__version__}'


@dataclasses.dataclass(frozen=True)
class Gpu:
  """One GPU: its target file and its published dense peaks.

  Attributes:
    name: e.g. 'NVIDIA H100 SXM5 80GB'.
    target_file: its `GpuTargetConfigProto` in alexnet/gpu_targets/, which
      also gives the roofline its memory size and bandwidth.
    tf32_flops: dense TF32 tensor-core peak, FLOP/s. float32 convolutions
      and matmuls run there at JAX's default precision (XLA:GPU allows TF32
      on Ampere and later), so it bounds float32 steps.
    bf16_flops: dense bfloat16 tensor-core peak, FLOP/s.
    fp32_flops: the FP32 (non-tensor) peak, FLOP/s: what float32 gets with
      jax_default_matmul_precision='highest'; printed for reference.
  """

  name: str
  target_file: str
  tf32_flops: float
  bf16_flops: float
  fp32_flops: float

  def target_config(self) -> str:
    with open(os.path.join(_TARGETS_DIR, self.target_file)) as f:
      return f.read()

  def accelerator(self) -> roofline.Accelerator:
    """Its roofline figures; memory and bandwidth read from its file."""
    text = self.target_config()
    def field(name):
      return float(re.search(rf'^\s*{name}: (\d+)', text, re.M)[1])
    tf32 = ('TF32 tensor cores, dense; FP32 cores: '
            f'{self.fp32_flops / 1e12:.1f}')
    return roofline.Accelerator(
        self.name, 'GPU', field('device_memory_size'),
        field('memory_bandwidth'),
        {'float32': roofline.Peak(self.tf32_flops, tf32),
         'bfloat16': roofline.Peak(self.bf16_flops,
                                   'bf16 tensor cores, dense')})


# The peaks of NVIDIA's data sheets (H100 Tensor Core GPU, SXM5 column; A100
# Tensor Core GPU, SXM columns), which give the tensor-core figures with
# 2:4 sparsity: dense is half.
GPUS = {
    'h100': Gpu('NVIDIA H100 SXM5 80GB', 'h100_sxm5_80gb.textproto',
                tf32_flops=989e12 / 2, bf16_flops=1979e12 / 2,
                fp32_flops=67e12),
    'a100': Gpu('NVIDIA A100 SXM4 80GB', 'a100_sxm4_80gb.textproto',
                tf32_flops=312e12 / 2, bf16_flops=624e12 / 2,
                fp32_flops=19.5e12),
    'a100-40gb': Gpu('NVIDIA A100 SXM4 40GB', 'a100_sxm4_40gb.textproto',
                     tf32_flops=312e12 / 2, bf16_flops=624e12 / 2,
                     fp32_flops=19.5e12),
}


def parse_topology(name: str) -> tuple[str, int]:
  """'h100:8' -> ('h100', 8).

  Raises:
    TopologyError: not GPU:COUNT, GPU in `GPUS`, COUNT in 1..8.
  """
  kind, _, count = (name or '').partition(':')
  if (kind not in GPUS or not count.isdigit()
      or not 1 <= int(count) <= MAX_GPUS_PER_HOST):
    raise TopologyError(
        f'--topology={name!r} is not a GPU host this code knows: give '
        f'GPU:COUNT, GPU one of {list(GPUS)}, COUNT from 1 to '
        f'{MAX_GPUS_PER_HOST}, e.g. --topology=h100:8.')
  return kind, int(count)


def require_cuda_plugin() -> None:
  """Refuses to go on without XLA:GPU, naming the install."""
  if not backend.cuda_plugin_installed():
    raise TopologyError(
        '--mode=compile for GPUs needs JAX\'s CUDA plugin, the GPU '
        f'compiler, which is not installed: pip install {CUDA_PLUGIN} (or '
        'install requirements-gpu.txt or requirements-test.txt).')


def target(name: str) -> compile_only.Target:
  """COUNT compile-only GPUs of one host, e.g. name 'h100:8', to compile for.

  Raises:
    TopologyError: unknown name or no CUDA plugin.
  """
  kind, count = parse_topology(name)
  require_cuda_plugin()
  gpu = GPUS[kind]
  # Slices x hosts x GPUs per host: all on one host, as the layout expects.
  topology = topologies.get_topology_desc(
      platform='cuda', target_config=gpu.target_config(),
      topology=f'1x1x{count}')
  return compile_only.Target(
      name, tuple(topology.devices), gpu.accelerator(),
      f'XLA:GPU of jax-cuda12-pjrt '
      f'{importlib.metadata.version("jax-cuda12-pjrt")}')


def kind_of(device_kind: str) -> str | None:
  """The `GPUS` key of a real GPU, by the name it gives JAX, or None."""
  for kind, known in GPUS.items():
    if f'device_description_str: "{device_kind}"' in known.target_config():
      return kind
  return None
