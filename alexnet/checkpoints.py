"""Orbax checkpoints of the whole training state, written asynchronously.

A checkpoint holds one host copy of the state (tower parameters stored once,
stacked [2, ...], never one copy per device) and a JSON record of the run:
the step (which is also the data position, since the input pipeline is a
deterministic function of seed and step), the seed, and the settings that
fix parameter shapes, checked on restore so that a workdir cannot be resumed
with an incompatible config.

Orbax writes each checkpoint into a temporary directory and renames it when
complete, so a process killed mid-write leaves the previous checkpoints
usable; the half-written one is ignored (and cleaned up) on the next start.

A checkpoint damaged later must not block the run: `restore` resumes from
the newest checkpoint that reads, and sets the damaged newer ones aside
(alexnet/checkpoint_reads.py, which also tells damage from a checkpoint of
another configuration).

A run takes its workdir's lock (alexnet/workdir_lock.py) before it opens
the directory for writing, so that no other run writes there meanwhile.

With several processes (`jax.distributed`) every process calls `save` and
`restore`; orbax writes each array once and synchronises the processes, so
the directory must be on a filesystem all of them share. `restore` first
checks that every process sees the same latest step, so that a directory
that is not shared fails with an error instead of a hang.
"""

import contextlib
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from alexnet import checkpoint_reads
from alexnet import errors
from alexnet import workdir_lock

PyTree = Any


def _error(metrics: dict[str, float]) -> float:
  return metrics['error']


class Checkpoints:
  """Saves and restores training state under one directory."""

  def __init__(self, directory: str, *, keep: int, read_only: bool = False):
    """Opens (or creates) the checkpoint directory.

    Args:
      directory: absolute path, e.g. <workdir>/checkpoints.
      keep: latest checkpoints to keep; the one with the lowest validation
        error is kept besides them.
      read_only: only read (e.g. to evaluate while a run trains there):
        creates, writes and cleans up nothing, and takes no lock.

    Raises:
      errors.WorkdirError: (unless read-only) another live run writes
        there, see alexnet/workdir_lock.py; or the directory cannot be written.
    """
    preserve = policies.AnyPreservationPolicy([
        policies.LatestN(n=keep),
        policies.BestN(get_metric_fn=_error, reverse=True, n=1,
                       keep_checkpoints_without_metrics=False),
    ])
    # best_fn makes orbax write `metrics` to disk (not only keep them in
    # memory), so the best checkpoint is still known after a restart.
    options = ocp.CheckpointManagerOptions(
        preservation_policy=preserve, best_fn=_error, best_mode='min',
        read_only=read_only, create=not read_only,
        cleanup_tmp_directories=not read_only, enable_async_checkpointing=True)
    # Taken before orbax opens the directory: opening it for writing
    # cleans up temporary directories, which may be another run's saves.
    self._lock = None if read_only else workdir_lock.hold(directory)
    try:
      self._manager = ocp.CheckpointManager(
          directory, options=options, item_names=('state', 'meta'))
    except BaseException:
      self._release()
      raise
    self._reader = checkpoint_reads.Reader(self._manager,
                                           read_only=read_only)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def agreed_latest_step(self) -> int | None:
    """The latest step, checked to be the one every process sees.

    Called by all processes together (a collective when there are several).

    Raises:
      errors.WorkdirError: the directory is not shared by all processes
        (or holds different checkpoints on different hosts).
    """
    step = self.latest_step()
    if jax.process_count() == 1:
      return step
    seen = np.asarray(multihost_utils.process_allgather(
        np.int64(-1 if step is None else step))).reshape(-1)
    if len(set(seen.tolist())) > 1:
      views = ', '.join(f'process {i}: {"none" if s < 0 else f"step {s}"}'
                        for i, s in enumerate(seen.tolist()))
      raise errors.WorkdirError(
          f'The processes see different latest checkpoints in '
          f'{self._manager.directory} ({views}). The workdir must be on a '
          'filesystem all processes share (e.g. NFS, or a bucket mounted '
          'with gcsfuse), with the same --workdir on every process.')
    return step

  def best_step(self) -> int | None:
    """The step with the lowest validation error; None if none has one."""
    return self._manager.best_step()

  def find(self, which: str) -> int:
    """The checkpoint to evaluate, by name.

    Args:
      which: 'latest', 'best' (lowest validation error) or a step number
        such as '1000'.

    Returns:
      The step of that checkpoint.

    Raises:
      errors.WorkdirError: no such checkpoint, naming those there are.
    """
    steps = sorted(self._manager.all_steps())
    where = f'{self._manager.directory} (steps: {steps or "none"})'
    if not steps:
      raise errors.WorkdirError(
          f'No checkpoint in {where}: train first, or give the --workdir '
          'of a run.')
    if which == 'best':
      step = self.best_step()
      if step is None:
        raise errors.WorkdirError(
            f'No checkpoint in {where} was evaluated yet, so none is the '
            'best; use --checkpoint=latest or a step number.')
      return step
    step = steps[-1] if which == 'latest' else int(which)
    if step not in steps:
      raise errors.WorkdirError(f'No checkpoint of step {step} in {where}.')
    return step

  def check_lock(self) -> None:
    """Stops a run whose lock a heartbeat found taken (no file access).

    Raises:
      errors.WorkdirError: another run took over the workdir, naming it
        (see alexnet/workdir_lock.py).
    """
    self._check_lock(fresh=False)

  def _check_lock(self, fresh: bool) -> None:
    if self._lock is not None and (fresh or self._lock.lost):
      self._lock.check()

  def save(self, step: int, state: PyTree, meta: dict[str, Any],
           error: float | None = None) -> None:
    """Starts an asynchronous save of host `state` and JSON `meta`.

    Args:
      step: training steps done.
      state: host arrays (numpy), the same tree on every process.
      meta: JSON-serialisable record of the run.
      error: validation error at this step, if it was evaluated; ranks the
        checkpoint for the keep-the-best policy.

    Raises:
      errors.WorkdirError: this run's lock was taken over: nothing saved.
    """
    self._check_lock(fresh=True)
    if step in self._manager.all_steps():
      return  # Saved already (e.g. at an evaluation that was also the end).
    metrics = None if error is None else {'error': float(error)}
    self._manager.save(
        step, metrics=metrics, force=True,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                meta=ocp.args.JsonSave(meta)))

  def restore(self, like: PyTree, expected: dict[str, Any],
              step: int | None = None) -> tuple[PyTree, dict[str, Any]] | None:
    """The latest readable (or given) checkpoint, or None if there is none.

    Called by all processes together. Without `step`, damaged checkpoints
    newer than the one restored are moved to <directory>_damaged/ (unless
    read-only) with one warning.

    Args:
      like: a state tree with the shapes and dtypes to restore into: host
        arrays, or `jax.ShapeDtypeStruct`s (e.g. from `jax.eval_shape`).
      expected: meta['shape'] must equal this; otherwise the checkpoint
        comes from another configuration.
      step: restore this step instead of the latest readable one.

    Returns:
      (state, meta), or None for an empty directory.

    Raises:
      errors.WorkdirError: shapes that do not fit this config, processes
        that see different latest steps, a damaged `step` (naming the
        readable ones), or no checkpoint that reads at all.
    """
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    if step is not None:
      return self._reader.read_step(step, target, expected)
    self.agreed_latest_step()
    return self._reader.read_latest(target, expected)

  def wait(self) -> None:
    """Blocks until the pending asynchronous save is on disk."""
    with self._unless_lost('wait for'):
      self._manager.wait_until_finished()

  def close(self) -> None:
    """Ends pending work and releases the directory's lock."""
    try:
      with self._unless_lost('end'):
        self._manager.close()
    finally:
      self._release()

  @contextlib.contextmanager
  def _unless_lost(self, what: str):
    """Once another run has taken the workdir over, a save this run had
    under way may fail (the new holder cleans up unfinished saves): that
    is logged, so that the run ends on the one line about the lock."""
    try:
      yield
    except Exception as error:  # pylint: disable=broad-exception-caught
      if self._lock is None or not self._lock.lost:
        raise
      logging.warning('Could not %s the save under way when the lock was '
                      'lost: %s', what, checkpoint_reads.reason(error))

  def _release(self) -> None:
    if self._lock is not None:
      self._lock.release()
      self._lock = None
