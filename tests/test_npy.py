"""A weights file is untrusted input: the .npy reader runs nothing in it.

The NumPy port of bvlc_alexnet is a pickle, and unpickling can run any code.
A pickle that would run a command, and crafted files that would crash numpy,
allocate far more memory than the file holds or pass off other objects as
weights, are each refused with one error line, nothing run; the port's own
pickles (protocols 2 to 4, big-endian or Fortran-ordered arrays) read as
float32.
"""

import codecs
import os
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest

from alexnet import errors
from alexnet.importers import checkpoint as importer
from alexnet.importers import npy


class _RunsACommand:
  """Unpickles into os.system(...): what a malicious weights file does."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f'touch {self.marker}',))


def _write_pickle(path, content, protocol=2):
  """An .npy of dtype object holding `content` pickled."""
  with open(path, 'wb') as f:
    np.lib.format.write_array_header_1_0(
        f, {'descr': '|O', 'fortran_order': False, 'shape': ()})
    pickle.dump(content, f, protocol=protocol)
  return str(path)


def test_a_pickle_that_runs_code_is_refused_unrun(tiny, repo, tmp_path):
  config = tiny()
  marker = tmp_path / 'ran'
  evil = _write_pickle(tmp_path / 'evil.npy',
                       {'conv1': [_RunsACommand(marker)]})
  with pytest.raises(errors.WeightsError, match='system'):
    importer.read_params(config, evil)
  command = [sys.executable, 'main.py', '--config=configs/alexnet.py:tiny',
             '--mode=import', f'--weights={evil}',
             f'--workdir={tmp_path / "run"}']
  done = subprocess.run(command, cwd=repo, capture_output=True, text=True)
  assert done.returncode == 1 and 'Traceback' not in done.stderr
  assert done.stderr.strip().splitlines()[-1].startswith(
      f'error: refused to load {evil}: it refers to ')
  assert not marker.exists()
  # The same dict of arrays, pickled safely, is read.
  np.save(tmp_path / 'ok.npy', {'a': [np.ones(2)]}, allow_pickle=True)
  with pytest.raises(errors.WeightsError, match=r"missing \['conv1'"):
    importer.read_params(config, str(tmp_path / 'ok.npy'))


# --- Crafted .npy files: nothing in them may crash, balloon or trace back ---

class _Reduces:
  """Pickles as `function(*arguments)`, then BUILD with `state` if given:
  the values a crafted file chooses, with the globals the reader knows."""

  def __init__(self, function, arguments, state=None):
    self.reduction = (function, arguments) + ((state,) if state else ())

  def __reduce__(self):
    return self.reduction


def _array_state(shape, dtype, data):
  """An ndarray as the file rebuilds it: _reconstruct, then BUILD(state)."""
  return _Reduces(np._core.multiarray._reconstruct, (np.ndarray, (0,), b'b'),
                  (1, shape, np.dtype(dtype), False, data))


# Reads a weights file in a child process (a crash must fail the test, not
# end pytest) under a 4 GiB address-space limit (a reader that allocates
# what the file asks for fails here instead of swapping the machine), and
# prints the error and the resident memory the read added.
_READ_IN_CHILD = '''
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
from alexnet import errors
from alexnet.importers import npy
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
  npy.read_npy(sys.argv[1])
  print('read')
except errors.WeightsError as error:
  print('error:', error)
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print('grown KiB:', grown)
'''


def _read_in_child(repo, path):
  """(error line, KiB of resident memory the read added) from a child."""
  done = subprocess.run([sys.executable, '-c', _READ_IN_CHILD, path],
                        cwd=repo, capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, OPENBLAS_NUM_THREADS='1'))
  assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
  line, grown = done.stdout.strip().splitlines()
  return line, int(grown.split(':')[1])


def test_an_object_array_shorter_than_its_shape_is_refused_not_a_crash(
    repo, tmp_path):
  # numpy's C __setstate__ reads past the end of a short object list: on
  # a reader that lets it see this state, the process dies (SIGSEGV).
  path = _write_pickle(tmp_path / 'short.npy',
                       _array_state((1 << 20,), object, []))
  line, _ = _read_in_child(repo, path)
  assert line == (f'error: refused to load {path}: an object array of shape '
                  f'({1 << 20},) does not hold {1 << 20} items.')


@pytest.mark.parametrize('array, reason', [
    # numpy.ndarray((2**31,), 'f8') called by REDUCE: 16 GiB of doubles.
    (_Reduces(np.ndarray, ((1 << 31,), 'f8')),
     'it calls numpy.ndarray'),
    # The same array's state with 8 bytes of data.
    (_array_state((1 << 31,), 'f8', b'\0' * 8),
     f'an array of shape ({1 << 31},) and dtype f8 does not hold its data'),
])
def test_an_array_bigger_than_its_file_is_refused_in_little_memory(
    repo, tmp_path, array, reason):
  path = _write_pickle(tmp_path / 'huge.npy', {'conv1': [array]})
  assert os.path.getsize(path) < 400
  line, grown = _read_in_child(repo, path)
  assert line == f'error: refused to load {path}: {reason}.'
  assert grown < 32 << 10, f'{grown} KiB'


@pytest.mark.parametrize('content, reason', [
    # _codecs.encode is allowed for latin1 bytes only.
    ({'conv1': [_Reduces(codecs.encode, ('text', 'no-such-codec'))]},
     'it encodes text with a codec other than latin1'),
    ({'conv1': [_Reduces(eval, ('1',))]},
     'it refers to __builtin__.eval'),
    ({'conv1': [_array_state((2,), 'f4', b'\0' * 8), 'text']},
     "layer 'conv1' is not a list of numeric arrays"),
])
def test_a_file_of_anything_but_numbers_is_one_error(tmp_path, content,
                                                     reason):
  path = _write_pickle(tmp_path / 'odd.npy', content)
  with pytest.raises(errors.WeightsError, match=re.escape(reason)):
    npy.read_npy(path)


def test_layers_of_strings_or_objects_are_refused(tmp_path):
  for layer, reason in (
      (np.array(['a', 'b']), "it holds 'U1' data, not numbers"),
      (np.array([1.0, 'a'], dtype=object),
       "layer 'conv1' is not a list of numeric arrays")):
    path = str(tmp_path / 'layers.npy')
    np.save(path, {'conv1': [layer]}, allow_pickle=True)
    with pytest.raises(errors.WeightsError, match=re.escape(reason)):
      npy.read_npy(path)


def test_the_ports_pickles_read_as_float32(tmp_path):
  """np.save's protocol 3, Python 2's protocol 2 (latin1 byte strings) and
  protocol 4, big-endian and Fortran-ordered arrays: the same values."""
  weights = np.arange(24, dtype=np.float64).reshape(2, 3, 4)
  layers = {'conv1': [weights.astype('>f4'), np.ones(4, np.float16)],
            'fc8': (np.asfortranarray(weights[0]), np.arange(3))}
  container = np.empty((), object)
  container[()] = layers
  paths = [str(tmp_path / 'saved.npy')]
  np.save(paths[0], layers, allow_pickle=True)
  for protocol in (2, 4):
    paths.append(_write_pickle(tmp_path / f'protocol{protocol}.npy',
                               container, protocol))
  for path in paths:
    read = npy.read_npy(path)
    assert list(read) == ['conv1', 'fc8'], path
    for name, blobs in layers.items():
      for got, want in zip(read[name], blobs, strict=True):
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
