"""Maps a weights file's layers onto the two-tower parameters, shape-checked.

Both file layouts describe the grouped one-device net of
`alexnet/reference.py` (conv2, conv4, conv5 with two groups): this module
brings each layer into that net's layout (HWIO kernels, (in, out) dense
weights with fc6's rows in (H, W, C) order) and `reference.from_grouped`
splits the outputs into the towers, as the tests' oracle does. Every array
is checked against the shape the configured net needs, and a file that
does not fit is refused naming the layer and both shapes, in the file's
own layout.
"""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from alexnet import errors
from alexnet import model as model_lib
from alexnet import reference
from alexnet import steps
from alexnet.importers import caffe_proto

LAYERS = ('conv1', 'conv2', 'conv3', 'conv4', 'conv5', 'fc6', 'fc7', 'fc8')
# The file layouts: 'caffe' (.caffemodel) and 'npy' (the NumPy port).
FORMATS = ('caffe', 'npy')
_DESCRIBED = {'caffe': "Caffe's (out, in/group, kh, kw) and (out, in)",
              'npy': "the port's (kh, kw, in/group, out) and (in, out)"}


def grouped_shapes(config: ml_collections.ConfigDict,
                   num_classes: int) -> dict[str, dict[str, tuple]]:
  """{layer: {'kernel', 'bias'}} shapes of the configured net, grouped."""
  model = steps.create_model(config, num_classes)
  image = jnp.zeros((1, config.image_size, config.image_size, 3))

  def grouped():
    params = model.init(jax.random.key(0), image, train=False)['params']
    return reference.to_grouped(params)
  return jax.tree.map(lambda leaf: tuple(leaf.shape),
                      jax.eval_shape(grouped))


def _file_shape(fmt: str, grouped: tuple) -> tuple:
  """The shape a grouped-layout kernel has in the file's layout."""
  if fmt == 'npy' or len(grouped) == 1:
    return grouped
  if len(grouped) == 4:  # (kh, kw, in, out) -> (out, in, kh, kw).
    return (grouped[3], grouped[2], grouped[0], grouped[1])
  return grouped[::-1]  # (in, out) -> (out, in).


def _to_grouped(fmt: str, name: str, kernel: np.ndarray,
                maps: int) -> np.ndarray:
  """A kernel in the file's layout -> the grouped net's layout."""
  if fmt == 'npy':
    return kernel
  if kernel.ndim == 4:
    return kernel.transpose(2, 3, 1, 0)
  if name == 'fc6':
    # Caffe flattens pool5 as (C, H, W); the towers as (H, W, C).
    out, inputs = kernel.shape
    kernel = kernel.reshape(out, inputs // (maps * maps), maps, maps)
    kernel = kernel.transpose(0, 2, 3, 1).reshape(out, inputs)
  return kernel.T


def _checked(path: str, fmt: str, name: str, what: str, array: np.ndarray,
             want: tuple) -> np.ndarray:
  """`array` with legacy leading ones dropped, if its shape is `want`."""
  array = caffe_proto.squeeze_leading(array, len(want))
  if array.shape != want:
    raise errors.WeightsError(
        f'{path}: layer {name} {what} has shape {array.shape}, but the net '
        f'of this config needs {want} ({_DESCRIBED[fmt]} order). Is it '
        'another net, or does the config differ (width, image_size)?')
  return array


def _num_classes(path: str, layers: dict[str, list[np.ndarray]]) -> int:
  missing = [name for name in LAYERS if name not in layers]
  extra = sorted(set(layers) - set(LAYERS))
  if missing or extra:
    raise errors.WeightsError(
        f'{path} is not an AlexNet with layers {", ".join(LAYERS)}: '
        f'missing {missing or "none"}, extra layers with weights '
        f'{extra or "none"}.')
  for name in LAYERS:
    if len(layers[name]) != 2:
      raise errors.WeightsError(
          f'{path}: layer {name} has {len(layers[name])} arrays; expected 2 '
          '(weights and bias).')
  return int(layers['fc8'][1].size)


def tower_params(path: str, fmt: str, layers: dict[str, list[np.ndarray]],
                 config: ml_collections.ConfigDict) -> tuple[Any, int]:
  """The file's layers as the net's stacked tower parameters.

  Args:
    path: the file (named in refusals).
    fmt: its layout, one of FORMATS.
    layers: {layer: [weights, bias]} as read.
    config: the net to fit (configs/alexnet.py:caffe for bvlc_alexnet).

  Returns:
    (params with [2, ...] leaves as float32 numpy arrays, num_classes).

  Raises:
    errors.WeightsError: a missing or extra layer, or a shape that does not
      fit, naming the layer and both shapes.
    errors.ConfigError: a config whose net is not two towers.
  """
  if config.towers != 2:
    raise errors.ConfigError(
        f'config.towers={config.towers}: published AlexNet weights are the '
        'two-tower net; import them with config.towers=2.')
  num_classes = _num_classes(path, layers)
  want = grouped_shapes(config, num_classes)
  maps = model_lib.feature_map_size(config.image_size, config.pool_size,
                                    config.pool_stride)
  grouped = {}
  for name in LAYERS:
    kernel_shape, bias_shape = want[name]['kernel'], want[name]['bias']
    # An odd class count: the towers' fc8 has one unused unit, kept at 0.
    pad = bias_shape[0] - num_classes if name == 'fc8' else 0
    file_kernel = kernel_shape[:-1] + (kernel_shape[-1] - pad,)
    kernel = _checked(path, fmt, name, 'weights', layers[name][0],
                      _file_shape(fmt, file_kernel))
    bias = _checked(path, fmt, name, 'bias', layers[name][1],
                    (bias_shape[0] - pad,))
    kernel = _to_grouped(fmt, name, kernel, maps)
    grouped[name] = {
        'kernel': np.pad(kernel, [(0, 0)] * (kernel.ndim - 1) + [(0, pad)]),
        'bias': np.pad(bias, (0, pad))}
  params = reference.from_grouped(grouped, towers=2)
  return jax.tree.map(lambda x: np.asarray(x, np.float32), params), num_classes
