"""The NumPy port of bvlc_alexnet (bvlc_alexnet.npy), read without pickle's
power to run code.

The port is `np.save` of a dict {'conv1': [W, b], ...}: an .npy header
followed by a pickle of a 0-d object array. Unpickling an untrusted file
can call any importable function, so this reader parses the header with
numpy's header parser and unpickles the rest with an unpickler that knows
only what such a file holds: dicts, lists, strings, numbers, numpy arrays
and dtypes. Any other global (os.system, eval, ...) stops it with a
`errors.WeightsError` before anything is called. `np.load(allow_pickle=True)`
is never used on the file.

Layout of the port: W is HWIO ((5, 5, 48, 256) for conv2: the grouped
kernel, both groups in one array) and fc weights are (in, out), fc6's rows
in (H, W, C) order; channels are BGR, as Caffe's.
"""

import codecs
import pickle

import numpy as np
from numpy._core import multiarray

from alexnet import errors

# The globals a pickled dict of float arrays refers to, and nothing else.
# numpy < 2 wrote numpy.core, numpy >= 2 numpy._core; Python 3's protocol 2
# writes bytes as _codecs.encode(text, 'latin1').
_ALLOWED = {
    ('numpy.core.multiarray', '_reconstruct'): multiarray._reconstruct,
    ('numpy._core.multiarray', '_reconstruct'): multiarray._reconstruct,
    ('numpy', 'ndarray'): np.ndarray,
    ('numpy', 'dtype'): np.dtype,
    ('_codecs', 'encode'): codecs.encode,
}


class _ArraysOnlyUnpickler(pickle.Unpickler):
  """Resolves only the globals in `_ALLOWED`."""

  def find_class(self, module: str, name: str):
    try:
      return _ALLOWED[(module, name)]
    except KeyError:
      raise pickle.UnpicklingError(
          f'it refers to {module}.{name}, which a dict of arrays does not '
          'need (a pickle can run code; nothing was run)') from None

  def persistent_load(self, pid):
    raise pickle.UnpicklingError('it has persistent ids')


def _unpickle(path: str) -> object:
  """The object an .npy file of dtype object holds, unpickled safely."""
  with open(path, 'rb') as f:
    try:
      version = np.lib.format.read_magic(f)
      read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                     else np.lib.format.read_array_header_2_0)
      shape, _, dtype = read_header(f)
    except ValueError as error:
      raise errors.WeightsError(
          f'{path} is not an .npy file ({error}).') from None
    if not dtype.hasobject:
      raise errors.WeightsError(
          f'{path} holds one {dtype} array of shape {shape}, not the dict '
          "of layers {'conv1': [W, b], ...} of bvlc_alexnet.npy.")
    try:
      # latin1: the port was pickled by Python 2, whose byte strings hold
      # the arrays' raw data.
      array = _ArraysOnlyUnpickler(f, encoding='latin1').load()
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError,
            AttributeError) as error:
      raise errors.WeightsError(
          f'refused to load {path}: {error}.') from None
  if not isinstance(array, np.ndarray) or array.shape != ():
    raise errors.WeightsError(
        f'{path} holds a {type(array).__name__}, not a pickled dict.')
  return array.item()


def read_npy(path: str) -> dict[str, list[np.ndarray]]:
  """The layers of a bvlc_alexnet.npy-style dict, as float32 arrays.

  Args:
    path: the .npy file.

  Returns:
    {layer name: [weights, bias]} in the port's layout (module docstring).

  Raises:
    errors.WeightsError: not such a file, or a pickle that refers to
      anything but arrays (refused before any of it runs).
  """
  layers = _unpickle(path)
  if not isinstance(layers, dict):
    raise errors.WeightsError(
        f'{path} holds a {type(layers).__name__}, not a dict of layers.')
  result = {}
  for name, blobs in layers.items():
    if not (isinstance(blobs, (list, tuple)) and
            all(isinstance(b, np.ndarray) for b in blobs)):
      raise errors.WeightsError(
          f'{path}: layer {name!r} is not a list of arrays [W, b].')
    result[str(name)] = [np.asarray(b, np.float32) for b in blobs]
  return result
