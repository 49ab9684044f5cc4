"""Exact evaluation: top-1/top-5 error of the centre crop and of 10 crops.

Every example counts once (padding is masked out), ties count against the
label and a non-finite prediction counts as an error, so a collapsed net
(constant or NaN logits) scores no better than chance. Sums stay on the
devices while an evaluation runs and are fetched once at its end.
"""

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp

from alexnet import parallel
from alexnet import prefetch

PyTree = Any


def label_rank(log_probs: jax.Array, labels: jax.Array) -> jax.Array:
  """How many other classes score at least as high as the label.

  Ties count against the label: with constant scores over C classes every
  label has rank C - 1, a top-k error of 1 for every k < C (never better
  than chance). A row holding a NaN has no ranking and gets rank C, an
  error at every k.

  Args:
    log_probs: [batch, classes] scores.
    labels: [batch] int.

  Returns:
    int [batch]; top-k is a hit exactly when the rank is below k.
  """
  num_classes = log_probs.shape[-1]
  label_score = jnp.take_along_axis(log_probs, labels[:, None], axis=-1)
  others = jnp.arange(num_classes) != labels[:, None]
  rank = jnp.sum((log_probs >= label_score) & others, axis=-1)
  return jnp.where(jnp.isnan(log_probs).any(axis=-1), num_classes, rank)


def eval_metrics(logits: jax.Array, labels: jax.Array,
                 mask: jax.Array) -> dict[str, jax.Array]:
  """Sums of losses and errors over the unmasked examples of a batch.

  Args:
    logits: [batch, views, classes]; view 0 is the centre crop. With 10
      views the paper's prediction averages the 10 softmax outputs.
    labels: [batch] int.
    mask: [batch] bool, False for padding.

  Returns:
    Sums, to be added over batches and devices and divided by 'count'.
  """
  predictions = {'centre': jax.nn.log_softmax(logits[:, 0])}
  if logits.shape[1] > 1:
    # log(mean_v softmax_v), computed in log space so that it cannot
    # underflow to log(0).
    predictions['ten_crop'] = (
        jax.nn.logsumexp(jax.nn.log_softmax(logits), axis=1)
        - jnp.log(logits.shape[1]))
  sums = {'count': jnp.sum(mask.astype(jnp.float32))}
  top_k = min(5, logits.shape[-1])
  masked_sum = lambda x: jnp.sum(jnp.where(mask, x, 0.0))
  for name, log_probs in predictions.items():
    nll = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
    rank = label_rank(log_probs, labels)
    sums[f'{name}_loss'] = masked_sum(nll)
    sums[f'{name}_top1_error'] = masked_sum((rank >= 1).astype(jnp.float32))
    sums[f'{name}_top5_error'] = masked_sum(
        (rank >= top_k).astype(jnp.float32))
  return sums


def summarize(sums: dict[str, float]) -> dict[str, float]:
  """Turns summed eval metrics into means over the evaluated examples."""
  count = float(sums['count'])
  return {name: float(value) / count for name, value in sums.items()
          if name != 'count'}


def evaluate(p_eval_step: Callable[..., Any], params: PyTree,
             batches: Iterable[PyTree],
             layout: parallel.Layout) -> dict[str, float]:
  """Exact metrics over one evaluation split (padding masked out).

  Batches reach the devices from a background thread, two ahead of the
  step; the sums are added on the devices and fetched once, at the end.

  Args:
    p_eval_step: the layout's mapped `steps.eval_step`: (params, batch) ->
      metric sums, the same on every device.
    params: the parameters on the devices.
    batches: host batches, [local replicas, per replica, ...].
    layout: the device layout.

  Returns:
    Means over the split, e.g. {'centre_top1_error': ..., ...}.
  """
  total = None
  with prefetch.to_devices(batches, layout.shard_batch) as on_devices:
    for batch in on_devices:
      sums = p_eval_step(params, batch)
      total = sums if total is None else jax.tree.map(jnp.add, total, sums)
  return summarize(jax.device_get(total))
