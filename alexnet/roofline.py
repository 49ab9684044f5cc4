"""Per-device accounting of a compiled step, and its roofline.

`alexnet/compile_only.py` compiles the steps for TPU chips or GPUs that are
not there; here are the published figures of an accelerator
(`Accelerator`, the TPU chips' `CHIPS`; the GPUs' are in alexnet/gpu.py),
what the compiler reported for each step (`StepCost`) and the printed
per-device report (`Report`). The roofline: a step takes at least its FLOPs
at the device's peak rate, and at least the bytes it must move at the
memory's full bandwidth; the images per second are at most the global batch
over the longer of the two.
"""

import dataclasses
from collections.abc import Mapping

import ml_collections

from alexnet import parallel


@dataclasses.dataclass(frozen=True)
class Peak:
  """A peak compute rate and the units it is published for."""

  flops_per_s: float
  units: str


@dataclasses.dataclass(frozen=True)
class Accelerator:
  """The published figures of one accelerator, per device.

  Attributes:
    name: e.g. 'TPU v5e', 'NVIDIA H100 SXM5 80GB'.
    unit: what one device is called: 'chip' or 'GPU'.
    memory_bytes: its memory (HBM) capacity.
    memory_bytes_per_s: its memory bandwidth.
    peaks: the peak rate that bounds a step of each compute dtype
      (config.dtype: 'float32', 'bfloat16').
  """

  name: str
  unit: str
  memory_bytes: float
  memory_bytes_per_s: float
  peaks: Mapping[str, Peak]


def _tpu(generation: str, bf16_flops: float, hbm_bytes: float,
         hbm_bytes_per_s: float) -> Accelerator:
  # float32 matrix products run on the same bf16 units at JAX's default
  # precision (one bf16 pass), so the bf16 peak bounds both dtypes.
  return Accelerator(f'TPU {generation}', 'chip', hbm_bytes, hbm_bytes_per_s,
                     {'float32': Peak(bf16_flops, 'bf16'),
                      'bfloat16': Peak(bf16_flops, 'bf16')})


# From Google Cloud's TPU documentation, the "System architecture" table of
# each generation's page, https://cloud.google.com/tpu/docs/<generation>
# (docs/TPU.md copies the figures as a table).
CHIPS = {
    'v4': _tpu('v4', 275e12, 32 * 2**30, 1200e9),
    'v5e': _tpu('v5e', 197e12, 16e9, 819e9),
    'v5p': _tpu('v5p', 459e12, 95e9, 2765e9),
    'v6e': _tpu('v6e', 918e12, 32e9, 1638e9),
}


@dataclasses.dataclass(frozen=True)
class StepCost:
  """The compiler's accounting of one mapped step, per device.

  Attributes:
    images: images one step takes, all devices together.
    argument_bytes: the step's inputs (state, batch, mean image) on a device.
    output_bytes: its outputs.
    alias_bytes: outputs written into donated inputs (the train state).
    temp_bytes: activations, gradients and other temporaries.
    code_bytes: the program itself.
    flops: floating-point operations of one step on a device.
    least_bytes_moved: memory traffic no step can avoid: the state it
      reads (and, training, writes back) and its batch, each once.
    bytes_accessed: the memory traffic of one step on a device as XLA
      estimates it, or None where the compiler gives no estimate.
  """

  images: int
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int
  flops: float
  least_bytes_moved: int
  bytes_accessed: float | None

  @property
  def total_bytes(self) -> int:
    """Memory the step needs: its inputs, the outputs that do not reuse a
    donated input, its temporaries and its code."""
    return (self.argument_bytes + self.output_bytes - self.alias_bytes
            + self.temp_bytes + self.code_bytes)

  def seconds(self, device: Accelerator, dtype: str) -> float:
    """Lower bound on the step time: its FLOPs at the device's peak rate,
    or its unavoidable traffic at full bandwidth, whichever is longer.

    XLA's traffic estimate (`bytes_accessed`) is printed but kept out of
    the bound: it is the compiler's guess, which could exceed the traffic
    the device really makes, and a bound must not.
    """
    return max(self.flops / device.peaks[dtype].flops_per_s,
               self.least_bytes_moved / device.memory_bytes_per_s)


def _milliseconds(seconds: float) -> str:
  return f'{1e3 * seconds:.3f} ms'


def format_bytes(count: float) -> str:
  """Decimal units, as accelerators' memory is published."""
  if count >= 1e9:
    return f'{count / 1e9:.2f} GB'
  return f'{count / 1e6:.1f} MB'


@dataclasses.dataclass(frozen=True)
class Report:
  """What compiling the steps for some devices found, per device.

  Attributes:
    topology: the --topology compiled for, e.g. 'v5e:2x2' or 'h100:8'.
    device: the published figures of one device.
    compiler: what compiled, e.g. 'libtpu 0.0.42.1'.
    flops_source: who counted the FLOPs, e.g. "XLA's cost analysis".
    config: the config compiled (conv_impl resolved for the device).
    layout: towers and replicas over the devices.
    num_classes: labels of the config's dataset.
    param_bytes: one device's parameters.
    optimizer_bytes: one device's optimizer state (the momentum).
    train: the train step's costs.
    eval: the eval step's costs.
    seconds: the time both compilations took (lowering excluded).
  """

  topology: str
  device: Accelerator
  compiler: str
  flops_source: str
  config: ml_collections.ConfigDict
  layout: parallel.Layout
  num_classes: int
  param_bytes: int
  optimizer_bytes: int
  train: StepCost
  eval: StepCost
  seconds: float

  def _rows(self) -> list[tuple[str, float, float | None, object]]:
    device, dtype = self.device, self.config.dtype
    train, evaluate = self.train, self.eval
    rows = [
        ('parameters', self.param_bytes, self.param_bytes, format_bytes),
        ('optimizer state', self.optimizer_bytes, None, format_bytes),
        ('arguments (state, batch, mean)', train.argument_bytes,
         evaluate.argument_bytes, format_bytes),
        ('temporaries', train.temp_bytes, evaluate.temp_bytes,
         format_bytes),
        (f'total, of {format_bytes(device.memory_bytes)}', train.total_bytes,
         evaluate.total_bytes,
         lambda n: f'{format_bytes(n)} ({100 * n / device.memory_bytes:.0f}%)'),
        ('FLOPs per step', train.flops, evaluate.flops, '{:.3g}'.format),
        ('  their time at peak', train.flops / device.peaks[dtype].flops_per_s,
         evaluate.flops / device.peaks[dtype].flops_per_s, _milliseconds),
        ('state and batch moved once', train.least_bytes_moved,
         evaluate.least_bytes_moved, format_bytes),
        ('  their time at full bandwidth',
         train.least_bytes_moved / device.memory_bytes_per_s,
         evaluate.least_bytes_moved / device.memory_bytes_per_s,
         _milliseconds),
        ('step time, lower bound', train.seconds(device, dtype),
         evaluate.seconds(device, dtype), _milliseconds),
        ('images/s, upper bound', train.images / train.seconds(device, dtype),
         evaluate.images / evaluate.seconds(device, dtype), '{:,.0f}'.format)]
    if train.bytes_accessed is not None:
      rows += [
          ('memory traffic per step (XLA estimate)', train.bytes_accessed,
           evaluate.bytes_accessed, format_bytes),
          ('  its time at full bandwidth',
           train.bytes_accessed / device.memory_bytes_per_s,
           evaluate.bytes_accessed / device.memory_bytes_per_s,
           _milliseconds)]
    return rows

  def lines(self) -> list[str]:
    """The report as printed: the setting, then one row per quantity."""
    device, layout, config = self.device, self.layout, self.config
    unit = device.unit
    placement = (f'one tower per {unit}' if layout.towers_per_device == 1
                 else f'{layout.towers_per_device} towers per {unit}')
    crops = '10 crops' if config.ten_crop else 'centre crop'
    peak = device.peaks[config.dtype]
    return [
        f'Compiled for {self.topology}: {layout.num_devices} x '
        f'{device.name}, by {self.compiler}, in {self.seconds:.0f} s: '
        f'{layout.num_replicas} '
        f'{"replica" if layout.num_replicas == 1 else "replicas"}, '
        f'{placement}; batch {config.batch_size}, eval batch '
        f'{config.eval_batch_size} ({crops}); {config.dtype}; '
        f'{self.num_classes} classes; conv_impl={config.conv_impl}.',
        f'Published peak per {unit}: {peak.flops_per_s / 1e12:,.1f} '
        f'TFLOP/s ({peak.units}), '
        f'{device.memory_bytes_per_s / 1e9:,.0f} GB/s memory. FLOPs: '
        f'{self.flops_source}.',
        f'{"per " + unit:38s} {"train step":>16s} {"eval step":>16s}',
        *(f'{name:38s} {show(a):>16s} {"-" if b is None else show(b):>16s}'
          for name, a, b, show in self._rows())]
