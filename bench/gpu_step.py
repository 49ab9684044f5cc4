"""Images/s of the real train and eval steps, against the compile report's bound.

Times `steps.map_train_step` and `steps.map_eval_step`, exactly as training
and evaluation run them, on synthetic uint8 batches (random crops with their
offsets, flips and lighting shifts; random 256x256 squares, 10 views each)
laid out on the local devices, after compilation and warm-up, every step
blocked on. Then compiles the same steps as `main.py --mode=compile` does for
these devices and prints the measured rate as a fraction of the roofline
bound that report gives (alexnet/roofline.py): the published peak of the
GPU found (or named with --gpu), TF32 for float32, bf16 for bfloat16.

  python bench/gpu_step.py                        # paper config, all GPUs
  python bench/gpu_step.py --dtype=bfloat16 --devices=1
  python bench/gpu_step.py --variant=tiny --allow_cpu --gpu=h100  # on a CPU

Without a GPU it refuses unless --allow_cpu: the figures of a CPU then
only show that the script runs (the bound is the named GPU's).

Prints one line per step:
  train  batch 128  1 x NVIDIA H100 80GB HBM3  float32  N images/s
      (bound M images/s: K% of it)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from alexnet import backend  # pylint: disable=g-import-not-at-top
from alexnet import compile_only  # pylint: disable=g-import-not-at-top
from alexnet import gpu  # pylint: disable=g-import-not-at-top
from alexnet import parallel  # pylint: disable=g-import-not-at-top
from alexnet import steps  # pylint: disable=g-import-not-at-top
from bench import train_step  # pylint: disable=g-import-not-at-top
from configs import alexnet as configs  # pylint: disable=g-import-not-at-top


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--variant', default='',
                      help="configs/alexnet.py's variant; default: the paper")
  parser.add_argument('--dtype', choices=('float32', 'bfloat16'),
                      default='float32')
  parser.add_argument('--devices', type=int, default=0,
                      help='devices to use (default: all local ones)')
  parser.add_argument('--steps', type=int, default=20, help='timed steps')
  parser.add_argument('--warmup', type=int, default=2,
                      help='untimed steps after compilation')
  parser.add_argument('--gpu', choices=list(gpu.GPUS), default=None,
                      help='whose published figures bound the rate (default: '
                      'the GPU found)')
  parser.add_argument('--allow_cpu', action='store_true',
                      help='run on the CPU where there is no GPU')
  return parser.parse_args(argv)


def _eval_batch(layout: parallel.Layout, config, num_classes: int,
                rng: np.random.Generator) -> dict[str, np.ndarray]:
  """What evaluation feeds `map_eval_step`: uint8 squares, labels, mask."""
  lead = (layout.num_local_replicas,
          config.eval_batch_size // layout.num_replicas)
  side = config.resize_size
  return {'image': rng.integers(0, 256, (*lead, side, side, 3), np.uint8),
          'label': rng.integers(0, num_classes, lead, dtype=np.int32),
          'mask': np.ones(lead, bool)}


def _seconds_per_step(run, num_steps: int, warmup: int) -> float:
  for _ in range(warmup + 1):  # The first call compiles.
    jax.block_until_ready(run())
  start = time.perf_counter()
  for _ in range(num_steps):
    jax.block_until_ready(run())
  return (time.perf_counter() - start) / num_steps


def measure(config, layout: parallel.Layout, num_classes: int, num_steps: int,
            warmup: int) -> dict[str, float]:
  """Images/s of the mapped train and eval steps on synthetic batches."""
  bench = train_step.Bench(layout, config, num_classes)
  rates = {'train': bench.time_train(num_steps, warmup)}
  evaluate = steps.map_eval_step(bench.net, layout, config)
  batch = layout.shard_batch(_eval_batch(layout, config, num_classes,
                                         np.random.default_rng(1)))
  seconds = _seconds_per_step(
      lambda: evaluate(bench.towers['params'], batch, bench.mean_image),
      num_steps, warmup)
  rates['eval'] = config.eval_batch_size / seconds
  return rates


def bounds(config, layout: parallel.Layout, kind: str) -> dict[str, float]:
  """The images/s bounds of `main.py --mode=compile` for these devices."""
  device = gpu.GPUS[kind].accelerator()
  target = compile_only.Target(f'{kind}:{layout.num_devices}',
                               layout.devices, device, 'this host')
  report = compile_only.compile_steps(config, target)
  return {name: cost.images / cost.seconds(device, config.dtype)
          for name, cost in (('train', report.train), ('eval', report.eval))}


def main() -> None:
  args = _parse_args(None)
  try:
    backend.start()
    backend.check_started()
  except backend.GpuError as error:
    raise SystemExit(f'error: {error}') from None
  devices = jax.local_devices()
  if devices[0].platform != 'gpu' and not args.allow_cpu:
    raise SystemExit(f'error: no GPU here (JAX runs on {devices[0].platform})'
                     '; --allow_cpu runs the script on it anyway.')
  kind = args.gpu or gpu.kind_of(devices[0].device_kind)
  if kind is None:
    raise SystemExit(f'error: no published figures for '
                     f'{devices[0].device_kind}: name a GPU with --gpu.')
  config = configs.get_config(args.variant or None)
  config.dtype = args.dtype
  num_classes = train_step.NUM_CLASSES[config.dataset]
  devices = devices[:args.devices or len(devices)]
  layout = parallel.Layout.create(config.model_parallel, tuple(devices))
  rates = measure(config, layout, num_classes, args.steps, args.warmup)
  limits = bounds(config, layout, kind)
  for name, field in (('train', 'batch_size'), ('eval', 'eval_batch_size')):
    print(f'{name:5s}  batch {config[field]}  '
          f'{backend.describe_devices(devices)}  {config.dtype}  '
          f'{rates[name]:,.0f} images/s  (bound {limits[name]:,.0f} '
          f'images/s of {gpu.GPUS[kind].name}: '
          f'{100 * rates[name] / limits[name]:.1f}% of it)')


if __name__ == '__main__':
  main()
