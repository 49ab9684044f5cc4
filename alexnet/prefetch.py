"""Feeds the devices from a background thread, batches ahead of the step.

Reading a host batch and starting its transfer happen off the main thread,
so the main thread only dispatches steps: while the devices run step n,
batches n + 1 and n + 2 are already on their way.
"""

from collections.abc import Callable, Iterable, Iterator
import contextlib
import queue
import threading
from typing import Any

PyTree = Any

_DONE = object()  # Ends the stream: the host batches ran out.
_POLL_SECONDS = 0.1  # How often a blocked producer checks for a close.


@contextlib.contextmanager
def to_devices(batches: Iterable[PyTree], put: Callable[[PyTree], PyTree],
               size: int = 2) -> Iterator[Iterator[PyTree]]:
  """Yields an iterator of `put(batch)`, computed `size` batches ahead.

  Args:
    batches: host batches (may be endless).
    put: sends one host batch to the devices, e.g. `layout.shard_batch`.
    size: batches kept ready ahead of the consumer.

  Yields:
    The device batches, in order. An error raised while reading or
    sending a batch is raised here, at that batch. Leaving the context
    stops the thread.
  """
  ready = queue.Queue(maxsize=size)
  closed = threading.Event()

  def offer(item) -> bool:
    while not closed.is_set():
      try:
        ready.put(item, timeout=_POLL_SECONDS)
        return True
      except queue.Full:
        continue
    return False

  def produce() -> None:
    try:
      for batch in batches:
        if not offer(put(batch)):
          return
      offer(_DONE)
    except BaseException as error:  # pylint: disable=broad-except
      offer(error)  # Raised in the consumer's thread.

  def consume() -> Iterator[PyTree]:
    while (item := ready.get()) is not _DONE:
      if isinstance(item, BaseException):
        raise item
      yield item

  thread = threading.Thread(target=produce, daemon=True)
  thread.start()
  try:
    yield consume()
  finally:
    closed.set()
    thread.join()
