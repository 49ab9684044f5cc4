"""PyTorch (CPU) peer of the grouped AlexNet, for side-by-side speed figures.

`bench/train_step.py` imports this module in the same process as the JAX
benchmark and divides the two images/s figures. The net here is the grouped
single-device form of the paper's two-tower AlexNet (see
`docs/REFERENCE.md`): conv2, conv4 and conv5 use `groups=2`, LRN windows stay
inside each tower's channels, everything else is dense. It has 60,965,224
parameters, the same count as the JAX model and Caffe's bvlc_alexnet.

Tensors are NCHW as PyTorch requires, but stored in `channels_last` (NHWC)
memory format: that is the layout the JAX model uses and the one oneDNN runs
fastest on CPU.

torch is an optional, bench-only dependency (`pip install torch==2.14.1`, the
CPU wheel; `torch.compile` also needs a C++ compiler); `available()` says
whether it can be imported, and nothing here imports torch at module import
time, so the JAX benchmark can import this file unconditionally.

Timing: each figure is `batch_size * steps / total_seconds`, where
`total_seconds` is the sum of `time.perf_counter()` spans around whole steps
(forward, and for training backward plus optimizer step) after warm-up
(and, for `torch.compile`, after its compiling calls). That
is total/steps, not a median: with few, multi-second steps the mean is stable
and it is what an epoch would cost.

Run as a script:

  python bench/peer_torch.py --batch_size=128 --steps=3
  python bench/peer_torch.py --batch_size=128 --steps=3 --compile
  python bench/peer_torch.py --batch_size=64 --image_size=67 --num_classes=10
"""

from __future__ import annotations

import argparse
import importlib.util
import time

# The architecture, per the reference sheet. Channels are totals over both
# towers; `groups` is 2 where a layer reads only its own tower.
_NUM_CLASSES = 1000
_IMAGE_SIZE = 227
_EXPECTED_PARAMS = 60_965_224

# Paper LRN constants: k=2, n=5, alpha=1e-4, beta=0.75, with NO division of
# alpha by n.
_LRN_SIZE = 5
_LRN_ALPHA = 1e-4
_LRN_BETA = 0.75
_LRN_K = 2.0

# Paper optimizer (section 5).
_LEARNING_RATE = 0.01
_MOMENTUM = 0.9
_WEIGHT_DECAY = 5e-4

_LRN_IMPLS = ('native', 'banded')


def available() -> bool:
  """Returns whether torch can be imported (it is an optional dependency)."""
  return importlib.util.find_spec('torch') is not None


def import_before_jax() -> None:
  """Imports torch and its compiler stack; call before importing JAX.

  With the CUDA wheel of torch, loading triton (which `torch.compile`
  imports) after JAX and the libraries the JAX benchmark loads crashes the
  process (a segmentation fault in the extension's loader); loaded first,
  both work.
  """
  import torch  # pylint: disable=unused-import
  import torch._dynamo  # pylint: disable=unused-import,protected-access


def feature_map_size(image_size: int) -> int:
  """Side of conv5's pooled maps: conv1 11x11 stride 4, three 3x3/2 pools.

  `alexnet.model.feature_map_size` computes the same; the peer keeps its own
  so that it shares no code with the net it is compared with.
  """
  pool = lambda n: (n - 3) // 2 + 1
  return pool(pool(pool((image_size - 11) // 4 + 1)))


def build_model(lrn: str = 'native', seed: int = 0, *,
                image_size: int = _IMAGE_SIZE,
                num_classes: int = _NUM_CLASSES):
  """Builds the grouped AlexNet in channels_last memory format.

  Args:
    lrn: 'native' applies `torch.nn.functional.local_response_norm` to each
      tower's channels separately and concatenates; 'banded' computes the same
      function as a 1x1 convolution with a fixed block-diagonal band matrix
      (one matmul over channels, faster on CPU). Both equal the paper's
      formula within the tower.
    seed: seed of the generator used for the weight init.
    image_size: input side; fc6 reads 256 maps of `feature_map_size` each.
    num_classes: fc8's outputs.

  Returns:
    A `torch.nn.Module` in train mode, float32, on CPU.
  """
  # Imported here so that importing this module never requires torch.
  import torch
  from torch import nn
  import torch.nn.functional as F

  if lrn not in _LRN_IMPLS:
    raise ValueError(f'lrn must be one of {_LRN_IMPLS}, got {lrn!r}')
  side = feature_map_size(image_size)
  if side < 1:
    raise ValueError(f'image_size={image_size} is below the net\'s 67')

  class GroupedLRN(nn.Module):
    """Paper LRN whose channel window stays inside each group (tower)."""

    def __init__(self, channels: int, groups: int = 2):
      super().__init__()
      self.groups = groups
      if lrn == 'banded':
        # band[i, j] = 1 where j is within n//2 of i AND in i's group, so a
        # 1x1 conv of x^2 with it gives the paper's clipped window sum.
        per_group = channels // groups
        band = torch.zeros(channels, channels)
        half = _LRN_SIZE // 2
        for i in range(channels):
          g0 = (i // per_group) * per_group
          lo = max(g0, i - half)
          hi = min(g0 + per_group - 1, i + half)
          band[i, lo:hi + 1] = 1.0
        band = band.view(channels, channels, 1, 1).contiguous(
            memory_format=torch.channels_last)
        # A buffer, not a parameter: it is fixed and must not count towards
        # num_params() or receive weight decay.
        self.register_buffer('band', band)

    def forward(self, x):
      if lrn == 'banded':
        window_sum = F.conv2d(x * x, self.band)
        return x * (_LRN_K + _LRN_ALPHA * window_sum).pow(-_LRN_BETA)
      # torch's LRN divides alpha by size (Caffe convention); multiply it back
      # to get the paper's formula. torch pads the window symmetrically
      # (size//2 each side for odd size), matching the paper's clipped sum.
      return torch.cat([
          F.local_response_norm(
              g, _LRN_SIZE, alpha=_LRN_ALPHA * _LRN_SIZE, beta=_LRN_BETA,
              k=_LRN_K)
          for g in x.chunk(self.groups, dim=1)
      ], dim=1)

  model = nn.Sequential(
      nn.Conv2d(3, 96, 11, stride=4),                # conv1 -> 55x55x96
      nn.ReLU(inplace=True),
      GroupedLRN(96),
      nn.MaxPool2d(3, 2),                            # -> 27x27x96
      nn.Conv2d(96, 256, 5, padding=2, groups=2),    # conv2 -> 27x27x256
      nn.ReLU(inplace=True),
      GroupedLRN(256),
      nn.MaxPool2d(3, 2),                            # -> 13x13x256
      nn.Conv2d(256, 384, 3, padding=1),             # conv3 (both towers)
      nn.ReLU(inplace=True),
      nn.Conv2d(384, 384, 3, padding=1, groups=2),   # conv4
      nn.ReLU(inplace=True),
      nn.Conv2d(384, 256, 3, padding=1, groups=2),   # conv5 -> 13x13x256
      nn.ReLU(inplace=True),
      nn.MaxPool2d(3, 2),                            # -> 6x6x256
      # CHW flatten order; the JAX model flattens HWC, which only permutes
      # fc6's rows and costs the same.
      nn.Flatten(),
      nn.Linear(256 * side * side, 4096),            # fc6 (9216 at 227)
      nn.ReLU(inplace=True),
      nn.Dropout(0.5),
      nn.Linear(4096, 4096),                         # fc7
      nn.ReLU(inplace=True),
      nn.Dropout(0.5),
      nn.Linear(4096, num_classes),                  # fc8
  )

  # Paper init: weights N(0, 0.01); biases 1 in conv2, conv4, conv5, fc6, fc7
  # (to give ReLUs positive inputs early), 0 elsewhere. A private generator
  # keeps the global torch RNG of the host benchmark untouched.
  generator = torch.Generator().manual_seed(seed)
  weighted = [m for m in model if isinstance(m, (nn.Conv2d, nn.Linear))]
  bias_one = {1, 3, 4, 5, 6}  # indices in conv1..conv5, fc6..fc8 order
  with torch.no_grad():
    for index, layer in enumerate(weighted):
      nn.init.normal_(layer.weight, 0.0, 0.01, generator=generator)
      nn.init.constant_(layer.bias, 1.0 if index in bias_one else 0.0)

  return model.to(memory_format=torch.channels_last)


def num_params() -> int:
  """Returns the grouped AlexNet's parameter count, checked against the paper.

  Returns:
    60,965,224.

  Raises:
    AssertionError: if the built net does not have the reference count.
  """
  model = build_model()
  count = sum(p.numel() for p in model.parameters())
  assert count == _EXPECTED_PARAMS, (
      f'grouped AlexNet has {count:,} parameters, expected '
      f'{_EXPECTED_PARAMS:,}')
  return count


class _Threads:
  """Context manager setting torch's intra-op thread count, then restoring it.

  Restoring matters because the JAX benchmark shares the process.
  """

  def __init__(self, threads: int | None):
    self._threads = threads
    self._saved = None

  def __enter__(self):
    import torch
    if self._threads is not None:
      self._saved = torch.get_num_threads()
      torch.set_num_threads(self._threads)
    return self

  def __exit__(self, *exc):
    import torch
    if self._saved is not None:
      torch.set_num_threads(self._saved)
    return False


def _random_batch(batch_size: int, image_size: int, num_classes: int,
                  seed: int = 1):
  """Returns random (images, labels), images NCHW in channels_last format."""
  import torch
  generator = torch.Generator().manual_seed(seed)
  images = torch.randn(batch_size, 3, image_size, image_size,
                       generator=generator)
  images = images.contiguous(memory_format=torch.channels_last)
  labels = torch.randint(0, num_classes, (batch_size,), generator=generator)
  return images, labels


def _check_args(batch_size: int, steps: int, warmup: int) -> None:
  if batch_size < 1 or steps < 1 or warmup < 0:
    raise ValueError(
        f'need batch_size >= 1, steps >= 1, warmup >= 0; got {batch_size}, '
        f'{steps}, {warmup}')


class CompileUnavailable(RuntimeError):
  """torch.compile could not build the step (e.g. no C++ compiler)."""


class Peer:
  """The grouped net, its optimizer and one fixed batch, eager or compiled.

  One training step is forward (train mode, dropout on), cross-entropy loss,
  backward and an SGD step with the paper's momentum 0.9, weight decay 5e-4
  and lr 0.01; one eval step is the forward pass in eval mode (dropout off)
  under `torch.no_grad()`. The net, optimizer and batch live as long as the
  object, so that a compiled peer compiles once however often it is timed.

  With `compiled`, the module runs under `torch.compile` (inductor, its
  default mode), as a PyTorch user would wrap it; the optimizer step stays
  eager. Compiling happens in the first calls, which are warm-up: untimed.
  """

  def __init__(self, batch_size: int = 128, *, compiled: bool = False,
               threads: int | None = None, lrn: str = 'native',
               image_size: int = _IMAGE_SIZE,
               num_classes: int = _NUM_CLASSES):
    """Builds the net and the batch.

    Args:
      batch_size: images per step.
      compiled: run the module under `torch.compile`.
      threads: torch intra-op threads while timing; None keeps torch's
        current setting. The previous setting is restored after each timing.
      lrn: 'native' (torch LRN per tower, the default) or 'banded' (same
        function as a 1x1 band-matrix conv); see `build_model`.
      image_size, num_classes: the net's input side and fc8's outputs.
    """
    import torch
    _check_args(batch_size, 1, 0)
    self.batch_size, self.compiled, self._threads = (
        batch_size, compiled, threads)
    self._model = build_model(lrn=lrn, image_size=image_size,
                              num_classes=num_classes)
    # torch's SGD puts lr outside the velocity (v <- 0.9 v + g + wd w;
    # w <- w - lr v), which equals the paper's update while lr is constant,
    # and it decays biases too; neither changes the cost of a step.
    self._optimizer = torch.optim.SGD(
        self._model.parameters(), lr=_LEARNING_RATE, momentum=_MOMENTUM,
        weight_decay=_WEIGHT_DECAY)
    self._forward = torch.compile(self._model) if compiled else self._model
    self._images, self._labels = _random_batch(batch_size, image_size,
                                               num_classes)
    # Seconds the compiled peer's warm-up took, per mode ('train', 'eval').
    self.compile_seconds: dict[str, float] = {}

  def time_train(self, steps: int = 5, warmup: int = 2) -> float:
    """Images/s of the training step: batch_size * steps / timed seconds.

    Args:
      steps: timed steps.
      warmup: untimed steps run first (oneDNN primitives, the allocator;
        compilation, which takes at least one step, when compiled).

    Returns:
      Images per second.

    Raises:
      CompileUnavailable: if compiled and torch.compile fails.
    """
    import torch.nn.functional as F

    def step():
      self._optimizer.zero_grad(set_to_none=True)
      loss = F.cross_entropy(self._forward(self._images), self._labels)
      loss.backward()
      self._optimizer.step()
      # .item() forces the step to have fully finished before the clock stops.
      return loss.item()

    self._model.train()
    return self._time('train', step, steps, warmup)

  def time_eval(self, steps: int = 5, warmup: int = 1) -> float:
    """Images/s of the forward pass; arguments as `time_train`'s."""
    import torch

    def step():
      with torch.no_grad():
        return self._forward(self._images)

    self._model.eval()
    return self._time('eval', step, steps, warmup)

  def _time(self, mode: str, step, steps: int, warmup: int) -> float:
    _check_args(self.batch_size, steps, warmup)
    with _Threads(self._threads):
      if self.compiled and mode not in self.compile_seconds:
        start = time.perf_counter()
        self._compile(step)
        self.compile_seconds[mode] = time.perf_counter() - start
      for _ in range(warmup):
        step()
      total = 0.0
      for _ in range(steps):
        start = time.perf_counter()
        step()
        total += time.perf_counter() - start
    return self.batch_size * steps / total

  @staticmethod
  def _compile(step) -> None:
    """Runs `step` twice (it compiles, then settles), naming any failure."""
    try:
      for _ in range(2):
        step()
    except Exception as e:  # pylint: disable=broad-except
      # Inductor's errors span pages (the compiler's whole output); the
      # first line names the cause, e.g. a missing C++ compiler.
      first = next((line for line in str(e).splitlines() if line.strip()),
                   '')
      raise CompileUnavailable(
          f'torch.compile failed: {type(e).__name__}: {first[:200]}') from e


def main(argv: list[str] | None = None) -> None:
  """Prints training and evaluation images/s.

  argparse rather than absl flags: absl flags are process-global, and defining
  --batch_size at import time would collide with the JAX benchmark that
  imports this module.

  Args:
    argv: command-line arguments without the program name; None reads
      sys.argv.
  """
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch_size', type=int, default=128)
  parser.add_argument('--steps', type=int, default=5,
                      help='timed steps per figure (after warm-up)')
  parser.add_argument('--threads', type=int, default=None,
                      help='torch intra-op threads (default: torch default)')
  parser.add_argument('--lrn', choices=_LRN_IMPLS, default='native')
  parser.add_argument('--image_size', type=int, default=_IMAGE_SIZE)
  parser.add_argument('--num_classes', type=int, default=_NUM_CLASSES)
  parser.add_argument('--compile', action='store_true',
                      help='run the module under torch.compile (inductor)')
  args = parser.parse_args(argv)

  if not available():
    raise SystemExit('error: torch is not installed: pip install torch==2.14.1')
  import torch

  net = dict(lrn=args.lrn, image_size=args.image_size,
             num_classes=args.num_classes)
  params = sum(p.numel() for p in build_model(**net).parameters())
  if (args.image_size, args.num_classes) == (_IMAGE_SIZE, _NUM_CLASSES):
    num_params()  # The paper's net: checks its count.
  print(f'torch {torch.__version__}, threads '
        f'{args.threads or torch.get_num_threads()}, params {params:,}, '
        f'lrn {args.lrn}, {args.image_size}x{args.image_size} images, '
        f'{args.num_classes} classes, '
        f'{"torch.compile" if args.compile else "eager"}')
  peer = Peer(args.batch_size, compiled=args.compile, threads=args.threads,
              **net)
  try:
    for name, run in (('train', peer.time_train), ('eval', peer.time_eval)):
      images_per_s = run(args.steps)
      compiled = (f', compile warm-up {peer.compile_seconds[name]:.0f} s '
                  'untimed' if args.compile else '')
      print(f'{name + ":":<6} {images_per_s:.2f} images/s (batch '
            f'{args.batch_size}, {args.steps} steps, total/steps{compiled})')
  except CompileUnavailable as e:
    raise SystemExit(f'error: {e}') from None

if __name__ == '__main__':
  main()
