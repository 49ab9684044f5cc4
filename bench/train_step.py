"""Images/s of one AlexNet training step and one eval step, JAX vs PyTorch.

A training step is forward (dropout on), softmax cross-entropy, backward and
the paper's update `chain(add_decayed_weights(5e-4, kernels only),
scale_by_learning_rate(lr), trace(0.9))`, run through `alexnet.parallel.Layout`
exactly as training does (one `pmap`; both towers on one device with
--devices=1, one tower per device with --devices=2). Eval is the forward pass
alone. Compile time and warm-up steps are excluded and every timed step is
blocked on, so the figures are steady-state throughput.

When torch is importable, `bench/peer_torch.py` measures the same grouped net
in the same process and the JAX/PyTorch ratios are printed: the machine is
shared and noisy, so only ratios taken side by side mean anything.

  python bench/train_step.py                       # batch 128, float32
  python bench/train_step.py --devices=2           # tower-parallel layout
  python bench/train_step.py --per_layer           # per-layer fwd+bwd table
  python bench/train_step.py --per_layer --layers=conv1,pool1 --skip_step

On CPU, --devices=N fakes N host devices (XLA_FLAGS is set before JAX is
imported); on GPUs the same command uses the first N real devices.

User-level options (never set by the library), measured on the 2-core CPU:
  XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=dot  runs dots and
    convolutions through YNNPACK: conv3 forward+backward 1800 -> 840 ms at
    batch 128 (XLA's own kernel-gradient convolutions are its weak spot).
  jax.config.update('jax_default_prng_impl', 'rbg') would make dropout
    masks cheaper, but dropout costs ~5 ms of a step here: not worth it.
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
  parser.add_argument('--batch_size', type=int, default=128,
                      help='images per step, over all replicas')
  parser.add_argument('--steps', type=int, default=3, help='timed steps')
  parser.add_argument('--rounds', type=int, default=3,
                      help='alternating JAX / PyTorch measurements')
  parser.add_argument('--warmup', type=int, default=1,
                      help='untimed steps after compilation')
  parser.add_argument('--dtype', choices=('float32', 'bfloat16'),
                      default='float32', help='JAX compute dtype')
  parser.add_argument('--devices', type=int, default=1,
                      help='devices of the layout (fake host devices on CPU)')
  parser.add_argument('--per_layer', action='store_true',
                      help='also time forward+backward of each layer alone')
  parser.add_argument('--layers', default='',
                      help='comma-separated subset of the per-layer table')
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

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import optax  # pylint: disable=g-import-not-at-top

from alexnet import model, parallel  # pylint: disable=g-import-not-at-top
from bench import per_layer, peer_torch  # pylint: disable=g-import-not-at-top

IMAGE_SIZE = 227
NUM_CLASSES = 1000
LEARNING_RATE = 0.01
WEIGHT_DECAY = 5e-4
MOMENTUM = 0.9


def paper_optimizer(learning_rate: float) -> optax.GradientTransformation:
  """The paper's update: decay (kernels only), lr inside the velocity."""
  kernels_only = lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: path[-1].key == 'kernel', params)
  return optax.chain(
      optax.add_decayed_weights(WEIGHT_DECAY, mask=kernels_only),
      optax.scale_by_learning_rate(learning_rate),
      optax.trace(MOMENTUM))


def _time_steps(step: Callable[[], object], steps: int, warmup: int) -> float:
  """Seconds per step, mean over `steps` blocked steps after warm-up."""
  for _ in range(warmup):
    jax.block_until_ready(step())
  total = 0.0
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(step())
    total += time.perf_counter() - start
  return total / steps


class Bench:
  """The model, its parameters and a fixed batch laid out on the devices."""

  def __init__(self, layout: parallel.Layout, batch_size: int, dtype):
    if batch_size % layout.num_replicas:
      raise ValueError(f'--batch_size={batch_size} must divide over '
                       f'{layout.num_replicas} replicas')
    self.layout = layout
    self.net = model.AlexNet(num_classes=NUM_CLASSES, dtype=dtype,
                             exchange=layout.exchange)
    host_net = model.AlexNet(num_classes=NUM_CLASSES)
    params = jax.jit(lambda k: host_net.init(
        k, jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3)), train=False))(
            jax.random.key(0))['params']
    self.params = layout.shard_towers(jax.device_get(params))
    self.tx = paper_optimizer(LEARNING_RATE)
    self.opt_state = layout.pmap(self.tx.init)(self.params)
    rng = np.random.default_rng(0)
    per_replica = batch_size // layout.num_replicas
    images = 50 * rng.standard_normal(
        (layout.num_local_replicas, per_replica, IMAGE_SIZE, IMAGE_SIZE, 3),
        dtype=np.float32)
    labels = rng.integers(0, NUM_CLASSES, images.shape[:2], dtype=np.int32)
    self.images = layout.shard_batch(images)
    self.labels = layout.shard_batch(labels)
    self.key = jax.random.key(1)

  def train_step_fn(self):
    """The pmapped step: (params, opt_state, images, labels, key) -> new."""
    net, tx, layout = self.net, self.tx, self.layout

    def loss_fn(params, images, labels, key):
      logits = net.apply({'params': params}, images, train=True,
                         rngs={'dropout': key})
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
      return loss.mean(), None

    def step(params, opt_state, images, labels, key):
      key = jax.random.fold_in(key, layout.replica_index())
      loss, _, grads = layout.grad(loss_fn)(params, images, labels, key)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state,
              layout.mean_over_replicas(loss))

    return layout.pmap(step, in_axes=(0, 0, 0, 0, None),
                       out_axes=(0, 0, None), donate_argnums=(0, 1))

  def time_train(self, steps: int, warmup: int) -> float:
    """Images/s of the training step (compiled on the first call)."""
    if not hasattr(self, '_train_step'):
      self._train_step = self.train_step_fn()
    state = [self.params, self.opt_state, self.key]

    def run():
      state[2], key = jax.random.split(state[2])
      state[0], state[1], loss = self._train_step(
          state[0], state[1], self.images, self.labels, key)
      return state[0], loss

    jax.block_until_ready(run())  # Compiles on the first call.
    seconds = _time_steps(run, steps, warmup)
    self.params, self.opt_state, self.key = state
    return self._images_per_step / seconds

  def time_eval(self, steps: int, warmup: int) -> float:
    """Images/s of the forward pass (dropout off)."""
    if not hasattr(self, '_forward'):
      net = self.net
      self._forward = self.layout.pmap(
          lambda p, x: net.apply({'params': p}, x, train=False))
    run = lambda: self._forward(self.params, self.images)
    jax.block_until_ready(run())
    return self._images_per_step / _time_steps(run, steps, warmup)

  @property
  def _images_per_step(self) -> int:
    return self.images.shape[1] * self.layout.num_replicas


def run_step_bench(args, layout: parallel.Layout, dtype, torch_ok: bool):
  """Times train and eval, JAX and PyTorch alternating; prints a table.

  The machine is shared: load changes over minutes, so each round times JAX
  and then PyTorch back to back, and the table gives the medians over the
  rounds of images/s and of the per-round ratios.
  """
  bench = Bench(layout, args.batch_size, dtype)
  rows = {}
  for name, jax_fn, torch_fn in (
      ('train', bench.time_train, peer_torch.measure_train),
      ('eval', bench.time_eval, peer_torch.measure_eval)):
    jax_ips, torch_ips = [], []
    for _ in range(args.rounds):
      jax_ips.append(jax_fn(args.steps, args.warmup))
      if torch_ok:
        torch_ips.append(torch_fn(args.batch_size, args.steps, args.warmup))
    rows[name] = (jax_ips, torch_ips)
  print(f'\nimages/s, batch {args.batch_size}, {args.steps} steps after '
        f'{args.warmup} warm-up, median of {args.rounds} rounds '
        '(ratio JAX/PyTorch: median of per-round ratios, >1: JAX faster)')
  print(f'{"":<8} {"JAX":>9} {"PyTorch":>9} {"ratio":>6}   per round')
  for name, (jax_ips, torch_ips) in rows.items():
    ratios = [j / t for j, t in zip(jax_ips, torch_ips)]
    detail = ', '.join(f'{j:.1f}/{t:.1f}' for j, t in zip(jax_ips, torch_ips))
    print(f'{name:<8} {_median(jax_ips, 9)} {_median(torch_ips, 9)} '
          f'{_median(ratios, 6)}   {detail}')


def _median(values: list[float], width: int) -> str:
  return f'{np.median(values):{width}.2f}' if values else '-'.rjust(width)


def main() -> None:
  args = ARGS
  dtype = jnp.dtype(args.dtype)
  devices = jax.devices()
  if args.devices > len(devices):
    raise SystemExit(f'--devices={args.devices} but only {len(devices)} '
                     f'{devices[0].platform} devices')
  layout = parallel.Layout.create(model_parallel=True,
                                  devices=tuple(devices[:args.devices]))
  torch_ok = peer_torch.available() and not args.no_torch
  if torch_ok:
    import torch  # pylint: disable=g-import-not-at-top
    torch_info = f'torch {torch.__version__} ({torch.get_num_threads()} threads)'
  else:
    torch_info = 'torch: not run'
  print(f'jax {jax.__version__} on {args.devices} x {devices[0].device_kind} '
        f'({devices[0].platform}); {layout.towers_per_device} tower(s) per '
        f'device, {layout.num_replicas} replica(s); {args.dtype}; {torch_info}')
  if os.environ.get('XLA_FLAGS'):
    print(f'XLA_FLAGS={os.environ["XLA_FLAGS"]}')
  if not args.skip_step:
    run_step_bench(args, layout, dtype, torch_ok)
  if args.per_layer:
    selected = [n for n in args.layers.split(',') if n]
    per_layer.print_table(args.batch_size, dtype, selected, args.steps,
                          args.warmup, torch_ok,
                          paper_optimizer(LEARNING_RATE))


if __name__ == '__main__':
  main()
