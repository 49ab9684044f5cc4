"""Per-chip accounting of a compiled step, and its roofline.

`alexnet/tpu.py` compiles the steps for a TPU slice; here are the chips'
published figures (`CHIPS`), what the compiler reported for each step
(`StepCost`) and the printed per-chip report (`Report`). The roofline's
compute side: a step takes at least its FLOPs at the chip's peak rate, so
the images per second are at most the global batch over that time.
"""

import dataclasses
import importlib.metadata

import ml_collections

from alexnet import parallel


@dataclasses.dataclass(frozen=True)
class Chip:
  """The published figures of one TPU generation, per chip.

  Attributes:
    peak_flops: peak dense bf16 FLOP/s.
    hbm_bytes: HBM capacity.
    hbm_bytes_per_s: HBM bandwidth.
    chip_config: libtpu's chip configuration giving one JAX device per chip
      ('megacore' joins v4's two TensorCores, as JAX does on a v4 VM).
    accelerator: Cloud TPU's accelerator type prefix, e.g. 'v5litepod'.
    cores_per_chip: TensorCores per chip (the accelerator type counts them).
  """

  peak_flops: float
  hbm_bytes: float
  hbm_bytes_per_s: float
  chip_config: str
  accelerator: str
  cores_per_chip: int


# From Google Cloud's TPU documentation, the "System architecture" table of
# each generation's page, https://cloud.google.com/tpu/docs/<generation>
# (docs/TPU.md copies the figures as a table).
CHIPS = {
    'v4': Chip(275e12, 32 * 2**30, 1200e9, 'megacore', 'v4', 2),
    'v5e': Chip(197e12, 16e9, 819e9, 'default', 'v5litepod', 1),
    'v5p': Chip(459e12, 95e9, 2765e9, 'default', 'v5p', 2),
    'v6e': Chip(918e12, 32e9, 1638e9, 'default', 'v6e', 1),
}


@dataclasses.dataclass(frozen=True)
class StepCost:
  """The compiler's accounting of one mapped step, per chip.

  Attributes:
    images: images one step takes, all chips together.
    argument_bytes: the step's inputs (state, batch, mean image) on a chip.
    output_bytes: its outputs.
    alias_bytes: outputs written into donated inputs (the train state).
    temp_bytes: activations, gradients and other temporaries.
    code_bytes: the program itself.
    flops: floating-point operations of one step on a chip.
    bytes_accessed: HBM traffic of one step on a chip, as XLA estimates it.
  """

  images: int
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int
  flops: float
  bytes_accessed: float

  @property
  def total_bytes(self) -> int:
    """HBM the step needs: its inputs, the outputs that do not reuse a
    donated input, its temporaries and its code."""
    return (self.argument_bytes + self.output_bytes - self.alias_bytes
            + self.temp_bytes + self.code_bytes)

  def seconds(self, chip: Chip) -> float:
    """Lower bound on the step time: its FLOPs at the chip's peak rate.

    XLA's HBM traffic estimate (`bytes_accessed`) is printed next to it but
    kept out of the bound: it is the compiler's guess, which could exceed
    the traffic the chip really makes, and a bound must not.
    """
    return self.flops / chip.peak_flops

  def traffic_seconds(self, chip: Chip) -> float:
    """XLA's HBM traffic estimate moved at the chip's full bandwidth."""
    return self.bytes_accessed / chip.hbm_bytes_per_s


def _milliseconds(seconds: float) -> str:
  return f'{1e3 * seconds:.3f} ms'


def format_bytes(count: float) -> str:
  """Decimal units, as the chips' HBM is published."""
  if count >= 1e9:
    return f'{count / 1e9:.2f} GB'
  return f'{count / 1e6:.1f} MB'


@dataclasses.dataclass(frozen=True)
class Report:
  """What compiling the steps for a slice found, per chip.

  Attributes:
    topology: the slice, e.g. 'v5e:2x2'.
    config: the config compiled (conv_impl resolved for the TPU).
    layout: towers and replicas over the slice's chips.
    num_classes: labels of the config's dataset.
    param_bytes: one chip's parameters.
    optimizer_bytes: one chip's optimizer state (the momentum).
    train: the train step's costs.
    eval: the eval step's costs.
    seconds: the time both compilations took.
  """

  topology: str
  config: ml_collections.ConfigDict
  layout: parallel.Layout
  num_classes: int
  param_bytes: int
  optimizer_bytes: int
  train: StepCost
  eval: StepCost
  seconds: float

  @property
  def chip(self) -> Chip:
    return CHIPS[self.topology.split(':')[0]]

  def lines(self) -> list[str]:
    """The report as printed: the setting, then one row per quantity."""
    chip, layout, config = self.chip, self.layout, self.config
    placement = ('one tower per chip' if layout.towers_per_device == 1
                 else f'{layout.towers_per_device} towers per chip')
    crops = '10 crops' if config.ten_crop else 'centre crop'
    train, evaluate = self.train, self.eval
    rows = [
        ('parameters', self.param_bytes, self.param_bytes, format_bytes),
        ('optimizer state', self.optimizer_bytes, None, format_bytes),
        ('arguments (state, batch, mean)', train.argument_bytes,
         evaluate.argument_bytes, format_bytes),
        ('temporaries', train.temp_bytes, evaluate.temp_bytes,
         format_bytes),
        (f'total, of {format_bytes(chip.hbm_bytes)} HBM', train.total_bytes,
         evaluate.total_bytes,
         lambda n: f'{format_bytes(n)} ({100 * n / chip.hbm_bytes:.0f}%)'),
        ('FLOPs per step', train.flops, evaluate.flops, '{:.3g}'.format),
        ('step time at peak FLOP/s (lower bound)', train.seconds(chip),
         evaluate.seconds(chip), _milliseconds),
        ('images/s, upper bound', train.images / train.seconds(chip),
         evaluate.images / evaluate.seconds(chip), '{:,.0f}'.format),
        ('HBM traffic per step (XLA estimate)', train.bytes_accessed,
         evaluate.bytes_accessed, format_bytes),
        ('  its time at full HBM bandwidth', train.traffic_seconds(chip),
         evaluate.traffic_seconds(chip), _milliseconds)]
    return [
        f'Compiled for TPU {self.topology} ({layout.num_devices} chips) by '
        f'libtpu {importlib.metadata.version("libtpu")} in '
        f'{self.seconds:.0f} s: {layout.num_replicas} '
        f'{"replica" if layout.num_replicas == 1 else "replicas"}, '
        f'{placement}; batch {config.batch_size}, eval batch '
        f'{config.eval_batch_size} ({crops}); {config.dtype}; '
        f'{self.num_classes} classes; conv_impl={config.conv_impl}.',
        f'Peak per chip (published): {chip.peak_flops / 1e12:.0f} TFLOP/s '
        f'bf16, {chip.hbm_bytes_per_s / 1e9:.0f} GB/s HBM.',
        f'{"per chip":36s} {"train step":>16s} {"eval step":>16s}',
        *(f'{name:36s} {show(a):>16s} {"-" if b is None else show(b):>16s}'
          for name, a, b, show in rows)]
