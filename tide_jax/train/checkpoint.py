"""Orbax checkpoints of the train state, the data-iterator position and the model shape.

One ``CheckpointManager`` under ``<workdir>/checkpoints`` holds, per step: ``state``
(params, optimizer state, step, RNG), ``data`` (the iterator position, JSON) and ``model``
(the student's shape, JSON, used to refuse resuming into a different model). Paths go
through ``etils.epath``, so a ``gs://`` workdir uses the same code.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Mapping

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

# Shape fields that must agree between a checkpoint and the model being trained.
SHAPE_FIELDS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "intermediate_size",
    "tie_word_embeddings",
    "qk_norm",
    "qkv_bias",
    "o_bias",
    "param_dtype",
)


class CheckpointWriteError(OSError):
  """A checkpoint could not be written; the message is one sentence naming the step."""


def _write_error(step: int | None, directory, err: Exception) -> CheckpointWriteError:
  """One sentence for a failed save; tensorstore reports the OS error as a code in its text."""
  text = " ".join(str(err).split())
  code = re.search(r"os_error_code='(\d+)'", text)
  if isinstance(err, OSError) and err.errno is not None:
    reason = f"{err.strerror}: {err.filename}" if err.filename else err.strerror
  elif code:
    reason = os.strerror(int(code.group(1)))
  else:
    reason = text[:200]
  what = f"the checkpoint of step {step}" if step is not None else "a checkpoint"
  return CheckpointWriteError(
      f"Could not write {what} to {directory} ({reason}); free space on that file system "
      "or use a writable --workdir, then re-run to resume from the last checkpoint."
  )


class Checkpointer:
  """Thin wrapper over ``ocp.CheckpointManager`` with resume checks."""

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = False):
    self.directory = epath.Path(workdir) / "checkpoints"
    self.async_save = async_save
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save
        ),
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(
      self,
      step: int,
      state: Any,
      data_state: Mapping[str, Any],
      model_meta: Mapping[str, Any],
      *,
      force: bool = False,
  ) -> bool:
    try:
      return self.manager.save(
          step,
          args=ocp.args.Composite(
              state=ocp.args.StandardSave(state),
              data=ocp.args.JsonSave(dict(data_state)),
              model=ocp.args.JsonSave(dict(model_meta)),
          ),
          force=force,
      )
    except Exception as err:  # a full or read-only file system, whatever layer reports it
      raise _write_error(step, self.directory, err) from err

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """Restores onto the shardings carried by ``abstract_state`` (resharding if needed)."""
    restored = self.manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
        ),
    )
    return restored.state, restored.data

  def restore_newest_intact(
      self,
      abstract_state: Any,
      current_meta: Mapping[str, Any],
      say: Callable[[str], None],
      *,
      set_aside: bool = True,
  ) -> tuple[int, Any, dict[str, Any]] | None:
    """Restores the newest checkpoint that reads back, falling back over damaged ones.

    A step that cannot be read (a truncated file, missing metadata, an empty step folder)
    is reported with ``say``, naming the step and the error, and the next older one is
    tried. With ``set_aside`` (training) a damaged step is moved, not deleted, to
    ``<workdir>/checkpoints_damaged/`` so that training can write that step again; without
    it (evaluation) nothing is touched. A checkpoint of a different model is an error, not
    damage (:func:`check_same_model`).

    Returns:
      ``(step, state, data_state)``, or None when no checkpoint is intact.
    """
    workdir = str(self.directory.parent)
    for step in sorted(self.manager.all_steps(read=True), reverse=True):
      saved = read_model_meta(workdir, step)
      if saved is not None:
        check_same_model(workdir, saved, current_meta)
      try:
        state, data_state = self.restore(step, abstract_state)
        return step, state, data_state
      except Exception as err:  # any failure to read the step back is damage to report
        reason = " ".join(str(err).split())[:200] or type(err).__name__
      if set_aside:
        where = set_damaged_step_aside(self.directory, step)
        self.manager.reload()
        say(
            f"Checkpoint of step {step} in {self.directory} is damaged ({reason}); moved it "
            f"to {where} and falling back to the newest intact checkpoint."
        )
      else:
        say(
            f"Checkpoint of step {step} in {self.directory} is damaged ({reason}); falling "
            "back to the newest intact checkpoint."
        )
    return None

  def wait(self) -> None:
    try:
      self.manager.wait_until_finished()
    except Exception as err:  # an asynchronous save that failed
      raise _write_error(None, self.directory, err) from err

  def close(self) -> None:
    self.wait()
    self.manager.close()


def set_damaged_step_aside(directory: epath.Path, step: int) -> epath.Path:
  """Moves ``directory/<step>`` to ``<workdir>/checkpoints_damaged/<step>[.n]``; returns it.

  Only the first process moves it (orbax writes from every process, so all of them must
  agree that the step is gone); the others wait for it.
  """
  damaged = directory.parent / "checkpoints_damaged"
  target = damaged / str(step)
  copy = 1
  while target.exists():
    target = damaged / f"{step}.{copy}"
    copy += 1
  if jax.process_index() == 0:
    damaged.mkdir(parents=True, exist_ok=True)
    (directory / str(step)).rename(target)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"tide_jax_set_aside_step_{step}")
  return target


def model_meta(model_cfg) -> dict[str, Any]:
  """The shape fields of a DecoderConfig as JSON."""
  return {k: getattr(model_cfg, k) for k in SHAPE_FIELDS}


def check_same_model(workdir: str, saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
  """Refuses to resume a checkpoint of a different model shape, naming the fields."""
  diffs = [
      f"{k} {saved.get(k)!r} in the checkpoint vs {current.get(k)!r} now"
      for k in SHAPE_FIELDS
      if saved.get(k) != current.get(k)
  ]
  if diffs:
    raise ValueError(
        f"Workdir {workdir} holds a checkpoint of a different model ("
        + "; ".join(diffs)
        + "); use a new --workdir or the config that made it."
    )


def find_latest_step(workdir: str) -> int | None:
  """Latest checkpointed step without creating anything in the workdir."""
  directory = epath.Path(workdir) / "checkpoints"
  if not directory.exists():
    return None
  # Finalised only: a local step directory is renamed into place when complete; on GCS,
  # where there is no rename, orbax writes commit_success.txt last. A save cut short by a
  # kill leaves neither and is ignored.
  steps = [
      int(p.name)
      for p in directory.iterdir()
      if p.name.isdigit() and ocp.path.step.is_path_finalized(p)
  ]
  return max(steps) if steps else None


def read_model_meta(workdir: str, step: int) -> dict[str, Any] | None:
  """The saved model shape of a step, read directly (no manager, no writes).

  None when it is missing or unreadable: a damaged step is then found, reported and passed
  over when it is restored (:meth:`Checkpointer.restore_newest_intact`).
  """
  path = epath.Path(workdir) / "checkpoints" / str(step) / "model" / "metadata"
  try:
    meta = json.loads(path.read_text())
  except (OSError, ValueError):
    return None
  return meta if isinstance(meta, dict) else None
