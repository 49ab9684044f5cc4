"""Exact evaluation (ties, NaNs, padding, replicas) and device prefetching."""

import itertools
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alexnet import errors
from alexnet import evaluation
from alexnet import parallel
from alexnet import prefetch
from alexnet import steps


def _oracle_rank(probs, label):
  """The label's place when classes are sorted by probability, ties broken
  against the label; a row with a NaN has no order and ranks last."""
  if np.isnan(probs).any():
    return len(probs)
  order = sorted(range(len(probs)), key=lambda j: (-probs[j], j == label))
  return order.index(label)


def _hand_metrics(logits, labels, mask):
  """Numpy, one example at a time."""
  sums = {'count': 0.0}
  for logit, label, keep in zip(logits, labels, mask):
    if not keep:
      continue
    sums['count'] += 1
    probs = np.exp(logit - logit.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    crops = {'centre': probs[0]}
    if len(probs) > 1:
      crops['ten_crop'] = probs.mean(0)
    for name, p in crops.items():
      rank = _oracle_rank(p, label)
      for key, value in ((f'{name}_loss', -np.log(p[label])),
                         (f'{name}_top1_error', float(rank >= 1)),
                         (f'{name}_top5_error', float(rank >= 5))):
        sums[key] = sums.get(key, 0.0) + value
  return evaluation.summarize(sums)


def _metrics(logits, labels, mask=None):
  mask = np.ones(len(labels), bool) if mask is None else mask
  return evaluation.summarize(jax.device_get(evaluation.eval_metrics(
      jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask))))


def _assert_equal_to_oracle(logits, labels, mask=None):
  got = _metrics(logits, labels, mask)
  want = _hand_metrics(logits, labels,
                       np.ones(len(labels), bool) if mask is None else mask)
  assert got.keys() == want.keys()
  for key in want:
    assert got[key] == pytest.approx(want[key], rel=1e-5, nan_ok=True), key
  return got


def test_eval_metrics_equal_hand_computed_values_with_padding():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(7, 10, 8)).astype(np.float32) * 3
  labels = rng.integers(0, 8, size=7)
  mask = np.array([1, 1, 1, 1, 1, 0, 0], bool)
  logits[5:] = 100.0 * np.eye(8)[0]  # Padding that would be "right".
  got = _assert_equal_to_oracle(logits, labels, mask)
  # Centre and 10-crop must differ here, or the test proves little.
  assert got['centre_loss'] != pytest.approx(got['ten_crop_loss'])


@pytest.mark.parametrize('classes,views', [(8, 10), (1000, 1)])
def test_constant_logits_are_no_better_than_chance(classes, views):
  """A collapsed net: every class tied. Top-k error is at least 1 - k/C."""
  labels = np.arange(6) % classes
  got = _assert_equal_to_oracle(np.zeros((6, views, classes), np.float32),
                                labels)
  crops = ('centre', 'ten_crop') if views > 1 else ('centre',)
  for crop in crops:
    assert got[f'{crop}_top1_error'] >= 1 - 1 / classes
    assert got[f'{crop}_top5_error'] >= 1 - 5 / classes
    assert got[f'{crop}_top5_error'] == 1.0  # Every other class ties.


def test_ties_at_the_top_k_boundary_count_against_the_label():
  row = np.array([5, 4, 3, 2, 1, 1, 0, 0], np.float32)
  top_tie = np.array([1, 1, 0, 0, 0, 0, 0, 0], np.float32)
  logits = np.stack([row, row, row, row, top_tie, top_tie])
  logits = np.repeat(logits[:, None], 10, axis=1)  # Identical views.
  labels = np.array([4, 5, 3, 6, 0, 1])
  got = _assert_equal_to_oracle(logits, labels)
  # Labels 4 and 5 tie for 5th place: both miss the top 5. Label 3 is 4th:
  # a top-5 hit. Labels 0 and 1 tie for 1st: both miss top-1, hit top-5.
  assert got['centre_top5_error'] == pytest.approx(3 / 6)
  assert got['centre_top1_error'] == pytest.approx(1.0)
  assert got['ten_crop_top5_error'] == got['centre_top5_error']


def test_nan_logits_count_as_errors():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(4, 10, 8)).astype(np.float32)
  labels = np.argmax(logits[:, 0], -1)  # Every centre crop right...
  logits[1] = np.nan  # ...but this example's logits are all NaN,
  logits[2, 3, 5] = np.nan  # and one of this one's 10 views has a NaN.
  got = _assert_equal_to_oracle(logits, labels)
  assert got['centre_top1_error'] == pytest.approx(1 / 4)
  assert got['ten_crop_top1_error'] >= 2 / 4
  assert got['ten_crop_top5_error'] == pytest.approx(2 / 4)
  all_nan = _metrics(np.full((3, 10, 8), np.nan, np.float32), labels[:3])
  assert all(all_nan[f'{crop}_top{k}_error'] == 1.0
             for crop in ('centre', 'ten_crop') for k in (1, 5))


class _FixedLogits:
  """A fake model: logits are pixels of the first row of channel 0."""

  def __init__(self, classes):
    self.classes = classes

  def apply(self, variables, images, train):
    del variables, train
    return images[:, 0, :self.classes, 0]


def test_eval_step_is_exact_across_replicas_and_padding():
  layout = parallel.Layout.create(True, devices=jax.devices()[:4])
  rng = np.random.default_rng(1)
  classes, views, n, per_shard = 6, 10, 11, 3
  logits = rng.normal(size=(n, views, classes)).astype(np.float32)
  labels = rng.integers(0, classes, size=n)
  batches = []
  for start in range(0, n, layout.num_replicas * per_shard):
    size = layout.num_replicas * per_shard
    chunk = np.zeros((size, views, classes), np.float32)
    got = logits[start:start + size]
    chunk[:len(got)] = got
    images = np.zeros((size, views, 2, classes, 1), np.float32)
    images[:, :, 0, :, 0] = chunk
    batch = {'image': images,
             'label': np.pad(labels[start:start + size],
                             (0, size - len(got))).astype(np.int32),
             'mask': np.arange(size) < len(got)}
    batches.append(jax.tree.map(
        lambda x: x.reshape(layout.num_replicas, per_shard, *x.shape[1:]),
        batch))
  p_eval = layout.pmap(
      lambda params, batch: steps.eval_step(
          params, batch, model=_FixedLogits(classes), layout=layout),
      out_axes=None)
  params = layout.shard_towers({'unused': np.zeros((2, 1))})
  got = evaluation.evaluate(p_eval, params, batches, layout)
  want = _hand_metrics(logits, labels, np.ones(n, bool))
  for key in want:
    assert got[key] == pytest.approx(want[key], rel=1e-5), key


# --- Prefetching to the devices -----------------------------------------------


def _wait_until(condition, seconds=30.0):
  deadline = time.monotonic() + seconds
  while not condition() and time.monotonic() < deadline:
    time.sleep(0.01)
  return condition()


def test_prefetch_sends_two_batches_ahead_in_order_then_stops():
  sent = []

  def put(batch):
    sent.append(batch)
    return -batch

  threads = threading.active_count()
  with prefetch.to_devices(itertools.count(), put) as batches:
    assert next(batches) == 0
    # While batch 0 is in use, batches 1 and 2 are already sent; the queue
    # is bounded, so an endless source is not read further ahead.
    assert _wait_until(lambda: len(sent) >= 3), sent
    time.sleep(0.3)
    assert len(sent) <= 4, sent
    assert [next(batches) for _ in range(5)] == [-1, -2, -3, -4, -5]
  assert _wait_until(lambda: threading.active_count() == threads)


def test_prefetch_ends_with_the_source_and_raises_its_errors_in_place():
  with prefetch.to_devices(range(3), lambda x: x) as batches:
    assert list(batches) == [0, 1, 2]

  def broken():
    yield 0
    raise errors.DatasetError('unreadable shard')

  with prefetch.to_devices(broken(), lambda x: x) as batches:
    assert next(batches) == 0
    with pytest.raises(errors.DatasetError, match='unreadable shard'):
      next(batches)
