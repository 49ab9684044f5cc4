"""The NumPy port of bvlc_alexnet (bvlc_alexnet.npy), read without pickle.

The port is `np.save` of a dict {'conv1': [W, b], ...}: an .npy header
followed by a pickle of a 0-d object array. A weights file is untrusted
input, and even a pickle restricted to numpy's own reconstructors hands
numpy's C `__setstate__` whatever state the file chooses: an object array
whose state is shorter than its shape crashes the process, and a header
asking for 2**31 doubles makes numpy allocate them before anything is
checked. So this reader never unpickles: it interprets the few pickle
opcodes such a file holds (`_Machine`), builds dicts, lists, tuples,
strings and numbers itself, and turns each array's state into an array
only after checking that its data, which lies in the file, fills exactly
the shape of a numeric dtype. Nothing in the file is called, nothing it
names is imported, and no array is larger than the bytes the file holds:
memory stays within a small multiple of the file's size. Every refusal is
an `errors.WeightsError`.

Layout of the port: W is HWIO ((5, 5, 48, 256) for conv2: the grouped
kernel, both groups in one array) and fc weights are (in, out), fc6's rows
in (H, W, C) order; channels are BGR, as Caffe's.
"""

import io
import math
import pickle  # For its opcode names only: nothing is unpickled.
import struct
from typing import Any

import numpy as np

from alexnet import errors

# The globals a pickled dict of arrays refers to. numpy < 2 wrote
# numpy.core, numpy >= 2 numpy._core; Python 3's protocol 2 writes bytes as
# _codecs.encode(text, 'latin1').
_RECONSTRUCT = {('numpy.core.multiarray', '_reconstruct'),
                ('numpy._core.multiarray', '_reconstruct')}
_NDARRAY, _DTYPE, _ENCODE = ('numpy', 'ndarray'), ('numpy', 'dtype'), (
    '_codecs', 'encode')
# Element types a layer's arrays may have ('O8' is the container's).
_NUMERIC = {f'{kind}{size}' for kind, sizes in
            (('f', (2, 4, 8)), ('i', (1, 2, 4, 8)), ('u', (1, 2, 4, 8)))
            for size in sizes}
# The port is ~100 opcodes; a bound on them bounds the Python objects (and
# so the memory) a file of tiny opcodes could make.
_MAX_OPCODES = 100_000
_MAX_DIMENSIONS = 32


class _Refused(Exception):
  """What is wrong with the pickle, in words."""


class _Global:
  """A global the file named: only ever compared, never called."""

  def __init__(self, module: str, name: str):
    self.key = (module, name)


class _Dtype:
  """numpy.dtype(code) as the pickle builds it; BUILD sets its byte order."""

  def __init__(self, code: str):
    if code != 'O8' and code not in _NUMERIC:
      raise _Refused(f'it holds {code[:20]!r} data, not numbers')
    self.code, self.order = code, '|'


class _Array:
  """ndarray._reconstruct(...), filled by BUILD from a checked state."""

  def __init__(self):
    self.value = None


def _array(state: Any) -> Any:
  """The array (or, for object arrays, the items) a BUILD state describes."""
  if not (isinstance(state, tuple) and len(state) == 5):
    raise _Refused('an array state is not (version, shape, dtype, order, '
                   'data)')
  _, shape, dtype, fortran, data = state
  if not (isinstance(shape, tuple) and len(shape) <= _MAX_DIMENSIONS and
          all(type(n) is int and n >= 0 for n in shape)):  # pylint: disable=unidiomatic-typecheck
    raise _Refused('an array has a shape that is not a tuple of sizes')
  if not isinstance(dtype, _Dtype):
    raise _Refused('an array has no numpy dtype')
  count = math.prod(shape)
  if dtype.code == 'O8':
    if not isinstance(data, list) or len(data) != count:
      raise _Refused(f'an object array of shape {shape} does not hold '
                     f'{count} items')
    return data[0] if shape == () else list(data)
  if isinstance(data, str):  # Python 2's byte strings, read as latin1.
    data = data.encode('latin1')
  element = np.dtype(dtype.order.replace('|', '=') + dtype.code)
  if (not isinstance(data, (bytes, memoryview)) or
      len(data) != count * element.itemsize):
    raise _Refused(f'an array of shape {shape} and dtype {dtype.code} does '
                   'not hold its data')
  order = 'F' if fortran else 'C'
  # A read-only view of the file's bytes: nothing is allocated for it.
  return np.frombuffer(data, element).reshape(shape, order=order)


def _dtype_state(dtype: _Dtype, state: Any) -> None:
  """Takes the byte order from a dtype's BUILD state; refuses records."""
  if not (isinstance(state, tuple) and len(state) >= 5 and
          state[1] in ('<', '>', '|', '=') and state[3] is None and
          state[4] is None):
    raise _Refused('a dtype state is not a plain number type')
  dtype.order = state[1]


class _Machine:
  """Runs the pickle opcodes of a dict of arrays, and refuses all others."""

  def __init__(self, data: memoryview):
    self._data, self._at = data, 0
    self._stack: list[Any] = []
    self._marks: list[int] = []
    self._memo: dict[int, Any] = {}

  def _take(self, size: int) -> memoryview:
    """The next `size` bytes, not copied (an array's data stays in place)."""
    if size < 0 or self._at + size > len(self._data):
      raise _Refused('it ends in the middle of a value')
    self._at += size
    return self._data[self._at - size:self._at]

  def _unsigned(self, size: int) -> int:
    return int.from_bytes(self._take(size), 'little')

  def _pop_mark(self) -> list[Any]:
    start = self._marks.pop()
    items = self._stack[start:]
    del self._stack[start:]
    return items

  def run(self) -> Any:
    """The object the pickle builds."""
    for _ in range(_MAX_OPCODES):
      opcode = self._take(1).tobytes()
      if opcode == pickle.STOP:
        if len(self._stack) != 1 or self._marks:
          raise _Refused('it ends with an unbalanced stack')
        return self._stack[0]
      handler = _OPCODES.get(opcode)
      if handler is None:
        raise _Refused(f'it uses the pickle opcode {opcode!r}, which a dict '
                       'of arrays does not need')
      handler(self)
    raise _Refused(f'it has more than {_MAX_OPCODES} pickle opcodes')

  # --- the opcodes -------------------------------------------------------

  def _proto(self):
    if self._unsigned(1) > 5:
      raise _Refused('it uses an unknown pickle protocol')

  def _frame(self):
    self._take(8)  # A size hint of protocol 4 framing.

  def _global(self):
    line = []
    for _ in range(2):
      end = bytes(self._data[self._at:self._at + 256]).find(b'\n')
      if end < 0:
        raise _Refused('it names a global without a newline')
      line.append(str(self._take(end + 1)[:-1], 'latin1'))
    self._push_global(*line)

  def _stack_global(self):
    name, module = self._stack.pop(), self._stack.pop()
    if not (isinstance(module, str) and isinstance(name, str)):
      raise _Refused('it names a global with non-strings')
    self._push_global(module, name)

  def _push_global(self, module: str, name: str):
    key = (module, name)
    if key not in _RECONSTRUCT | {_NDARRAY, _DTYPE, _ENCODE}:
      raise _Refused(f'it refers to {module}.{name}, which a dict of arrays '
                     'does not need (a pickle can run code; nothing was run)')
    self._stack.append(_Global(module, name))

  def _reduce(self):
    arguments, function = self._stack.pop(), self._stack.pop()
    if not (isinstance(function, _Global) and isinstance(arguments, tuple)):
      raise _Refused('it calls something that is not a known global')
    if function.key in _RECONSTRUCT:
      if not (arguments and isinstance(arguments[0], _Global) and
              arguments[0].key == _NDARRAY):
        raise _Refused('it reconstructs something that is not an ndarray')
      self._stack.append(_Array())
    elif function.key == _DTYPE:
      if not (arguments and isinstance(arguments[0], str)):
        raise _Refused('it makes a dtype from a non-string')
      self._stack.append(_Dtype(arguments[0]))
    elif function.key == _ENCODE:
      if not (len(arguments) == 2 and isinstance(arguments[0], str) and
              arguments[1] in ('latin1', 'latin-1')):
        raise _Refused('it encodes text with a codec other than latin1')
      self._stack.append(arguments[0].encode('latin1'))
    else:
      raise _Refused(f'it calls {".".join(function.key)}')

  def _build(self):
    state, target = self._stack.pop(), self._stack[-1]
    if isinstance(target, _Dtype):
      _dtype_state(target, state)
    elif isinstance(target, _Array) and target.value is None:
      target.value = _array(state)
      self._stack[-1] = target.value
    else:
      raise _Refused('it sets the state of something not an array or dtype')

  def _get(self, index: int):
    value = self._memo[index]
    if isinstance(value, _Array) and value.value is not None:
      value = value.value
    self._stack.append(value)

  def _put(self, index: int):
    self._memo[index] = self._stack[-1]

  def _append(self, items: list[Any]):
    target = self._stack[-1]
    if not isinstance(target, list):
      raise _Refused('it appends to something not a list')
    target.extend(items)

  def _set_items(self, items: list[Any]):
    target = self._stack[-1]
    if not isinstance(target, dict) or len(items) % 2:
      raise _Refused('it sets items of something not a dict')
    for key, value in zip(items[::2], items[1::2]):
      if not isinstance(key, (str, int)):
        raise _Refused('a dict has a key that is not a string')
      target[key] = value

  def _text(self, size_bytes: int):
    self._stack.append(str(self._take(self._unsigned(size_bytes)), 'utf-8',
                           'surrogatepass'))

  def _string(self, size_bytes: int):  # Python 2's str, read as latin1.
    self._stack.append(str(self._take(self._unsigned(size_bytes)), 'latin1'))

  def _bytes(self, size_bytes: int):
    self._stack.append(self._take(self._unsigned(size_bytes)))

  def _long1(self):
    size = self._unsigned(1)
    if size > 8:
      raise _Refused('it holds an integer wider than 64 bits')
    self._stack.append(int.from_bytes(self._take(size), 'little',
                                      signed=True))

  def _tuple(self, size: int):
    items = self._stack[len(self._stack) - size:] if size else []
    if len(items) != size:
      raise _Refused('it builds a tuple from an empty stack')
    del self._stack[len(self._stack) - size:]
    self._stack.append(tuple(items))


# The opcodes of protocols 2-4 that a pickled dict of arrays uses, by
# pickle's names for them; any other one is refused.
# pylint: disable=protected-access
_OPCODES = {
    pickle.PROTO: _Machine._proto,
    pickle.FRAME: _Machine._frame,
    pickle.GLOBAL: _Machine._global,
    pickle.STACK_GLOBAL: _Machine._stack_global,
    pickle.REDUCE: _Machine._reduce,
    pickle.BUILD: _Machine._build,
    pickle.MARK: lambda m: m._marks.append(len(m._stack)),
    pickle.POP: lambda m: m._stack.pop(),
    pickle.NONE: lambda m: m._stack.append(None),
    pickle.NEWTRUE: lambda m: m._stack.append(True),
    pickle.NEWFALSE: lambda m: m._stack.append(False),
    pickle.BININT1: lambda m: m._stack.append(m._unsigned(1)),
    pickle.BININT2: lambda m: m._stack.append(m._unsigned(2)),
    pickle.BININT: lambda m: m._stack.append(
        int.from_bytes(m._take(4), 'little', signed=True)),
    pickle.LONG1: _Machine._long1,
    pickle.BINFLOAT: lambda m: m._stack.append(
        struct.unpack('>d', m._take(8))[0]),
    pickle.SHORT_BINUNICODE: lambda m: m._text(1),
    pickle.BINUNICODE: lambda m: m._text(4),
    pickle.BINUNICODE8: lambda m: m._text(8),
    pickle.SHORT_BINSTRING: lambda m: m._string(1),
    pickle.BINSTRING: lambda m: m._string(4),
    pickle.SHORT_BINBYTES: lambda m: m._bytes(1),
    pickle.BINBYTES: lambda m: m._bytes(4),
    pickle.BINBYTES8: lambda m: m._bytes(8),
    pickle.EMPTY_TUPLE: lambda m: m._tuple(0),
    pickle.TUPLE1: lambda m: m._tuple(1),
    pickle.TUPLE2: lambda m: m._tuple(2),
    pickle.TUPLE3: lambda m: m._tuple(3),
    pickle.TUPLE: lambda m: m._stack.append(tuple(m._pop_mark())),
    pickle.EMPTY_LIST: lambda m: m._stack.append([]),
    pickle.EMPTY_DICT: lambda m: m._stack.append({}),
    pickle.APPEND: lambda m: m._append([m._stack.pop()]),
    pickle.APPENDS: lambda m: m._append(m._pop_mark()),
    pickle.SETITEM: lambda m: m._set_items([m._stack.pop(-2), m._stack.pop()]),
    pickle.SETITEMS: lambda m: m._set_items(m._pop_mark()),
    pickle.BINPUT: lambda m: m._put(m._unsigned(1)),
    pickle.LONG_BINPUT: lambda m: m._put(m._unsigned(4)),
    pickle.MEMOIZE: lambda m: m._put(len(m._memo)),
    pickle.BINGET: lambda m: m._get(m._unsigned(1)),
    pickle.LONG_BINGET: lambda m: m._get(m._unsigned(4)),
}
# pylint: enable=protected-access


def _unpickle(path: str, content: bytes) -> Any:
  """The object an .npy file of dtype object holds, read by `_Machine`."""
  header = io.BytesIO(content)
  try:
    version = np.lib.format.read_magic(header)
    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                   else np.lib.format.read_array_header_2_0)
    shape, _, dtype = read_header(header)
  except ValueError as error:
    raise errors.WeightsError(
        f'{path} is not an .npy file ({error}).') from None
  if not dtype.hasobject:
    raise errors.WeightsError(
        f'{path} holds one {dtype} array of shape {shape}, not the dict '
        "of layers {'conv1': [W, b], ...} of bvlc_alexnet.npy.")
  try:
    return _Machine(memoryview(content)[header.tell():]).run()
  except (_Refused, IndexError, KeyError, ValueError, TypeError,
          UnicodeError) as error:
    # Anything but _Refused is a malformed opcode stream (an empty stack, a
    # memo index never put, bad text, an unhashable key).
    reason = str(error) if isinstance(error, _Refused) else (
        f'it is not a well-formed pickle ({type(error).__name__})')
    raise errors.WeightsError(f'refused to load {path}: {reason}.') from None


def read_npy(path: str) -> dict[str, list[np.ndarray]]:
  """The layers of a bvlc_alexnet.npy-style dict, as float32 arrays.

  Args:
    path: the .npy file.

  Returns:
    {layer name: [weights, bias]} in the port's layout (module docstring),
    read-only where the file holds float32.

  Raises:
    errors.WeightsError: not such a file, or a pickle that holds anything but a dict of lists of numeric arrays
      (refused before any of it is used).
    OSError: the file cannot be read.
  """
  with open(path, 'rb') as f:
    content = f.read()
  layers = _unpickle(path, content)
  if not isinstance(layers, dict):
    raise errors.WeightsError(
        f'{path} holds a {type(layers).__name__}, not a dict of layers.')
  result = {}
  for name, blobs in layers.items():
    if not (isinstance(blobs, (list, tuple)) and
            all(isinstance(b, np.ndarray) for b in blobs)):
      raise errors.WeightsError(
          f'{path}: layer {name!r} is not a list of numeric arrays [W, b].')
    # float32 data stays a view of the file's bytes (read-only).
    result[str(name)] = [np.asarray(b, np.float32) for b in blobs]
  return result
