"""The net's fc7 features (the paper's section 6.1 and Figure 4).

The paper measures image similarity by the Euclidean distance of the last
hidden layer's activations: fc7 after its ReLU, 4096 values at width 1. In
the two-tower net fc7 is one `TowerDense` layer whose output holds both
towers' units side by side, tower 0 first: the grouped net's order. It is
read with Flax's `capture_intermediates`, so the model needs no change.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from alexnet import model as model_lib
from alexnet.data import on_device

PyTree = Any
# The layer read, and where `capture_intermediates` records its output.
LAYER = 'fc7'


def fc7_and_logits(model: model_lib.AlexNet, params: PyTree,
                   images: jax.Array) -> tuple[jax.Array, jax.Array]:
  """fc7 features (after the activation) and logits of normalised images.

  Args:
    model: the net with both towers local (no exchange).
    params: its parameters.
    images: float32 [B, S, S, 3], mean subtracted.

  Returns:
    (float32 [B, fc7 units of all towers], float32 [B, classes] logits).
  """
  logits, state = model.apply(
      {'params': params}, images, train=False,
      capture_intermediates=lambda module, _: module.name == LAYER)
  fc7 = state['intermediates'][LAYER]['__call__'][0]
  activation = model_lib.ACTIVATIONS[model.activation]
  return activation(fc7).astype(jnp.float32), logits


def make_extractor(model: model_lib.AlexNet, mean_image: np.ndarray,
                   image_size: int) -> Any:
  """A jitted (params, uint8 squares [B, Z, Z, 3]) -> (fc7, logits).

  The squares are normalised and centre-cropped as evaluation does
  (`on_device.eval_images`, centre view).
  """
  mean = jnp.asarray(mean_image)

  @jax.jit
  def extract(params, squares):
    views = on_device.eval_images({'image': squares}, mean, image_size,
                                  ten_crop=False)
    return fc7_and_logits(model, params, views[:, 0])
  return extract


def nearest(database: np.ndarray, queries: np.ndarray, k: int,
            chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
  """The k rows of `database` nearest each query (Euclidean).

  Args:
    database: [N, D] features.
    queries: [Q, D] features.
    k: neighbours per query (k <= N).
    chunk: database rows compared at a time (bounds the memory).

  Returns:
    (int64 indices [Q, k], float32 distances [Q, k]), nearest first; ties
    keep the lower index.
  """
  queries = np.asarray(queries, np.float64)
  squared = []
  for start in range(0, len(database), chunk):
    rows = np.asarray(database[start:start + chunk], np.float64)
    squared.append((queries ** 2).sum(1)[:, None] - 2 * queries @ rows.T
                   + (rows ** 2).sum(1)[None])
  squared = np.maximum(np.concatenate(squared, axis=1), 0.0)
  order = np.argsort(squared, axis=1, kind='stable')[:, :k]
  distances = np.sqrt(np.take_along_axis(squared, order, axis=1))
  return order, distances.astype(np.float32)


def top_k(logits: np.ndarray, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
  """(labels [B, k], softmax probabilities [B, k]), most probable first."""
  probabilities = np.asarray(nn.softmax(jnp.asarray(logits), axis=-1))
  order = np.argsort(-probabilities, axis=1, kind='stable')[:, :k]
  return order, np.take_along_axis(probabilities, order, axis=1)
