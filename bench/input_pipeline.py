"""Would a GPU host be fed? Training input throughput and bytes to the device.

Writes generated JPEGs (smooth colour plus noise, quality 90) as folder
datasets: full-size ImageNet-like photos (500x375) and pre-resized 256x256
squares; the full-size photos are also written once as the shards that
`main.py --mode=prepare` makes (timed), which training then reads. For each,
in one run, times the training pipeline's uint8 path
(decode, crop, flip, PCA draw; what `input_pipeline.train_dataset` ships)
side by side with the float path it replaced (the same plus mean
subtraction and the lighting shift on the host, float32 out), on one
tf.data thread (images/s per core) and on all cores. Then prints the bytes
per image sent to the device by training and by 10-crop evaluation, uint8
against float32.

    python bench/input_pipeline.py
"""

import os
import sys
import tempfile
import time

# Runnable as `python bench/input_pipeline.py` from the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import ml_collections
import numpy as np
from PIL import Image
import tensorflow as tf

from alexnet.data import colour
from alexnet.data import epochs
from alexnet.data import on_device
from alexnet.data import shards
from alexnet.data import ops
from configs import alexnet
import input_pipeline

# (name, width, height, images): ImageNet's typical photo, and the paper's
# pre-resized squares.
IMAGE_SETS = (('full-size 500x375', 500, 375, 256),
              ('pre-resized 256x256', 256, 256, 512))
EPOCHS = 3


def write_jpegs(root: str, width: int, height: int, count: int) -> None:
  """Writes `count` photo-like JPEGs as root/train/class<i % 4>/<i>.jpg."""
  rng = np.random.default_rng(0)
  y, x = np.mgrid[0:height, 0:width] / max(width, height)
  for i in range(count):
    class_dir = os.path.join(root, 'train', f'class{i % 4}')
    os.makedirs(class_dir, exist_ok=True)
    # Gradients plus texture, so JPEG sizes are realistic (~100 KB at 500px).
    phase = rng.uniform(0, 2 * np.pi, 3)
    base = np.stack([np.sin(6 * x + 4 * y + p) for p in phase], -1)
    pixels = 127 + 80 * base + rng.normal(0, 20, (height, width, 3))
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
        os.path.join(class_dir, f'{i:04d}.jpg'), quality=90)


def float_dataset(config: ml_collections.ConfigDict,
                  threads: int | None) -> tf.data.Dataset:
  """The float pipeline the uint8 wire replaced, from the same ops."""
  source = input_pipeline.data_source(config)
  stats = colour.colour_stats(config, source)
  mean = tf.constant(colour.mean_image(stats, config.mean))
  steps = input_pipeline.steps_per_epoch(
      config, input_pipeline.get_dataset_info(config), 1)
  size, resize = config.image_size, config.resize_size

  def augment(data, label, offset, flip, shift):
    image = tf.cast(ops.decode_crop(source.read(data), resize, size, offset),
                    tf.float32)
    image -= ops.crop(mean, offset, size)
    return {'image': ops.flip_if(image, flip) + shift, 'label': label}

  ds = epochs.train_examples(
      config, source, colour.lighting_components(stats, config.pca_stats),
      replica=0, num_replicas=1, steps_per_epoch=steps)
  ds = ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(config.batch_size, drop_remainder=True).prefetch(
      tf.data.AUTOTUNE)
  options = tf.data.Options()
  if threads:
    options.threading.private_threadpool_size = threads
    options.threading.max_intra_op_parallelism = 1
  return ds.with_options(options)


def images_per_second(ds: tf.data.Dataset, batch_size: int,
                      num_batches: int) -> float:
  """Images per wall second, after two warm-up batches."""
  iterator = ds.as_numpy_iterator()
  for _ in range(2):
    next(iterator)
  start = time.perf_counter()
  for _ in range(num_batches):
    next(iterator)
  return num_batches * batch_size / (time.perf_counter() - start)


def throughput(config: ml_collections.ConfigDict,
               count: int) -> dict[tuple[str, str], float]:
  """{(path, threads): images/s} for the uint8 and float paths."""
  num_batches = EPOCHS * count // config.batch_size - 2
  rates = {}
  for threads, label in ((1, '1 thread'), (None, 'all cores')):
    uint8 = input_pipeline.train_dataset(config, replicas=[0], num_replicas=1,
                                         threads=threads)
    rates['uint8', label] = images_per_second(uint8, config.batch_size,
                                              num_batches)
    rates['float', label] = images_per_second(
        float_dataset(config, threads), config.batch_size, num_batches)
  return rates


def bytes_per_image(config: ml_collections.ConfigDict) -> dict[str, float]:
  """Bytes per image the device receives: train and 10-crop eval batches."""
  def per_image(batch):
    return sum(v.nbytes for v in batch.values()) / batch['label'].size

  train = next(input_pipeline.create_train_iterator(config, replicas=[0],
                                                    num_replicas=1))
  old_train = next(float_dataset(config, None).as_numpy_iterator())
  squares = next(iter(input_pipeline.create_eval_iterable(
      config, 'eval', replicas=[0], num_replicas=1)))
  # Before, the host cut the 10 float views and shipped them.
  views = jax.device_get(on_device.eval_images(
      {'image': squares['image'][0]}, colour.mean_image(
          colour.colour_stats(config, input_pipeline.data_source(config)),
          config.mean), config.image_size, True))
  old_eval = {'image': views, 'label': squares['label'],
              'mask': squares['mask']}
  return {'train uint8': per_image(train),
          'train float32': per_image(old_train),
          'eval 10-crop uint8 squares': per_image(squares),
          'eval 10-crop float32 views': per_image(old_eval)}


def _print_rates(name: str, rates: dict[tuple[str, str], float]) -> None:
  cores = os.cpu_count()
  for path in ('uint8', 'float'):
    one, every = rates[path, '1 thread'], rates[path, 'all cores']
    print(f'{name:22s} {path:6s} {one:9.0f} {every:10.0f} '
          f'{every / cores:9.0f}')
  ratios = [rates['uint8', t] / rates['float', t]
            for t in ('1 thread', 'all cores')]
  print(f'{"":22s} uint8 / float: {ratios[0]:.2f}x (1 thread), '
        f'{ratios[1]:.2f}x (all cores)')


def _shards(config: ml_collections.ConfigDict,
            count: int) -> dict[tuple[str, str], float]:
  """Prepares the shards of `config` (timed), then the rates reading them."""
  start = time.perf_counter()
  shards.prepare(config)
  seconds = time.perf_counter() - start
  print(f'{"prepare (all cores)":22s} {count / seconds:.0f} images/s: '
        f'{count} full-size JPEGs -> 256x256 shards in {seconds:.1f} s')
  config.use_shards = True
  input_pipeline.mean_image(config)  # Colour statistics, not timed.
  return throughput(config, count)


def main() -> None:
  print(f'{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; '
        'batch 128, 227 crops of 256 squares, flip, PCA lighting, pixel '
        'mean.')
  print(f'{"images":22s} {"path":6s} {"1 thread":>9s} {"all cores":>10s} '
        f'{"per core":>9s}')
  for name, width, height, count in IMAGE_SETS:
    with tempfile.TemporaryDirectory() as root:
      write_jpegs(root, width, height, count)
      config = alexnet.get_config()
      config.update(dict(dataset='folder', folder=root,
                         data_dir=os.path.join(root, 'data'),
                         train_split='train', eval_split='train[:128]'))
      input_pipeline.mean_image(config)  # Colour statistics, not timed.
      _print_rates(name, throughput(config, count))
      if name == IMAGE_SETS[0][0]:
        _print_rates('shards of the above', _shards(config, count))
      else:
        sizes = bytes_per_image(config)
  print('Bytes per image sent to the device (targets: train <= 160 KB, '
        '10-crop eval <= 200 KB):')
  for name, size in sizes.items():
    print(f'  {name:28s} {size / 1024:9.1f} KB')


if __name__ == '__main__':
  main()
