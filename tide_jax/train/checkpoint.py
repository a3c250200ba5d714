"""Orbax checkpoints of the train state, the data-iterator position and the model shape.

One ``CheckpointManager`` under ``<workdir>/checkpoints`` holds, per step: ``state``
(params, optimizer state, step, RNG), ``data`` (the iterator position, JSON) and ``model``
(the student's shape, JSON, used to refuse resuming into a different model). Paths go
through ``etils.epath``, so a ``gs://`` workdir uses the same code.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp
from etils import epath

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
    return self.manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(dict(data_state)),
            model=ocp.args.JsonSave(dict(model_meta)),
        ),
        force=force,
    )

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """Restores onto the shardings carried by ``abstract_state`` (resharding if needed)."""
    restored = self.manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
        ),
    )
    return restored.state, restored.data

  def saved_model_meta(self, step: int) -> dict[str, Any]:
    return self.manager.restore(step, args=ocp.args.Composite(model=ocp.args.JsonRestore())).model

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


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
  """Reads the saved model shape of a step directly (no manager, no writes)."""
  import json

  path = epath.Path(workdir) / "checkpoints" / str(step) / "model" / "metadata"
  if not path.exists():
    return None
  return json.loads(path.read_text())


def abstract_like(tree: Any) -> Any:
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
