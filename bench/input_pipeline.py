"""Training input throughput on 256x256 JPEGs: tf.data vs a plain PIL loop.

Writes 512 random-ish 256x256 JPEGs to a temporary folder dataset, then
times, in one run, the training pipeline (fused decode-and-crop to 227,
reflection, PCA lighting, mean subtraction, batching) on one thread and on
all cores, and a PIL loop doing the same work per image. Target: >= 1,000
images/s per core for tf.data.

    /work/venv/bin/python -m bench.input_pipeline
"""

import os
import tempfile
import time

import numpy as np
from PIL import Image

from configs import alexnet
import input_pipeline

NUM_IMAGES = 512
SIDE = 256


def write_jpegs(root: str) -> list[str]:
  """Writes NUM_IMAGES smooth-plus-noise JPEGs as root/train/<class>/."""
  rng = np.random.default_rng(0)
  paths = []
  y, x = np.mgrid[0:SIDE, 0:SIDE] / SIDE
  for i in range(NUM_IMAGES):
    class_dir = os.path.join(root, 'train', f'class{i % 4}')
    os.makedirs(class_dir, exist_ok=True)
    # Photo-like content (gradients + texture) so JPEG sizes are realistic.
    phase = rng.uniform(0, 2 * np.pi, 3)
    base = np.stack([np.sin(6 * x + 4 * y + p) for p in phase], -1)
    pixels = 127 + 80 * base + rng.normal(0, 20, (SIDE, SIDE, 3))
    path = os.path.join(class_dir, f'{i:04d}.jpg')
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
        path, quality=90)
    paths.append(path)
  return paths


def time_pipeline(config, threads: int | None,
                  num_batches: int) -> tuple[float, float]:
  """Images per wall second and per CPU second (after two warm-up batches).

  The CPU-second figure is this process's CPU time, so it stays meaningful
  when other jobs share the machine.
  """
  ds = input_pipeline.train_dataset(config, num_shards=1, threads=threads)
  iterator = ds.as_numpy_iterator()
  for _ in range(2):
    next(iterator)
  wall, cpu = time.perf_counter(), time.process_time()
  for _ in range(num_batches):
    next(iterator)
  images = num_batches * config.batch_size
  return (images / (time.perf_counter() - wall),
          images / (time.process_time() - cpu))


def time_pil(paths: list[str], mean: np.ndarray, eigvals: np.ndarray,
             eigvecs: np.ndarray, image_size: int,
             passes: int = 2) -> tuple[float, float]:
  """Images per wall and CPU second of the same work in a PIL loop."""
  rng = np.random.default_rng(0)
  wall, cpu = time.perf_counter(), time.process_time()
  for _ in range(passes):
    for path in paths:
      top, left = rng.integers(0, SIDE - image_size + 1, 2)
      with Image.open(path) as image:
        window = image.convert('RGB').crop(
            (left, top, left + image_size, top + image_size))
      pixels = np.asarray(window, np.float32)
      pixels = pixels - mean[top:top + image_size, left:left + image_size]
      if rng.random() < 0.5:
        pixels = pixels[:, ::-1]
      alpha = rng.normal(0, 0.1, 3)
      pixels = pixels + (255 * eigvecs @ (alpha * eigvals)).astype(np.float32)
      np.ascontiguousarray(pixels)
  images = passes * len(paths)
  return (images / (time.perf_counter() - wall),
          images / (time.process_time() - cpu))


def main() -> None:
  cores = os.cpu_count()
  with tempfile.TemporaryDirectory() as root:
    paths = write_jpegs(root)
    config = alexnet.get_config()
    config.update(dict(dataset='folder', folder=root,
                       data_dir=os.path.join(root, 'data'),
                       train_split='train', eval_split='train',
                       shuffle_buffer=NUM_IMAGES))
    source = input_pipeline.make_source(config)
    stats = input_pipeline.colour_stats(config, source)  # Not timed.
    num_batches = 4 * NUM_IMAGES // config.batch_size  # Four epochs.
    one = time_pipeline(config, 1, num_batches)
    every = time_pipeline(config, None, num_batches)
    pil = time_pil(paths, stats.mean_image, stats.eigvals, stats.eigvecs,
                   config.image_size)
  print(f'{NUM_IMAGES} JPEGs {SIDE}x{SIDE} -> {config.image_size} crops, '
        f'flip, PCA lighting, mean image; batch {config.batch_size}; '
        f'{cores} cores; load average {os.getloadavg()[0]:.1f}.')
  print(f'{"":24s} {"images/s":>9s} {"per CPU-s":>10s}')
  print(f'{"tf.data, 1 thread":24s} {one[0]:9.0f} {one[1]:10.0f}')
  print(f'{f"tf.data, all {cores} cores":24s} {every[0]:9.0f} {every[1]:10.0f}'
        f'   ({every[0] / cores:.0f} images/s per core)')
  print(f'{"PIL loop, 1 thread":24s} {pil[0]:9.0f} {pil[1]:10.0f}')
  print(f'tf.data 1 thread / PIL: {one[0] / pil[0]:.2f}x wall, '
        f'{one[1] / pil[1]:.2f}x per CPU-s')
  print('target >= 1000 images/s per core: '
        f'{"met" if one[0] >= 1000 else "NOT met"} (1 thread, wall)')


if __name__ == '__main__':
  main()
