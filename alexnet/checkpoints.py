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

With several processes (`jax.distributed`) every process calls `save` and
`restore`; orbax writes each array once and synchronises the processes, so
the directory must be on a filesystem all of them share. `restore` first
checks that every process sees the same latest step, so that a directory
that is not shared fails with an error instead of a hang.
"""

from typing import Any

import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

PyTree = Any


class IncompatibleCheckpointError(ValueError):
  """The workdir holds a checkpoint of a differently shaped run."""


class UnsharedWorkdirError(RuntimeError):
  """Processes of one run see different checkpoints in the same directory."""


class Checkpoints:
  """Saves and restores training state under one directory."""

  def __init__(self, directory: str, *, keep: int):
    """Opens (or creates) the checkpoint directory.

    Args:
      directory: absolute path, e.g. <workdir>/checkpoints.
      keep: latest checkpoints to keep; the one with the lowest validation
        error is kept besides them.
    """
    preserve = policies.AnyPreservationPolicy([
        policies.LatestN(n=keep),
        policies.BestN(get_metric_fn=lambda metrics: metrics['error'],
                       reverse=True, n=1,
                       keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=preserve, cleanup_tmp_directories=True,
        enable_async_checkpointing=True)
    self._manager = ocp.CheckpointManager(
        directory, options=options, item_names=('state', 'meta'))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def agreed_latest_step(self) -> int | None:
    """The latest step, checked to be the one every process sees.

    Called by all processes together (a collective when there are several).

    Raises:
      UnsharedWorkdirError: the directory is not shared by all processes
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
      raise UnsharedWorkdirError(
          f'The processes see different latest checkpoints in '
          f'{self._manager.directory} ({views}). The workdir must be on a '
          'filesystem all processes share (e.g. NFS or a GCS bucket), with '
          'the same --workdir on every process.')
    return step

  def best_step(self) -> int | None:
    return self._manager.best_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: PyTree, meta: dict[str, Any],
           error: float | None = None) -> None:
    """Starts an asynchronous save of host `state` and JSON `meta`.

    Args:
      step: training steps done.
      state: host arrays (numpy), the same tree on every process.
      meta: JSON-serialisable record of the run.
      error: validation error at this step, if it was evaluated; ranks the
        checkpoint for the keep-the-best policy.
    """
    if step in self._manager.all_steps():
      return  # Saved already (e.g. at an evaluation that was also the end).
    metrics = None if error is None else {'error': float(error)}
    self._manager.save(
        step, metrics=metrics, force=True,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                meta=ocp.args.JsonSave(meta)))

  def restore(self, like: PyTree, expected: dict[str, Any],
              step: int | None = None) -> tuple[PyTree, dict[str, Any]] | None:
    """The latest (or given) checkpoint, or None if there is none.

    Args:
      like: a state tree with the shapes and dtypes to restore into.
      expected: meta['shape'] must equal this; otherwise the checkpoint
        comes from another configuration.
      step: restore this step instead of the latest.

    Returns:
      (state, meta), or None for an empty directory.

    Raises:
      IncompatibleCheckpointError: shapes that do not fit this config.
      UnsharedWorkdirError: processes that see different latest steps.
    """
    if step is None:
      step = self.check_latest(expected)
    else:
      self._check(step, expected)
    if step is None:
      return None
    meta = self._meta(step)
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    return restored['state'], meta

  def check_latest(self, expected: dict[str, Any]) -> int | None:
    """The latest step, after checking it can be restored with `expected`.

    Cheap (reads JSON only), so a run can refuse a workdir before any work.
    Called by all processes together.

    Args:
      expected: the settings that fix parameter shapes (meta['shape']).

    Returns:
      The latest step every process sees, or None for an empty directory.

    Raises:
      IncompatibleCheckpointError: a checkpoint of another configuration.
      UnsharedWorkdirError: processes that see different latest steps.
    """
    step = self.agreed_latest_step()
    if step is not None:
      self._check(step, expected)
    return step

  def _meta(self, step: int) -> dict[str, Any]:
    return self._manager.restore(
        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']

  def _check(self, step: int, expected: dict[str, Any]) -> None:
    shape = self._meta(step).get('shape')
    if shape != expected:
      raise IncompatibleCheckpointError(
          f'{self._manager.directory} holds a checkpoint (step {step}) of a '
          f'run with {shape}, but this config gives {expected}. '
          'Use another --workdir, or the config that wrote it.')

  def wait(self) -> None:
    """Blocks until the pending asynchronous save is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
