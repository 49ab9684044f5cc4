"""Imported bvlc_alexnet weights give the logits of Caffe's own forward.

Random weights with bvlc_alexnet's real shapes are written in each format
the importer reads: the 2014 V1 .caffemodel, the current .caffemodel, and
the NumPy port's pickled dict. The files are encoded here by hand from
Caffe's field numbers (not with the importer's schema), and the oracle is
an independent forward with Caffe's semantics: NCHW grouped convolutions
(`feature_group_count=2` on OIHW weights), the LRN across all channels with
k=1 and alpha/5, BGR input minus the BGR mean image, the centre crop at
offset 14 and fc6 reading pool5 flattened in (C, H, W) order. The imported
net (two towers, the configs/alexnet.py:caffe switches, the mean read from
a .binaryproto) must match it on one device and on a tower pair, where
the LRN exchanges the towers' edge channels.

What the .npy reader refuses in an untrusted file is tested in test_npy.py.
"""

import hashlib
import logging
import os
import shutil
import subprocess
import sys

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from alexnet import errors
from alexnet import parallel
from alexnet import steps
from alexnet.data import colour
from alexnet.data import on_device
from alexnet.importers import checkpoint as importer
from alexnet.importers import layout as layout_lib
from configs import alexnet as configs
import input_pipeline
import main
import train

# bvlc_alexnet's layers: (Caffe weight shape, groups, stride, pad).
CONVS = {'conv1': ((96, 3, 11, 11), 1, 4, 0),
         'conv2': ((256, 48, 5, 5), 2, 1, 2),
         'conv3': ((384, 256, 3, 3), 1, 1, 1),
         'conv4': ((384, 192, 3, 3), 2, 1, 1),
         'conv5': ((256, 192, 3, 3), 2, 1, 1)}
DENSE = {'fc6': (4096, 9216), 'fc7': (4096, 4096), 'fc8': (1000, 4096)}
RESIZE, CROP, BATCH = 256, 227, 2
# Caffe's V1LayerParameter.LayerType numbers.
V1_TYPES = {'CONVOLUTION': 4, 'INNER_PRODUCT': 14, 'RELU': 18}


# --- Caffe's wire format, written by hand (protobuf encoding rules) --------

def _varint(value):
  out = bytearray()
  while True:
    low, value = value & 0x7F, value >> 7
    out.append(low | (0x80 if value else 0))
    if not value:
      return bytes(out)


def _field(number, payload):
  """A length-delimited field (wire type 2)."""
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _int(number, value):
  return _varint(number << 3) + _varint(value)


def _blob(array, legacy):
  """BlobProto: legacy num/channels/height/width (1-4) or shape (7)."""
  data = _field(5, np.asarray(array, '<f4').tobytes())  # Packed floats.
  if legacy:  # Old Caffe: always 4-D, e.g. (1, 1, out, in) for fc.
    dims = (1,) * (4 - array.ndim) + array.shape
    return b''.join(_int(n + 1, d) for n, d in enumerate(dims)) + data
  return _field(7, _field(1, b''.join(map(_varint, array.shape)))) + data


def _v1_layer(name, kind, blobs):
  body = _field(4, name.encode()) + _int(5, V1_TYPES[kind])
  return _field(2, body + b''.join(_field(6, _blob(b, True)) for b in blobs))


def _new_layer(name, kind, blobs):
  body = _field(1, name.encode()) + _field(2, kind.encode())
  return _field(100, body + b''.join(_field(7, _blob(b, False))
                                     for b in blobs))


def _write_caffemodel(path, weights, v1):
  """A NetParameter with the layers, a parameterless ReLU among them."""
  parts = [_field(1, b'AlexNet')]
  for name, blobs in weights.items():
    if v1:
      kind = 'CONVOLUTION' if name.startswith('conv') else 'INNER_PRODUCT'
      parts += [_v1_layer(name, kind, blobs),
                _v1_layer(f'relu_{name}', 'RELU', [])]
    else:
      kind = 'Convolution' if name.startswith('conv') else 'InnerProduct'
      parts += [_new_layer(name, kind, blobs),
                _new_layer(f'relu_{name}', 'ReLU', [])]
  with open(path, 'wb') as f:
    f.write(b''.join(parts))


def _write_npy(path, weights, maps):
  """The NumPy port's layout: HWIO kernels, (in, out), fc6 rows (H, W, C)."""
  port = {}
  for name, (w, b) in weights.items():
    if w.ndim == 4:
      w = w.transpose(2, 3, 1, 0)
    elif name == 'fc6':
      w = w.reshape(w.shape[0], -1, maps, maps).transpose(2, 3, 1, 0)
      w = w.reshape(-1, w.shape[-1])
    else:
      w = w.T
    port[name] = [w, b]
  np.save(path, port, allow_pickle=True)


def _write_mean(path, mean_bgr_chw):
  with open(path, 'wb') as f:
    f.write(_blob(mean_bgr_chw[None], legacy=True))


def _random_weights(rng, convs, dense):
  """Caffe-layout weights, He-scaled so every layer stays in range."""
  weights = {}
  for name, shape in [(n, s) for n, (s, *_) in convs.items()] + list(
      dense.items()):
    fan_in = int(np.prod(shape[1:]))
    w = rng.standard_normal(shape, np.float32) * np.sqrt(2.0 / fan_in)
    weights[name] = [w, rng.standard_normal(shape[0], np.float32) * 0.1]
  return weights


# --- The oracle: Caffe's forward --------------------------------------------

def _caffe_lrn(x, size=5, alpha=1e-4, beta=0.75, k=1.0):
  """Caffe's LRN (ACROSS_CHANNELS) on NCHW: k + alpha/size * window sum."""
  half = size // 2
  padded = jnp.pad(jnp.square(x), ((0, 0), (half, half), (0, 0), (0, 0)))
  window = sum(padded[:, i:i + x.shape[1]] for i in range(size))
  return x / (k + alpha / size * window) ** beta


def _caffe_forward(weights, convs, squares, mean_bgr_chw, crop):
  """Logits of Caffe's net for uint8 RGB squares [B, Z, Z, 3]."""
  x = jnp.asarray(squares[..., ::-1].transpose(0, 3, 1, 2), jnp.float32)
  x = x - mean_bgr_chw
  top = (x.shape[2] - crop) // 2
  return np.asarray(_caffe_logits(weights, convs,
                                  x[:, :, top:top + crop, top:top + crop]))


def _caffe_logits(weights, convs, x):
  """Caffe's net on prepared (BGR, mean-subtracted) NCHW inputs."""
  pool = lambda x: lax.reduce_window(x, -jnp.inf, lax.max, (1, 1, 3, 3),
                                     (1, 1, 2, 2), 'VALID')
  for name, (_, groups, stride, pad) in convs.items():
    w, b = weights[name]
    x = lax.conv_general_dilated(
        x, w, (stride, stride), [(pad, pad)] * 2,
        dimension_numbers=('NCHW', 'OIHW', 'NCHW'),
        feature_group_count=groups, precision=lax.Precision.HIGHEST)
    x = jax.nn.relu(x + b[None, :, None, None])
    if name in ('conv1', 'conv2'):
      x = pool(_caffe_lrn(x))
  x = pool(x).reshape(x.shape[0], -1)  # (C, H, W) order.
  for name in ('fc6', 'fc7', 'fc8'):
    w, b = weights[name]
    x = jnp.dot(x, w.T, precision=lax.Precision.HIGHEST) + b
    x = jax.nn.relu(x) if name != 'fc8' else x
  return x


def _assert_close(got, want, floor=1.0):
  scale = np.abs(want).max()
  assert scale > floor  # Logits that carry signal, not a vanished net.
  np.testing.assert_array_less(np.abs(got - want).max(), 1e-4 * scale)


# --- Full size: each format, one device and a tower pair -------------------

def _caffe_config(mean_path):
  config = configs.get_config('caffe')
  config.mean_file = mean_path
  return config


def _forward(config, params, squares, num_classes, layout=None):
  """Our logits: mean subtracted on the device, BGR views, the towers."""
  mean = colour.file_mean_image(config)
  views = on_device.eval_images({'image': squares}, mean, config.image_size,
                                False, config.channel_order)[:, 0]
  if layout is None:
    model = steps.create_model(config, num_classes)
    return np.asarray(jax.jit(lambda p, v: model.apply(
        {'params': p}, v, train=False))(params, views))
  model = steps.create_model(config, num_classes, layout.exchange)
  mapped = layout.pmap(lambda p, v: model.apply({'params': p}, v,
                                                train=False),
                       in_axes=(0, None))
  return np.asarray(mapped(layout.shard_towers(params), views))


@pytest.fixture(scope='module')
def full_size(tmp_path_factory):
  """bvlc_alexnet-shaped random weights in all three files, and inputs."""
  root = tmp_path_factory.mktemp('bvlc')
  rng = np.random.default_rng(0)
  weights = _random_weights(rng, CONVS, DENSE)
  paths = {'v1': str(root / 'v1.caffemodel'),
           'current': str(root / 'current.caffemodel'),
           'npy': str(root / 'port.npy')}
  _write_caffemodel(paths['v1'], weights, v1=True)
  _write_caffemodel(paths['current'], weights, v1=False)
  _write_npy(paths['npy'], weights, maps=6)
  mean = rng.uniform(60, 180, (3, RESIZE, RESIZE)).astype(np.float32)
  _write_mean(str(root / 'mean.binaryproto'), mean)
  squares = rng.integers(0, 256, (BATCH, RESIZE, RESIZE, 3), np.uint8)
  oracle = _caffe_forward(weights, CONVS, squares, mean, CROP)
  return paths, str(root / 'mean.binaryproto'), squares, oracle


def test_caffes_logits_on_one_device_and_each_format_alike(full_size):
  """V1 file: Caffe's logits; the other two files: the very same params."""
  paths, mean_path, squares, oracle = full_size
  config = _caffe_config(mean_path)
  params, num_classes, fmt = importer.read_params(config, paths['v1'])
  assert (num_classes, fmt) == (1000, 'caffe')
  _assert_close(_forward(config, params, squares, num_classes), oracle)
  for other in ('current', 'npy'):
    other_params, _, _ = importer.read_params(config, paths[other])
    jax.tree.map(np.testing.assert_array_equal, other_params, params)


def test_caffes_logits_on_a_tower_pair(full_size):
  """One tower per device: the LRN windows cross through the exchange.

  With XLA's convolutions (the one-device test runs the CPU's patches).
  """
  paths, mean_path, squares, oracle = full_size
  config = _caffe_config(mean_path)
  config.conv_impl = 'xla'
  params, num_classes, _ = importer.read_params(config, paths['npy'])
  layout = parallel.Layout.create(True, jax.devices()[:2])
  assert layout.towers_per_device == 1
  logits = _forward(config, params, squares, num_classes, layout)
  for device_logits in logits:
    _assert_close(device_logits, oracle)


# --- Small net: the checkpoint, --mode=eval, training, refusals ------------

TINY_CONVS = {'conv1': ((12, 3, 11, 11), 1, 4, 0),
              'conv2': ((32, 6, 5, 5), 2, 1, 2),
              'conv3': ((48, 32, 3, 3), 1, 1, 1),
              'conv4': ((48, 24, 3, 3), 2, 1, 1),
              'conv5': ((32, 24, 3, 3), 2, 1, 1)}
TINY_DENSE = {'fc6': (512, 32), 'fc7': (512, 512), 'fc8': (10, 512)}


@pytest.fixture(scope='module')
def small(tiny, tmp_path_factory):
  """Caffe-semantics tiny config, its weights file and its mean (.npy)."""
  root = tmp_path_factory.mktemp('small')
  rng = np.random.default_rng(1)
  weights = _random_weights(rng, TINY_CONVS, TINY_DENSE)
  path = str(root / 'small.caffemodel')
  _write_caffemodel(path, weights, v1=True)
  mean = rng.uniform(0, 20, (3, 76, 76)).astype(np.float32)
  np.save(root / 'mean.npy', mean)
  # A tower pair (of the four fake devices): the LRN exchanges edges.
  # (XLA's convolutions: on CPU they compile in half the time.)
  config = tiny(mean_file=str(root / 'mean.npy'), channel_order='bgr',
                num_devices=2, conv_impl='xla')
  config.lrn.update(k=1.0, alpha_over_size=True, across_towers=True)
  return config, path, weights, mean


def test_import_checkpoint_evaluates_and_trains(small, tmp_path, capsys,
                                                caplog):
  """--mode=eval scores the import as Caffe would; training starts there."""
  config, path, weights, mean = small
  workdir = str(tmp_path / 'run')
  main.run(config, workdir, mode='import', weights=path)
  with open(path, 'rb') as f:
    sha1 = hashlib.sha1(f.read()).hexdigest()
  printed = capsys.readouterr().out.splitlines()
  assert printed[:2] == [
      f'{path}: sha1 {sha1}', '  not the published bvlc_alexnet.caffemodel '
      f'(sha1 {importer.PUBLISHED_SHA1})']
  assert printed[2].startswith('Imported 10 classes (caffe layout)')
  params, _, _ = importer.read_params(config, path)

  step, results = train.evaluate_checkpoint(config, workdir)
  batches = input_pipeline.create_eval_iterable(config, 'eval', replicas=[0],
                                                num_replicas=1)
  logits, labels = [], []
  for batch in batches:
    keep = batch['mask'][0]
    logits.append(_caffe_forward(weights, TINY_CONVS,
                                 batch['image'][0][keep], mean, 67))
    labels.append(batch['label'][0][keep])
  logits, labels = np.concatenate(logits), np.concatenate(labels)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  assert step == 0
  np.testing.assert_allclose(results['eval']['centre_loss'], loss.mean(),
                             rtol=1e-4)
  np.testing.assert_allclose(results['eval']['centre_top1_error'],
                             np.mean(logits.argmax(-1) != labels))

  # One step at a negligible rate: the run continued from the import,
  # adopting it without a word on its (empty) data recipe.
  config = config.copy_and_resolve_references()
  config.update(num_train_steps=1, learning_rate=1e-9)
  caplog.set_level(logging.INFO, logger='absl')
  state = train.train_and_evaluate(config, workdir)
  assert state.step == 1
  assert 'Resuming from step 0 ' in caplog.text
  assert 'recipe' not in caplog.text
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               state.params, params)


def test_the_paper_lrn_is_not_caffes(small):
  """The switches matter: the paper's LRN moves these weights' logits."""
  config, path, weights, mean = small
  rng = np.random.default_rng(2)
  squares = rng.integers(0, 256, (BATCH, 76, 76, 3), np.uint8)
  oracle = _caffe_forward(weights, TINY_CONVS, squares, mean, 67)
  params, num_classes, _ = importer.read_params(config, path)
  paper = config.copy_and_resolve_references()
  paper.lrn.update(k=2.0, alpha_over_size=False, across_towers=False)
  logits = _forward(paper, params, squares, num_classes)
  assert np.abs(logits - oracle).max() > 1e-3 * np.abs(oracle).max()


def test_gradients_on_tower_pairs_equal_caffes(small):
  """Across-tower LRN in training: two replicas of a tower pair.

  The gradient of Caffe's forward, w.r.t. its own weight layout, mapped by
  the importer like weights, equals the towers' gradient.
  """
  config, path, weights, _ = small
  rng = np.random.default_rng(3)
  images = rng.normal(0, 50, (4, 3, 67, 67)).astype(np.float32)
  labels = rng.integers(0, 10, 4)

  def caffe_loss(weights):
    logits = _caffe_logits(weights, TINY_CONVS, images)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, labels).mean()
  caffe_grads = jax.tree.map(np.asarray, jax.grad(caffe_loss)(weights))
  want, _ = layout_lib.tower_params('grads', 'caffe', caffe_grads, config)

  layout = parallel.Layout.create(True, jax.devices()[:4])
  assert (layout.num_replicas, layout.towers_per_device) == (2, 1)
  model = steps.create_model(config, 10, layout.exchange)

  def loss_fn(params, x, y):
    logits = model.apply({'params': params}, x, train=False)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, y).mean(), None

  grad = layout.pmap(lambda p, x, y: layout.grad(loss_fn)(p, x, y)[2])
  params, _, _ = importer.read_params(config, path)
  per_replica = lambda a: a.reshape(2, 2, *a.shape[1:])
  grads = grad(layout.shard_towers(params),
               layout.shard_batch(per_replica(images.transpose(0, 2, 3, 1))),
               layout.shard_batch(per_replica(labels)))
  for got, expected in zip(jax.tree.leaves(layout.gather_towers(grads)),
                           jax.tree.leaves(want)):
    _assert_close(got, expected, floor=0.0)


def test_import_refuses_a_used_workdir_and_a_misfit(small, tmp_path):
  config, path, weights, _ = small
  workdir = str(tmp_path / 'run')
  importer.import_weights(config, path, workdir)
  with pytest.raises(errors.WorkdirError, match='already holds'):
    importer.import_weights(config, path, workdir)
  # torchvision-style ungrouped conv2: named, with both shapes.
  ungrouped = dict(weights, conv2=[np.zeros((32, 12, 5, 5), np.float32),
                                   weights['conv2'][1]])
  wrong = str(tmp_path / 'ungrouped.caffemodel')
  _write_caffemodel(wrong, ungrouped, v1=False)
  with pytest.raises(errors.WeightsError,
                     match=r'conv2 weights has shape \(32, 12, 5, 5\).*'
                     r'needs \(32, 6, 5, 5\)'):
    importer.read_params(config, wrong)
  with pytest.raises(errors.WeightsError, match=r"missing \['fc8'\]"):
    _write_caffemodel(wrong, {k: v for k, v in weights.items()
                              if k != 'fc8'}, v1=True)
    importer.read_params(config, wrong)


def test_a_weights_file_that_cannot_be_read_is_one_error_line(
    small, repo, tmp_path):
  """A file without read permission. Root reads any file, so where the
  tests run as root the command runs without the capabilities that let it
  (setpriv drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH)."""
  _, path, _, _ = small
  unreadable = str(tmp_path / 'unreadable.caffemodel')
  shutil.copy(path, unreadable)
  os.chmod(unreadable, 0)
  command = [sys.executable, 'main.py', '--config=configs/alexnet.py:tiny',
             '--mode=import', f'--weights={unreadable}',
             f'--workdir={tmp_path / "run"}']
  if os.geteuid() == 0:
    if not shutil.which('setpriv'):
      pytest.skip('root reads any file, and setpriv is missing')
    command = ['setpriv', '--bounding-set=-dac_override,-dac_read_search',
               *command]
  done = subprocess.run(command, cwd=repo, capture_output=True, text=True)
  assert done.returncode == 1 and 'Traceback' not in done.stderr, done.stderr
  assert done.stderr.strip().splitlines()[-1] == (
      f'error: --weights={unreadable}: cannot read it (Permission denied). '
      'Give a weights file you can read.')
