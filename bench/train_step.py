"""Images/s of one AlexNet training step and one eval step, JAX vs PyTorch.

A training step is `steps.map_train_step`, the step exactly as training
maps it: uint8 crops in, mean image and lighting shift applied on the device,
then `steps.train_step` (forward with dropout, softmax cross-entropy,
backward and the paper's update from `steps.make_optimizer`) under one
`pmap` (both towers on one device with --devices=1, one tower per device
with --devices=2), on the paper config's model. Eval is the forward pass of
one float crop alone (the PyTorch peer's eval).
Compile time and warm-up steps are excluded and every timed step is blocked
on, so the figures are steady-state throughput.

When torch is importable, `bench/peer_torch.py` measures the same grouped net
in the same process, eager and under `torch.compile` (its compiling is
warm-up, untimed), and the JAX/eager and JAX/compile ratios are printed: the
machine is shared and noisy, so only ratios taken side by side mean
anything. Without a C++ compiler the compile column is skipped with a line
saying so.

  python bench/train_step.py                       # batch 128, float32
  python bench/train_step.py --variant=fashion_mnist  # 67x67, 10 classes
  python bench/train_step.py --devices=2           # tower-parallel layout
  python bench/train_step.py --per_layer           # per-layer fwd+bwd table
  python bench/train_step.py --per_layer --layers=conv1,pool1 --skip_step
  python bench/train_step.py --kernels --skip_step  # cpu_ops vs stock JAX

On CPU, --devices=N fakes N host devices (XLA_FLAGS is set before JAX is
imported); on GPUs the same command uses the first N real devices.

XLA's CPU options are main.py's (`backend.start` sets
`backend.CPU_XLA_FLAGS`); an option named in XLA_FLAGS wins, e.g.
  XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=individual_convolution
runs the convolutions through YNNPACK, this jaxlib's default (compare with
--per_layer or --kernels).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

# Runnable as `python bench/train_step.py` from the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
  # argparse, not absl: peer_torch shares the process (see its main()).
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--variant', default='',
                      help="configs/alexnet.py's variant, e.g. fashion_mnist "
                      '(its image size, classes and batch); default: the '
                      'paper')
  parser.add_argument('--batch_size', type=int, default=0,
                      help='images per step, over all replicas; default: '
                      "the config's")
  parser.add_argument('--steps', type=int, default=3, help='timed steps')
  parser.add_argument('--rounds', type=int, default=3,
                      help='alternating JAX / PyTorch measurements')
  parser.add_argument('--warmup', type=int, default=1,
                      help='untimed steps after compilation')
  parser.add_argument('--dtype', choices=('float32', 'bfloat16'),
                      default='float32', help='JAX compute dtype')
  parser.add_argument('--conv_impl', choices=('auto', 'xla', 'patches'),
                      default='auto', help='config.conv_impl')
  parser.add_argument('--devices', type=int, default=1,
                      help='devices of the layout (fake host devices on CPU)')
  parser.add_argument('--per_layer', action='store_true',
                      help='also time forward+backward of each layer alone')
  parser.add_argument('--layers', default='',
                      help='comma-separated subset of the per-layer table')
  parser.add_argument('--kernels', action='store_true',
                      help='time alexnet.cpu_ops against stock JAX')
  parser.add_argument('--skip_step', action='store_true',
                      help='skip the whole-step figures (per-layer only)')
  parser.add_argument('--no_torch', action='store_true',
                      help='do not run the PyTorch peer')
  return parser.parse_args(argv)


ARGS = _parse_args(None if __name__ == '__main__' else [])
if ARGS.devices > 1:
  # Must precede the JAX import; ignored by GPU backends, which have their own.
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             f' --xla_force_host_platform_device_count='
                             f'{ARGS.devices}')

# pylint: disable-next=g-import-not-at-top
from bench import peer_torch  # Imports no torch: see import_before_jax.
# Only as a script: an importer (the tests) gets no torch, whose CUDA build
# (PyPI's) crashes in triton's loader when imported after JAX in a process
# that has loaded much else.
if __name__ == '__main__' and not ARGS.no_torch and peer_torch.available():
  peer_torch.import_before_jax()

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import ml_collections  # pylint: disable=g-import-not-at-top

from alexnet import parallel  # pylint: disable=g-import-not-at-top
from alexnet import steps  # pylint: disable=g-import-not-at-top
from alexnet import backend  # pylint: disable=g-import-not-at-top
from bench import per_layer  # pylint: disable=g-import-not-at-top
from configs import alexnet as configs  # pylint: disable=g-import-not-at-top

# Classes of the datasets the config variants read.
NUM_CLASSES = {'imagenet2012': 1000, 'digits': 10, 'fashion_mnist': 10}


def bench_config(args: argparse.Namespace) -> ml_collections.ConfigDict:
  """The variant's recipe (the paper's by default) with the bench's dtype,
  convolutions and batch size."""
  config = configs.get_config(args.variant or None)
  config.dtype = args.dtype
  config.conv_impl = args.conv_impl
  if args.batch_size:
    config.batch_size = args.batch_size
  return config


def _time_steps(step: Callable[[], object], num_steps: int,
                warmup: int) -> float:
  """Seconds per step, mean over `num_steps` blocked steps after warm-up."""
  for _ in range(warmup):
    jax.block_until_ready(step())
  total = 0.0
  for _ in range(num_steps):
    start = time.perf_counter()
    jax.block_until_ready(step())
    total += time.perf_counter() - start
  return total / num_steps


def wire_batch(layout: parallel.Layout, batch_size: int,
               config: ml_collections.ConfigDict, num_classes: int,
               rng: np.random.Generator) -> dict[str, np.ndarray]:
  """A random batch in the input pipeline's uint8 form, per local replica.

  Args:
    layout: the device layout.
    batch_size: images per step over all replicas.
    config: uses image_size and resize_size.
    num_classes: labels are below it.
    rng: the source of the pixels, crop offsets, flips and lighting shifts.

  Returns:
    What `input_pipeline.create_train_iterator` yields: uint8 crops with
    their offsets, flips and shifts, and labels, [R, b, ...].
  """
  if batch_size % layout.num_replicas:
    raise ValueError(f'--batch_size={batch_size} must divide over '
                     f'{layout.num_replicas} replicas')
  lead = (layout.num_local_replicas, batch_size // layout.num_replicas)
  size, room = config.image_size, config.resize_size - config.image_size
  return {
      'image': rng.integers(0, 256, (*lead, size, size, 3), dtype=np.uint8),
      'offset': rng.integers(0, room + 1, (*lead, 2), dtype=np.int32),
      'flip': rng.random(lead) < 0.5,
      'shift': (10 * rng.standard_normal((*lead, 3))).astype(np.float32),
      'label': rng.integers(0, num_classes, lead, dtype=np.int32)}


class Bench:
  """The model, its towers and a fixed batch laid out on the devices."""

  def __init__(self, layout: parallel.Layout,
               config: ml_collections.ConfigDict, num_classes: int):
    self.layout, self.config = layout, config
    self.net = steps.create_model(config, num_classes, layout.exchange)
    state = steps.create_train_state(
        config, steps.create_model(config, num_classes))
    self.towers = layout.shard_towers(
        {'params': state.params, 'opt_state': state.opt_state})
    rng = np.random.default_rng(0)
    batch = wire_batch(layout, config.batch_size, config, num_classes, rng)
    self.batch = layout.shard_batch(batch)
    # For the forward pass: mean-subtracted-scale float images.
    self.images = layout.shard_batch(
        batch['image'].astype(np.float32) - 128.0)
    self.mean_image = layout.replicate(np.full(
        (config.resize_size, config.resize_size, 3), 128.0, np.float32))

  def train_step_fn(self):
    """`steps.map_train_step`: the step exactly as training maps it."""
    return steps.map_train_step(self.net, self.layout, self.config)

  def time_train(self, num_steps: int, warmup: int) -> float:
    """Images/s of the training step (compiled on the first call)."""
    if not hasattr(self, '_train_step'):
      self._train_step = self.train_step_fn()
    learning_rate = jnp.float32(self.config.learning_rate)
    state = {'towers': self.towers, 'step': 0}

    def run():
      state['towers'], metrics = self._train_step(
          state['towers'], self.batch, self.mean_image, learning_rate,
          jnp.int32(state['step']))
      state['step'] += 1
      return metrics

    jax.block_until_ready(run())  # Compiles on the first call.
    seconds = _time_steps(run, num_steps, warmup)
    self.towers = state['towers']
    return self._images_per_step / seconds

  def time_eval(self, num_steps: int, warmup: int) -> float:
    """Images/s of the forward pass of one crop (dropout off)."""
    if not hasattr(self, '_forward'):
      net = self.net
      self._forward = self.layout.pmap(
          lambda p, x: net.apply({'params': p}, x, train=False))
    run = lambda: self._forward(self.towers['params'], self.images)
    jax.block_until_ready(run())
    return self._images_per_step / _time_steps(run, num_steps, warmup)

  @property
  def _images_per_step(self) -> int:
    return self.images.shape[1] * self.layout.num_replicas


def sgemm_gflops(size: int = 2048, repeats: int = 3) -> float:
  """GFLOP/s of JAX's float32 matmul of two size x size matrices, the best
  of `repeats`: the bound a step of matmuls and convolutions can reach."""
  a = jnp.ones((size, size), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  jax.block_until_ready(matmul(a, a))
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(matmul(a, a))
    best = min(best, time.perf_counter() - start)
  return 2 * size**3 / best / 1e9


def summarise(figures: dict[str, list[float]],
              base: str = 'JAX') -> dict[str, tuple[float, float | None]]:
  """Medians of each contender's images/s and of `base`'s ratios to it.

  A ratio is taken within each round, then the median over rounds: load on
  the shared machine drifts over minutes, and a round's contenders run back
  to back, so a round's ratio sees the same load on both sides.

  Args:
    figures: images/s per round of each contender, rounds in the same order;
      `base` among them.
    base: the contender in the ratios' numerator.

  Returns:
    {name: (median images/s, median of per-round base / name, None for
    `base` itself)}, in the order of `figures`.
  """
  summary = {}
  for name, values in figures.items():
    ratios = [b / v for b, v in zip(figures[base], values, strict=True)]
    summary[name] = (float(np.median(values)),
                     None if name == base else float(np.median(ratios)))
  return summary


def _peers(config: ml_collections.ConfigDict, num_classes: int,
           torch_ok: bool) -> dict[str, peer_torch.Peer]:
  """The PyTorch contenders: eager and torch.compile, if torch imports."""
  if not torch_ok:
    return {}
  net = dict(image_size=config.image_size, num_classes=num_classes)
  return {'eager': peer_torch.Peer(config.batch_size, **net),
          'compile': peer_torch.Peer(config.batch_size, compiled=True, **net)}


def run_step_bench(args, layout: parallel.Layout,
                   config: ml_collections.ConfigDict, num_classes: int,
                   torch_ok: bool):
  """Times train and eval of JAX, torch eager and torch.compile; prints a
  table.

  The machine is shared: load changes over minutes, so each round times the
  contenders back to back, and the table gives the medians over the rounds
  of images/s and of the per-round ratios. torch.compile compiles in its
  first round's warm-up (untimed); if it cannot (no C++ compiler), its
  column is dropped with one line saying why.
  """
  bench = Bench(layout, config, num_classes)
  peers = _peers(config, num_classes, torch_ok)
  sgemm = [sgemm_gflops()]
  rows = {}
  for mode in ('train', 'eval'):
    figures = {'JAX': []}
    for _ in range(args.rounds):
      figures['JAX'].append(getattr(bench, f'time_{mode}')(args.steps,
                                                           args.warmup))
      for name, peer in list(peers.items()):
        try:
          ips = getattr(peer, f'time_{mode}')(args.steps, args.warmup)
        except peer_torch.CompileUnavailable as e:
          print(f'{name}: skipped, {e}')
          del peers[name]
          figures.pop(name, None)
          continue
        figures.setdefault(name, []).append(ips)
    rows[mode] = figures
  sgemm.append(sgemm_gflops())
  print('JAX sgemm (2048^3, float32), before and after the rounds: '
        + ', '.join(f'{g:.0f}' for g in sgemm) + ' GFLOP/s')
  compiled = peers.get('compile')
  if compiled:
    print('torch.compile warm-up (untimed): ' + ', '.join(
        f'{mode} {s:.0f} s' for mode, s in compiled.compile_seconds.items()))
  print(f'\nimages/s, {config.image_size}x{config.image_size} images, '
        f'{num_classes} classes, batch {config.batch_size}, {args.steps} '
        f'steps after {args.warmup} warm-up, median of {args.rounds} rounds; '
        'JAX/x: median of per-round ratios, >1: JAX faster')
  names = list(rows['train'])
  print(f'{"":<6}' + ''.join(f'{n:>9}' for n in names) +
        ''.join(f'{"JAX/" + n:>13}' for n in names[1:]) +
        '   per round ' + '/'.join(names))
  for mode, figures in rows.items():
    summary = summarise(figures)
    cell = lambda n, i, w: (f'{summary[n][i]:{w}.2f}' if n in summary
                            else '-'.rjust(w))
    detail = ', '.join('/'.join(f'{v:.1f}' for v in round_figures)
                       for round_figures in zip(*figures.values()))
    print(f'{mode:<6}' + ''.join(cell(n, 0, 9) for n in names) +
          ''.join(cell(n, 1, 13) for n in names[1:]) + f'   {detail}')


def main() -> None:
  args = ARGS
  config = bench_config(args)
  if config.dataset not in NUM_CLASSES:
    raise SystemExit(f'--variant={args.variant} reads {config.dataset}, '
                     f'whose classes this bench does not know')
  num_classes = NUM_CLASSES[config.dataset]
  dtype = jnp.dtype(args.dtype)
  backend.start()  # As main.py does: no libtpu warnings, no ignored GPU.
  devices = jax.devices()
  if args.devices > len(devices):
    raise SystemExit(f'--devices={args.devices} but only {len(devices)} '
                     f'{devices[0].platform} devices')
  layout = parallel.Layout.create(model_parallel=True,
                                  devices=tuple(devices[:args.devices]))
  torch_ok = peer_torch.available() and not args.no_torch
  if torch_ok:
    import torch  # pylint: disable=g-import-not-at-top
    torch_info = (f'torch {torch.__version__} '
                  f'({torch.get_num_threads()} threads)')
  else:
    torch_info = 'torch: not run'
  print(f'jax {jax.__version__} on {args.devices} x {devices[0].device_kind} '
        f'({devices[0].platform}); {layout.towers_per_device} tower(s) per '
        f'device, {layout.num_replicas} replica(s); {args.dtype}; conv_impl '
        f'{args.conv_impl}; {torch_info}')
  if os.environ.get('XLA_FLAGS'):
    print(f'XLA_FLAGS={os.environ["XLA_FLAGS"]}')
  if not args.skip_step:
    run_step_bench(args, layout, config, num_classes, torch_ok)
  if args.per_layer:
    selected = [n for n in args.layers.split(',') if n]
    per_layer.print_table(config.batch_size, dtype, selected, args.steps,
                          args.warmup, torch_ok,
                          steps.make_optimizer(config, config.learning_rate),
                          args.conv_impl, config.image_size, num_classes)
  if args.kernels:
    per_layer.print_kernel_table(config.batch_size, args.steps, args.warmup,
                                 config.image_size)


if __name__ == '__main__':
  main()
