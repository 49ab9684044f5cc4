"""FLOPs of a lowered step, counted from its convolutions and matmuls.

XLA:GPU's compiled programs report no cost analysis (JAX 0.10), so the GPU
roofline counts the FLOPs itself, on the StableHLO that JAX lowers: two per
multiply-add of every `stablehlo.convolution` and `stablehlo.dot_general`,
which is what the tensor cores run. As in XLA's own count, a convolution's
multiply-adds with padding are left out. Elementwise work (ReLU, LRN, pooling,
the update) is left out: the count is a lower bound on the work, and so
still gives a lower bound on the step time. On convolutions and matmuls it
equals XLA:CPU's count (tests/test_gpu_compile.py); on the paper's train
step it is 98.8% of libtpu's count of everything (docs/GPU.md;
tests/test_compile.py compares the two on the tiny net).
"""

import collections
import math
from typing import Any

from jax.extend.mlir import ir
from jax.extend.mlir.dialects import stablehlo


def _shape(value: ir.Value) -> list[int]:
  return ir.RankedTensorType(value.type).shape


def _ints(op: ir.Operation, name: str, default: list[int]) -> list[int]:
  """An integer array attribute of `op`, or its default where absent."""
  if name not in op.attributes:
    return default
  attribute = op.attributes[name]
  if name == 'padding':  # [spatial dims, 2] elements, flattened.
    return [int(value) for value in ir.DenseIntElementsAttr(attribute)]
  return list(ir.DenseI64ArrayAttr(attribute))


def _valid_pairs(size: int, outputs: int, taps: int, stride: int,
                 low: int, lhs_dilation: int, rhs_dilation: int) -> int:
  """(output, kernel tap) pairs along one spatial axis that read an input
  element, not padding or a hole of the input's dilation."""
  pairs = 0
  for out in range(outputs):
    for tap in range(taps):
      position = out * stride + tap * rhs_dilation - low
      if (position >= 0 and position % lhs_dilation == 0
          and position // lhs_dilation < size):
        pairs += 1
  return pairs


def _convolution(op: ir.Operation) -> float:
  """2 x multiply-adds that read the input (padding left out, as XLA does).

  Per output feature and batch element, every input feature of the kernel
  meets the valid (output, tap) pairs of each spatial axis.
  """
  numbers = stablehlo.ConvDimensionNumbers(op.attributes['dimension_numbers'])
  lhs, kernel, out = (_shape(op.operands[0]), _shape(op.operands[1]),
                      _shape(op.results[0]))
  axes = len(numbers.input_spatial_dimensions)
  strides = _ints(op, 'window_strides', [1] * axes)
  padding = _ints(op, 'padding', [0] * 2 * axes)
  lhs_dilation = _ints(op, 'lhs_dilation', [1] * axes)
  rhs_dilation = _ints(op, 'rhs_dilation', [1] * axes)
  spatial = math.prod(
      _valid_pairs(lhs[numbers.input_spatial_dimensions[axis]],
                   out[numbers.output_spatial_dimensions[axis]],
                   kernel[numbers.kernel_spatial_dimensions[axis]],
                   strides[axis], padding[2 * axis], lhs_dilation[axis],
                   rhs_dilation[axis]) for axis in range(axes))
  return (2.0 * out[numbers.output_batch_dimension]
          * out[numbers.output_feature_dimension]
          * kernel[numbers.kernel_input_feature_dimension] * spatial)


def _dot(op: ir.Operation) -> float:
  """2 x output elements x (the contracted length)."""
  numbers = stablehlo.DotDimensionNumbers(
      op.attributes['dot_dimension_numbers'])
  lhs = _shape(op.operands[0])
  contracted = math.prod(lhs[d] for d in numbers.lhs_contracting_dimensions)
  return 2.0 * math.prod(_shape(op.results[0])) * contracted


_COUNTERS = {'stablehlo.convolution': _convolution,
             'stablehlo.dot_general': _dot}


def count(lowered: Any) -> float:
  """FLOPs of the convolutions and matmuls of one run of `lowered`.

  Functions that JAX outlines (`func.call`) count once per call; a loop
  body would count once (the steps have none).

  Args:
    lowered: a `jax.stages.Lowered`, e.g. `jax.jit(f).lower(...)` or a
      pmapped step's (then per device).

  Returns:
    The FLOPs.
  """
  module = lowered.compiler_ir('stablehlo')
  own = collections.Counter()  # FLOPs in each function's own body.
  calls = collections.defaultdict(list)  # The functions each one calls.

  def visit(op: ir.Operation, function: str) -> None:
    name = op.name
    if name in _COUNTERS:
      own[function] += _COUNTERS[name](op)
    elif name == 'func.call':
      calls[function].append(
          ir.FlatSymbolRefAttr(op.attributes['callee']).value)
    for region in op.regions:
      for block in region.blocks:
        for inner in block.operations:
          visit(inner.operation, function)

  with module.context:
    for function in module.body.operations:
      symbol = ir.StringAttr(function.attributes['sym_name']).value
      visit(function.operation, symbol)

  def total(function: str) -> float:
    return own[function] + sum(total(callee) for callee in calls[function])
  return total('main')
