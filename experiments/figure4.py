"""The paper's Figure 4, drawn from a trained checkpoint.

Left: test images, each with its five most probable labels as bars (the
true label's bar in red, if among them). Right: test images (first column)
and the six training images nearest to each in fc7 space (Euclidean
distance of the 4096 activations after fc7's ReLU, both towers), as in the
paper's section 6.1.

    python -m experiments.figure4 --config=configs/alexnet.py:fashion_mnist \
        --workdir=runs/fashion_mnist

Give the config the run was trained with (e.g. its --config.classes). The
figure goes to <workdir>/figure4.png and to TensorBoard (image 'figure4'
at the checkpoint's step). The shown test images are spread evenly over the
test split, so the figure depends on the checkpoint only. The neighbours
are searched among all training images, or the first --database of them
(fewer forward passes on a slow machine).
"""

from absl import app
from absl import flags
import matplotlib
from clu import metric_writers
import numpy as np
import tensorflow as tf
from ml_collections import config_flags

matplotlib.use('Agg')
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

from alexnet import errors  # pylint: disable=g-import-not-at-top
from alexnet import features as features_lib
import features

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'The trained run.')
config_flags.DEFINE_config_file('config', None, 'The run\'s config.',
                                lock_config=True)
flags.DEFINE_string('checkpoint', 'latest', "'latest', 'best' or a step.")
flags.DEFINE_integer('shown', 8, 'Test images with their top-5 bars.')
flags.DEFINE_integer('queries', 5, 'Test images with their neighbours.')
flags.DEFINE_integer('neighbours', 6, 'Training images per query.')
flags.DEFINE_integer('database', 0, 'Search the neighbours among the first '
                     'this many training images (whole batches); 0: all.')
flags.mark_flags_as_required(['workdir', 'config'])

FASHION_MNIST_NAMES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat',
                       'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot')


def class_names(config) -> list[str]:
  """Names of the config's labels 0..K-1 (numbers where none are known)."""
  if config.dataset != 'fashion_mnist':
    return []
  kept = tuple(config.classes) or range(len(FASHION_MNIST_NAMES))
  return [FASHION_MNIST_NAMES[c] for c in kept]


def _name(names: list[str], label: int) -> str:
  return names[label] if label < len(names) else str(label)


def _show(axis, image: np.ndarray, title: str = '') -> None:
  axis.imshow(image)
  axis.set_xticks([])
  axis.set_yticks([])
  axis.set_title(title, fontsize=8)


def _draw_predictions(subfigure, images, labels, logits, names) -> None:
  """Each image above its top-5 probabilities; the true label in red."""
  columns = (len(images) + 1) // 2
  axes = subfigure.subplots(4, columns, squeeze=False,
                            gridspec_kw={'height_ratios': [3, 2, 3, 2]})
  top, probabilities = features_lib.top_k(logits, min(5, logits.shape[1]))
  for i, (image, label) in enumerate(zip(images, labels)):
    row, column = 2 * (i // columns), i % columns
    _show(axes[row, column], image, _name(names, label))
    bars = axes[row + 1, column]
    colours = ['tab:red' if t == label else 'tab:blue' for t in top[i]]
    positions = np.arange(len(top[i]))[::-1]
    bars.barh(positions, probabilities[i], color=colours)
    bars.set_yticks(positions, [_name(names, t) for t in top[i]],
                    fontsize=6)
    bars.set_xlim(0, 1)
    bars.tick_params(axis='x', labelsize=6)
  for axis in axes.reshape(-1)[2 * len(images):]:
    axis.axis('off')
  subfigure.suptitle('Top-5 predictions (true label in red)', fontsize=10)


def _draw_neighbours(subfigure, queries, neighbours, names,
                     neighbour_labels) -> None:
  """One row per query: the test image, then its nearest training images."""
  axes = subfigure.subplots(len(queries), 1 + neighbours.shape[1],
                            squeeze=False)
  for row, query in enumerate(queries):
    _show(axes[row, 0], query, 'test' if row == 0 else '')
    for column, image in enumerate(neighbours[row], start=1):
      _show(axes[row, column], image,
            _name(names, neighbour_labels[row, column - 1]))
  subfigure.suptitle('Nearest training images in fc7 space', fontsize=10)


def spread(count: int, total: int, shift: float = 0.0) -> np.ndarray:
  """`count` indices spread evenly over range(total) (shift in [0, 1))."""
  return ((np.arange(count) + shift) * total / count).astype(int)


def draw(config, workdir: str, checkpoint: str = 'latest') -> tuple[int, str]:
  """Draws Figure 4 from a checkpoint; returns (its step, the PNG's path)."""
  test = features.extract(config, workdir, 'eval', checkpoint)
  train = features.extract(config, workdir, 'train', checkpoint,
                           limit=FLAGS.database)
  names = class_names(config)
  shown = spread(FLAGS.shown, len(test.labels))
  queries = spread(FLAGS.queries, len(test.labels), shift=0.5)
  nearest, _ = features_lib.nearest(train.fc7, test.fc7[queries],
                                    FLAGS.neighbours)
  figure = plt.figure(figsize=(16, 7), layout='constrained')
  left, right = figure.subfigures(1, 2, width_ratios=[1, 1])
  _draw_predictions(left, features.images_at(config, 'eval', shown),
                    test.labels[shown], test.logits[shown], names)
  neighbour_images = features.images_at(config, 'train', nearest.reshape(-1))
  _draw_neighbours(
      right, features.images_at(config, 'eval', queries),
      neighbour_images.reshape(*nearest.shape, *neighbour_images.shape[1:]),
      names, train.labels[nearest])
  figure.suptitle(f'Figure 4 from {workdir}, step {test.step}')
  path = f'{workdir.rstrip("/")}/figure4.png'
  figure.savefig(path, dpi=100)
  figure.canvas.draw()
  pixels = np.asarray(figure.canvas.buffer_rgba())[..., :3]
  plt.close(figure)
  writer = metric_writers.create_default_writer(workdir)
  writer.write_images(test.step, {'figure4': pixels[None]})
  writer.close()
  return test.step, path


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # TensorFlow only feeds data: keep it off the accelerators JAX uses.
  tf.config.set_visible_devices([], 'GPU')
  try:
    step, path = draw(FLAGS.config, FLAGS.workdir, FLAGS.checkpoint)
  except errors.UserError as error:
    raise SystemExit(f'error: {error}') from None
  print(f'Figure 4 of step {step}: {path} (and TensorBoard image figure4).')


if __name__ == '__main__':
  app.run(main)
