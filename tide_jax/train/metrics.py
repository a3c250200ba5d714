"""Metrics as JSON lines and TensorBoard event files, plus the console progress line.

``metrics.jsonl`` is written through ``etils.epath``; on object stores (no append) the
file is rewritten whole at each flush, which is cheap at the logging rates used here.
TensorBoard events are written with tensorboardX under ``<workdir>/tensorboard``.
"""

from __future__ import annotations

import json
import time
from typing import Any, Mapping

import numpy as np
from absl import logging
from etils import epath


def _is_local(path: epath.Path) -> bool:
  return "://" not in str(path)


def to_python(metrics: Mapping[str, Any]) -> dict[str, float]:
  return {k: float(np.asarray(v)) for k, v in metrics.items()}


class MetricsWriter:
  """Appends one JSON object per logged step; keeps TensorBoard in sync."""

  def __init__(self, workdir: str, *, resume_step: int | None = None):
    self.path = epath.Path(workdir) / "metrics.jsonl"
    self.rows: list[dict[str, Any]] = []
    if self.path.exists():
      existing = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
      # Rows past the restored step belong to the interrupted run and are replaced.
      keep_until = -1 if resume_step is None else resume_step
      self.rows = [r for r in existing if r.get("step", 0) <= keep_until]
    self._write_all()
    self.tb = None
    tb_dir = epath.Path(workdir) / "tensorboard"
    try:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(str(tb_dir))
    except Exception as err:  # pragma: no cover - tensorboard is optional at run time
      logging.warning("TensorBoard logging disabled: %s", err)

  def _write_all(self) -> None:
    self.path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))

  def write(self, step: int, metrics: Mapping[str, Any], prefix: str = "") -> None:
    values = {f"{prefix}{k}": v for k, v in to_python(metrics).items()}
    row = {"step": int(step), **values}
    self.rows.append(row)
    if _is_local(self.path):
      with self.path.open("a") as f:
        f.write(json.dumps(row) + "\n")
    else:
      self._write_all()
    if self.tb is not None:
      for k, v in values.items():
        self.tb.add_scalar(k, v, int(step))

  def flush(self) -> None:
    if self.tb is not None:
      self.tb.flush()

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()


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
    return (f"step {step}/{self.total}  loss {loss:.4f}  {tok_s:,.0f} tok/s  "
            f"elapsed {_fmt(elapsed)}  eta {_fmt(eta)}")


def _fmt(seconds: float) -> str:
  if not np.isfinite(seconds):
    return "--:--"
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"
