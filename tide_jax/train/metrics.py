"""Metrics as JSON lines and TensorBoard event files, plus the console progress line.

``metrics.jsonl`` is written through ``etils.epath``. Locally each row is appended at once;
on object stores (``gs://``: no append) rows are buffered and the file is rewritten whole
at each ``flush`` (the loop flushes at log steps and before every checkpoint, so every row
a checkpoint covers is durable). TensorBoard events are written with tensorboardX under
``<workdir>/tensorboard``; for an object-store workdir they are written to a local
directory and copied up at each flush. In a multi-host run only process 0 writes.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from typing import Any, Mapping

import numpy as np
from absl import logging
from etils import epath


def _is_local(path: epath.Path) -> bool:
  return "://" not in str(path)


def to_python(metrics: Mapping[str, Any]) -> dict[str, float]:
  return {k: float(np.asarray(v)) for k, v in metrics.items()}


class _TensorBoard:
  """tensorboardX writer; for remote workdirs a local mirror uploaded by ``sync``."""

  def __init__(self, tb_dir: epath.Path):
    self.remote = None if _is_local(tb_dir) else tb_dir
    self.local = tempfile.mkdtemp(prefix="tide_tb_") if self.remote else str(tb_dir)
    from tensorboardX import SummaryWriter

    self.writer = SummaryWriter(self.local)

  def add(self, values: Mapping[str, float], step: int) -> None:
    for k, v in values.items():
      self.writer.add_scalar(k, v, step)

  def sync(self) -> None:
    self.writer.flush()
    if self.remote is None:
      return
    self.remote.mkdir(parents=True, exist_ok=True)
    for f in epath.Path(self.local).iterdir():
      (self.remote / f.name).write_bytes(f.read_bytes())

  def close(self) -> None:
    self.sync()
    self.writer.close()
    if self.remote is not None:
      shutil.rmtree(self.local, ignore_errors=True)


def row_key(row: Mapping[str, Any]) -> tuple[int, tuple[str, ...]]:
  """A row's identity: its step and its metric groups (``train``, ``eval``, ...)."""
  groups = sorted({k.split("/", 1)[0] for k in row if k != "step"})
  return int(row.get("step", 0)), tuple(groups)


class MetricsWriter:
  """Writes one JSON object per logged step and group; keeps TensorBoard in sync.

  Writing is idempotent per (step, group): a row written again replaces the earlier one,
  and rows repeated in an existing file (two runs appending to one workdir) are kept once,
  so a resumed run's file equals an uninterrupted one's.

  Args:
    workdir: local directory or URL.
    resume_step: the restored step; rows after it (written by the interrupted run) are
      dropped.
    active: False on every process but the first of a multi-host run (writes nothing).
  """

  def __init__(self, workdir: str, *, resume_step: int | None = None, active: bool = True):
    self.path = epath.Path(workdir) / "metrics.jsonl"
    self.active = active
    self.rows: list[dict[str, Any]] = []
    self.index: dict[tuple[int, tuple[str, ...]], int] = {}
    self.tb = None
    if not active:
      return
    if self.path.exists():
      existing = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
      # Rows past the restored step belong to the interrupted run and are replaced.
      keep_until = -1 if resume_step is None else resume_step
      for row in existing:
        if row.get("step", 0) <= keep_until:
          self._keep(row)
    self._write_all()
    try:
      self.tb = _TensorBoard(epath.Path(workdir) / "tensorboard")
    except Exception as err:  # pragma: no cover - tensorboard is optional at run time
      logging.warning("TensorBoard logging disabled: %s", err)

  def _write_all(self) -> None:
    self.path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))

  def _keep(self, row: dict[str, Any]) -> bool:
    """Adds ``row``, replacing a row of the same step and group; True if it was new."""
    key = row_key(row)
    if key in self.index:
      self.rows[self.index[key]] = row
      return False
    self.index[key] = len(self.rows)
    self.rows.append(row)
    return True

  def write(self, step: int, metrics: Mapping[str, Any], prefix: str = "") -> None:
    if not self.active:
      return
    values = {f"{prefix}{k}": v for k, v in to_python(metrics).items()}
    row = {"step": int(step), **values}
    appended = self._keep(row)
    if _is_local(self.path):
      if appended:
        with self.path.open("a") as f:
          f.write(json.dumps(row) + "\n")
      else:
        self._write_all()
    if self.tb is not None:
      self.tb.add(values, int(step))

  def flush(self) -> None:
    if not self.active:
      return
    if not _is_local(self.path):
      self._write_all()
    if self.tb is not None:
      self.tb.sync()

  def close(self) -> None:
    if not self.active:
      return
    self.flush()
    if self.tb is not None:
      self.tb.close()
      self.tb = None


class Progress:
  """Console progress: step, loss, tokens/s, elapsed, ETA."""

  def __init__(self, start_step: int, total_steps: int):
    self.start_step = start_step
    self.total = total_steps
    self.t0 = time.perf_counter()
    self.last_t = self.t0
    self.last_step = start_step
    self.tokens_since = 0

  def add_tokens(self, n: int) -> None:
    self.tokens_since += n

  def line(self, step: int, loss: float) -> str:
    now = time.perf_counter()
    dt = max(now - self.last_t, 1e-9)
    tok_s = self.tokens_since / dt
    elapsed = now - self.t0
    done = step - self.start_step
    eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
    self.last_t, self.last_step, self.tokens_since = now, step, 0
    return (
        f"step {step}/{self.total}  loss {loss:.4f}  {tok_s:,.0f} tok/s  "
        f"elapsed {_fmt(elapsed)}  eta {_fmt(eta)}"
    )


def _fmt(seconds: float) -> str:
  if not np.isfinite(seconds):
    return "--:--"
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"
