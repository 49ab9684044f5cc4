"""Restoring a checkpoint past damage, and telling damage from a misfit.

A checkpoint damaged after it was written (files truncated or deleted by an
interrupted copy or a disk error) must not block the run: `Reader`
resumes from the newest checkpoint that reads, and moves the damaged newer
ones to <directory>_damaged/ (kept for inspection, outside orbax's sight),
with one warning naming each and what was wrong. A failed read is first
retried (`_READ_ATTEMPTS`, with a short backoff): a transient error of
shared storage (NFS's ESTALE, an EIO, a timeout of a mounted bucket) on a
good checkpoint must not rewind the run. Nothing is set aside unless an
older checkpoint reads, and what is not damage is named as what it is, with
the files left alone: a checkpoint of another configuration (its shape
signature), a state of another structure (e.g. config.reinit_lr_multiplier
switched to or from 1.0, which adds a masked scale to the optimizer), or
one error that every checkpoint shares.

With several processes (`jax.distributed`) every process reads each
candidate checkpoint itself, and they agree (one all-gather per candidate)
on whether it read everywhere; so they all fall back together, and none
waits in a barrier for a process that failed to read. Process 0 moves the
damaged ones.
"""

import dataclasses
import logging as python_logging
import os
import re
import sys
import time
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from alexnet import errors

PyTree = Any

# How reading a checkpoint turned out, ordered by precedence when the
# processes disagree (the highest wins).
_READ, _DAMAGED, _OTHER_CONFIG = 0, 1, 2
# Reads of one checkpoint before it counts as damaged, and the wait before
# the first retry (doubled before each next one).
_READ_ATTEMPTS = 3
_RETRY_SECONDS = 0.5


def reason(error: Exception) -> str:
  """What was wrong, in one line (tensorstore appends a long JSON spec)."""
  text = (str(error).split(' [tensorstore_spec=')[0].splitlines() or [''])[0]
  text = f'{type(error).__name__}: {text}'
  return text if len(text) <= 300 else text[:297] + '...'


def _quiet_late_read_callbacks() -> None:
  """Keeps a failed read's stragglers from printing tracebacks.

  When one array of a checkpoint fails to read, orbax's restore raises and
  closes its event loop while tensorstore still reads the other arrays;
  each of those then calls back into the closed loop, and Python prints
  the `RuntimeError: Event loop is closed` it raises as an unraisable
  exception: dozens of tracebacks above the one warning, read as a crash.
  Exactly that error is dropped (installed once per process); any other
  goes to the hook there was. So are asyncio's reports of the other failed
  reads (`_unretrieved_read_error`).
  """
  previous = sys.unraisablehook
  if getattr(previous, 'quiet_late_read_callbacks', False):
    return
  python_logging.getLogger('asyncio').addFilter(_unretrieved_read_error)

  def hook(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError) and
            str(unraisable.exc_value) == 'Event loop is closed'):
      previous(unraisable)
  hook.quiet_late_read_callbacks = True
  sys.unraisablehook = hook


def _unretrieved_read_error(record: python_logging.LogRecord) -> bool:
  """False for asyncio's 'Task exception was never retrieved' of a read.

  The same stragglers: when several arrays of a damaged checkpoint fail,
  orbax reports the first, and asyncio reports each other one, with its
  traceback, when its task is collected. Other asyncio records pass.
  """
  if not str(record.msg).startswith(('Task exception was never retrieved',
                                     'Future exception was never retrieved')):
    return True
  trace = record.exc_info[2] if record.exc_info else None
  while trace is not None:
    if re.search(r'[/\\](orbax|tensorstore)[/\\]',
                 trace.tb_frame.f_code.co_filename):
      return False
    trace = trace.tb_next
  return True


def _leaf_paths(tree: PyTree) -> set[str]:
  """'opt_state/2/trace/fc8/kernel'-style names of a tree's leaves, alike
  for a state and for orbax's metadata of it (where tuples are lists and
  named fields dict keys)."""
  def name(key):
    for attribute in ('key', 'idx', 'name'):
      if hasattr(key, attribute):
        return str(getattr(key, attribute))
    return str(key)
  return {'/'.join(map(name, path))
          for path, _ in jax.tree.flatten_with_path(tree)[0]}


@dataclasses.dataclass(frozen=True)
class _Attempt:
  """One process's attempt to read one checkpoint."""

  outcome: int  # _READ, _DAMAGED or _OTHER_CONFIG.
  state: PyTree = None
  meta: dict[str, Any] | None = None
  problem: str | None = None  # What was wrong, unless read.


class Reader:
  """Reads the checkpoints of one orbax manager, falling back past damage."""

  def __init__(self, manager: ocp.CheckpointManager, *, read_only: bool):
    """Reads through `manager`.

    Args:
      manager: the manager of the checkpoint directory.
      read_only: leave damaged checkpoints where they are.
    """
    self._manager = manager
    self._read_only = read_only

  def read_latest(self, target: PyTree, expected: dict[str, Any]
                  ) -> tuple[PyTree, dict[str, Any]] | None:
    """The newest checkpoint that reads; None for an empty directory.

    Called by all processes together. Damaged checkpoints newer than the
    one read are moved to <directory>_damaged/ (unless read-only) with one
    warning.

    Args:
      target: `jax.ShapeDtypeStruct`s of the state to read.
      expected: the shape signature the checkpoint's meta['shape'] must be.

    Returns:
      (state, meta), or None for an empty directory.

    Raises:
      errors.WorkdirError: a checkpoint of another configuration, or none
        that reads at all.
    """
    damaged = []
    for candidate in sorted(self._manager.all_steps(), reverse=True):
      attempt = self._agreed_read(candidate, target, expected)
      if attempt.outcome == _READ:
        self._set_aside(damaged, candidate)
        return attempt.state, attempt.meta
      damaged.append((candidate, attempt.problem))
    if damaged:
      raise errors.WorkdirError(_none_read(self._manager.directory, damaged))
    return None

  def read_step(self, step: int, target: PyTree,
                expected: dict[str, Any]) -> tuple[PyTree, dict[str, Any]]:
    """Checkpoint `step`; if damaged, an error naming the readable ones.

    Called by all processes together.

    Args:
      step: the step to read.
      target: `jax.ShapeDtypeStruct`s of the state to read.
      expected: the shape signature the checkpoint's meta['shape'] must be.

    Returns:
      (state, meta).

    Raises:
      errors.WorkdirError: a checkpoint of another configuration, or a
        damaged one (naming those that read).
    """
    attempt = self._agreed_read(step, target, expected)
    if attempt.outcome == _READ:
      return attempt.state, attempt.meta
    readable = [other for other in sorted(self._manager.all_steps())
                if other != step and self._agreed_read(
                    other, target, expected).outcome == _READ]
    raise errors.WorkdirError(
        f'The checkpoint of step {step} in {self._manager.directory} is '
        f'damaged ({attempt.problem}). Readable checkpoints: '
        f'{readable or "none"}' + (
            f'; e.g. --checkpoint={readable[-1]}.' if readable else '.'))

  def _agreed_read(self, step: int, target: PyTree,
                   expected: dict[str, Any]) -> _Attempt:
    """Reads `step` on every process; the outcome is the same on all.

    A collective with several processes: each reads, then all take the
    worst outcome, so that a checkpoint one process could not read is
    damaged for all of them.

    Raises:
      errors.WorkdirError: a checkpoint of another configuration.
    """
    attempt = self._read(step, target, expected)
    outcome = attempt.outcome
    if jax.process_count() > 1:
      outcome = int(np.asarray(multihost_utils.process_allgather(
          np.int32(outcome))).max())
    if outcome == _OTHER_CONFIG:
      raise errors.WorkdirError(attempt.problem or (
          f'Another process found that the checkpoint of step {step} in '
          f'{self._manager.directory} does not fit this config.'))
    if outcome == _DAMAGED and attempt.outcome == _READ:
      return _Attempt(_DAMAGED, problem='unreadable on another process')
    return attempt

  def _read(self, step: int, target: PyTree,
            expected: dict[str, Any]) -> _Attempt:
    """Reads checkpoint `step` on this process alone, retrying failures."""
    _quiet_late_read_callbacks()
    for retry in range(_READ_ATTEMPTS):
      attempt = self._read_once(step, target, expected)
      if attempt.outcome != _DAMAGED or retry == _READ_ATTEMPTS - 1:
        return attempt
      wait = _RETRY_SECONDS * 2**retry
      logging.info('Reading the checkpoint of step %d failed (%s); trying '
                   'again in %.1f s.', step, attempt.problem, wait)
      time.sleep(wait)
    raise AssertionError('unreachable')

  def _read_once(self, step: int, target: PyTree,
                 expected: dict[str, Any]) -> _Attempt:
    """Reads checkpoint `step` once.

    Straight through orbax's handlers, not the manager: the manager's
    restore ends in a barrier of all processes, which would hang the ones
    that read if another one failed.
    """
    folder = self._manager.directory / str(step)
    handler = ocp.StandardCheckpointHandler()
    # Damaged files raise many types (OSError, ValueError from tensorstore
    # or JSON, ...). Any is taken as damage only because `restore` sets a
    # checkpoint aside only once an older one has read with the same code.
    part = folder / 'meta'
    try:
      meta = ocp.JsonCheckpointHandler().restore(part)
      if meta.get('shape') != expected:
        return _Attempt(_OTHER_CONFIG, problem=(
            f'{self._manager.directory} holds a checkpoint (step {step}) of '
            f'a run with {meta.get("shape")}, but this config gives '
            f'{expected}. Use another --workdir, or the config that wrote '
            'it.'))
      part = folder / 'state'
      other = self._other_structure(step, handler.metadata(part).tree,
                                    target)
      if other:
        return _Attempt(_OTHER_CONFIG, problem=other)
      state = handler.restore(part, args=ocp.args.StandardRestore(target))
    except Exception as error:  # pylint: disable=broad-exception-caught
      return _Attempt(_DAMAGED, problem=f'{part.name}/: {reason(error)}')
    finally:
      handler.close()
    return _Attempt(_READ, state=state, meta=meta)

  def _other_structure(self, step: int, saved: PyTree,
                       target: PyTree) -> str | None:
    """Why the saved state's tree is not the one to restore, if it is not."""
    saved_paths, wanted = _leaf_paths(saved), _leaf_paths(target)
    if saved_paths == wanted:
      return None
    only_saved, only_wanted = sorted(saved_paths - wanted), sorted(
        wanted - saved_paths)
    return (
        f'{self._manager.directory} holds a checkpoint (step {step}) whose '
        f'state has another structure than this config\'s ({len(only_saved)} '
        f'entries only in the checkpoint, e.g. {only_saved[:1]}; '
        f'{len(only_wanted)} only in this config, e.g. {only_wanted[:1]}): '
        'the optimizer differs (config.reinit_lr_multiplier switched to or '
        'from 1.0 adds a masked scale to it), or the code changed. It is '
        'not damaged and was left as it is: resume with the config that '
        'wrote it, or start another --workdir from its weights with '
        '--config.init_from.')

  def _set_aside(self, damaged: list[tuple[int, str]], restored: int) -> None:
    """Moves damaged checkpoints out of orbax's sight, with one warning."""
    if not damaged:
      return
    directory = str(self._manager.directory)
    destination = directory.rstrip('/') + '_damaged'
    stamp = time.strftime('%Y%m%dT%H%M%S', time.gmtime())
    moved = [os.path.join(destination, f'{step}-{stamp}')
             for step, _ in damaged]
    logging.warning(
        'Damaged checkpoint%s in %s: %s. Restoring step %d instead; %s.',
        's' * (len(damaged) > 1), directory, _listing(damaged), restored,
        'left in place (read-only)' if self._read_only
        else f'moved to {", ".join(moved)}')
    if self._read_only:
      return
    if jax.process_index() == 0:
      os.makedirs(destination, exist_ok=True)
      for (step, _), path in zip(damaged, moved):
        os.rename(os.path.join(directory, str(step)), path)
    if jax.process_count() > 1:  # The others must see the moves.
      multihost_utils.sync_global_devices('checkpoints: damaged set aside')
    self._manager.reload()


def _listing(damaged: list[tuple[int, str]]) -> str:
  return '; '.join(f'step {step} ({problem})' for step, problem in damaged)


def _none_read(directory: Any, failed: list[tuple[int, str]]) -> str:
  """The refusal when no checkpoint reads: one shared error is named as
  the likely cause (damage strikes checkpoints one by one)."""
  # The same error, but for the step folder it names.
  shared = {re.sub(rf'/{step}/', '/<step>/', problem)
            for step, problem in failed}
  if len(failed) > 1 and len(shared) == 1:
    return (f'No checkpoint in {directory} can be read, all '
            f'{len(failed)} for the same reason ({shared.pop()}): a cause '
            'they share (the code, its libraries, the config or the '
            'storage) rather than damage, so they were left as they are. '
            'Resume with the code and config that wrote them, or use '
            'another --workdir.')
  return (f'No checkpoint in {directory} can be read: {_listing(failed)}. '
          'Restore them from a copy, or move them away to start from '
          'scratch.')
