"""Reads the layers of a Caffe .caffemodel (a serialised NetParameter).

Both formats Caffe has written are read: the current one (`layer`, field
100, of LayerParameter) and the 2014 one bvlc_alexnet.caffemodel was
released in (`layers`, field 2, of V1LayerParameter, whose entries may
nest a V0LayerParameter). The messages are declared in `caffe_proto.py`.

Layout of Caffe's blobs: a convolution's weights are (out, in / group, kh,
kw), an InnerProduct's (out, in), with fc6's inputs flattened in (C, H, W)
order; biases are (out,). Old files give every blob four dimensions
((1, 1, out, in) for an InnerProduct), which `caffe_proto.squeeze_leading`
removes. Channels are BGR.
"""

from google.protobuf import message as protobuf_message
import numpy as np

from alexnet import errors
from alexnet.importers import caffe_proto


def _layer_entries(net) -> list[tuple[str, list]]:
  """(name, blobs) of every layer, in whichever format the file uses."""
  if len(net.layer):
    return [(layer.name, list(layer.blobs)) for layer in net.layer]
  entries = []
  for layer in net.layers:
    if layer.HasField('layer'):  # V0, nested in a V1 entry.
      entries.append((layer.layer.name, list(layer.layer.blobs)))
    else:
      entries.append((layer.name, list(layer.blobs)))
  return entries


def read_caffemodel(path: str) -> dict[str, list[np.ndarray]]:
  """The parameter blobs of every layer that has some.

  Args:
    path: a .caffemodel file.

  Returns:
    {layer name: [weights, bias]} as float32 arrays in Caffe's layout
    (module docstring), legacy 4-D shapes as stored.

  Raises:
    errors.WeightsError: not a NetParameter, no layer with weights, a
      layer name twice, or a blob whose values do not fill its shape.
  """
  with open(path, 'rb') as f:
    content = f.read()
  try:
    net = caffe_proto.NetParameter.FromString(content)
  except protobuf_message.DecodeError as error:
    raise errors.WeightsError(
        f'{path} is not a Caffe .caffemodel (a NetParameter): {error}.'
    ) from None
  layers = {}
  for name, blobs in _layer_entries(net):
    if not blobs:
      continue  # ReLU, LRN, pooling, dropout, data and loss layers.
    if name in layers:
      raise errors.WeightsError(f'{path}: layer {name!r} appears twice.')
    try:
      layers[name] = [caffe_proto.blob_array(blob) for blob in blobs]
    except ValueError as error:
      raise errors.WeightsError(f'{path}: layer {name!r}: {error}.') from None
  if not layers:
    raise errors.WeightsError(
        f'{path} holds no layer with weights (a .prototxt net description, '
        'or a NetParameter of another kind?).')
  return layers
