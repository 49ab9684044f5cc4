"""The few messages of Caffe's caffe.proto that hold a net's weights.

Declared here as descriptors and built into message classes by the
`protobuf` package at import time (no protoc, no generated code): only the
fields a weights file or a mean image needs, with Caffe's field numbers
(BVLC/caffe src/caffe/proto/caffe.proto). Fields not declared are kept as
unknown fields by the parser and ignored.

* NetParameter: `layer` (100) of LayerParameter (name 1, type 2 string,
  blobs 7), the current format; `layers` (2) of V1LayerParameter (name 4,
  type 5 enum, blobs 6), the 2014 format; a V1 entry may nest a
  V0LayerParameter as `layer` (1) (name 1, type 2 string, blobs 50).
* BlobProto: num 1, channels 2, height 3, width 4 (the legacy 4-D shape),
  data 5 (packed float), shape 7 (BlobShape: dim 1, packed int64),
  double_data 8 (packed double).
"""

from google.protobuf import descriptor_pb2
from google.protobuf import descriptor_pool
from google.protobuf import message_factory
import numpy as np

_FIELD = descriptor_pb2.FieldDescriptorProto
_PACKAGE = 'alexnet.caffe'
# (field name, number, type, repeated, message type name or None).
_SCHEMA = {
    'BlobShape': [('dim', 1, _FIELD.TYPE_INT64, True, None)],
    'BlobProto': [('num', 1, _FIELD.TYPE_INT64, False, None),
                  ('channels', 2, _FIELD.TYPE_INT64, False, None),
                  ('height', 3, _FIELD.TYPE_INT64, False, None),
                  ('width', 4, _FIELD.TYPE_INT64, False, None),
                  ('data', 5, _FIELD.TYPE_FLOAT, True, None),
                  ('shape', 7, _FIELD.TYPE_MESSAGE, False, 'BlobShape'),
                  ('double_data', 8, _FIELD.TYPE_DOUBLE, True, None)],
    'V0LayerParameter': [('name', 1, _FIELD.TYPE_STRING, False, None),
                         ('type', 2, _FIELD.TYPE_STRING, False, None),
                         ('blobs', 50, _FIELD.TYPE_MESSAGE, True,
                          'BlobProto')],
    # `type` is Caffe's LayerType enum; read as its number (CONVOLUTION=4,
    # INNER_PRODUCT=14) so that no value is dropped as unknown.
    'V1LayerParameter': [('layer', 1, _FIELD.TYPE_MESSAGE, False,
                          'V0LayerParameter'),
                         ('name', 4, _FIELD.TYPE_STRING, False, None),
                         ('type', 5, _FIELD.TYPE_INT32, False, None),
                         ('blobs', 6, _FIELD.TYPE_MESSAGE, True,
                          'BlobProto')],
    'LayerParameter': [('name', 1, _FIELD.TYPE_STRING, False, None),
                       ('type', 2, _FIELD.TYPE_STRING, False, None),
                       ('blobs', 7, _FIELD.TYPE_MESSAGE, True, 'BlobProto')],
    'NetParameter': [('name', 1, _FIELD.TYPE_STRING, False, None),
                     ('layers', 2, _FIELD.TYPE_MESSAGE, True,
                      'V1LayerParameter'),
                     ('layer', 100, _FIELD.TYPE_MESSAGE, True,
                      'LayerParameter')],
}


def _file_descriptor() -> descriptor_pb2.FileDescriptorProto:
  """The schema above as a proto2 file descriptor."""
  file = descriptor_pb2.FileDescriptorProto(
      name='alexnet/caffe_subset.proto', package=_PACKAGE, syntax='proto2')
  for message_name, fields in _SCHEMA.items():
    message = file.message_type.add(name=message_name)
    for name, number, kind, repeated, type_name in fields:
      field = message.field.add(
          name=name, number=number, type=kind,
          label=_FIELD.LABEL_REPEATED if repeated else _FIELD.LABEL_OPTIONAL)
      if type_name:
        field.type_name = f'.{_PACKAGE}.{type_name}'
      elif repeated:
        field.options.packed = True  # As Caffe declares them.
  return file


def _message_classes() -> dict[str, type]:
  pool = descriptor_pool.DescriptorPool()  # Private: no name clashes.
  pool.Add(_file_descriptor())
  return {name: message_factory.GetMessageClass(
      pool.FindMessageTypeByName(f'{_PACKAGE}.{name}')) for name in _SCHEMA}


_CLASSES = _message_classes()
NetParameter = _CLASSES['NetParameter']
BlobProto = _CLASSES['BlobProto']


def blob_array(blob) -> np.ndarray:
  """A BlobProto's values as a float32 array of the blob's shape.

  The shape is `shape.dim` when set, else the legacy (num, channels,
  height, width); old files store, e.g., an InnerProduct weight as
  (1, 1, out, in), so callers drop leading ones (`squeeze_leading`).

  Args:
    blob: a parsed `BlobProto`.

  Returns:
    The array; its size may not match the shape for a corrupt file, in
    which case a ValueError says so.
  """
  if blob.HasField('shape'):
    shape = tuple(blob.shape.dim)
  else:
    shape = (blob.num, blob.channels, blob.height, blob.width)
  values = blob.data if len(blob.data) else blob.double_data
  data = np.asarray(values, np.float32)
  if data.size != int(np.prod(shape)):
    raise ValueError(f'a blob of shape {shape} holds {data.size} values')
  return data.reshape(shape)


def squeeze_leading(array: np.ndarray, ndim: int) -> np.ndarray:
  """Drops leading axes of size 1 until `array` has at most `ndim` axes."""
  while array.ndim > ndim and array.shape[0] == 1:
    array = array[0]
  return array
