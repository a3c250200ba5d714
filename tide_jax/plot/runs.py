"""A training run's curves, read from its workdir (local or ``gs://``, through etils.epath).

A workdir written by ``tide_jax.train.loop.train_and_evaluate`` holds ``metrics.jsonl``
(one JSON object per step with ``train/*`` and ``eval/*`` values), ``config.json`` (the
resolved config) and TensorBoard event files under ``tensorboard/``. A run that was
interrupted and resumed may repeat steps in ``metrics.jsonl``; the last row of a step wins.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
from etils import epath

from tide_jax.plot import events

TOKENS_PER_S = "train/tokens_per_s"  # derived from TensorBoard wall times (events.py)


@dataclasses.dataclass(frozen=True)
class Run:
  """The curves of one workdir.

  Attributes:
    name: the label used in legends.
    workdir: where it was read from.
    series: metric name -> ``(steps int64 [n], values float64 [n])`` sorted by step.
    config: the resolved config (``config.json``), or an empty dict when absent.
    notes: what could not be read, in words (empty when everything was there).
  """

  name: str
  workdir: str
  series: dict[str, tuple[np.ndarray, np.ndarray]]
  config: dict
  notes: tuple[str, ...] = ()


def _rows(path: epath.Path) -> tuple[list[dict], int]:
  """Parsed rows of metrics.jsonl and the number of unreadable lines (a cut-off last line)."""
  rows, bad = [], 0
  for line in path.read_text().splitlines():
    if not line.strip():
      continue
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      bad += 1
  return rows, bad


def _series_from_rows(rows: list[dict]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  by_metric: dict[str, dict[int, float]] = {}
  for row in rows:
    step = int(row["step"])
    for key, value in row.items():
      if key != "step" and isinstance(value, (int, float)):
        by_metric.setdefault(key, {})[step] = float(value)
  series = {}
  for key, points in by_metric.items():
    steps = np.array(sorted(points), np.int64)
    series[key] = (steps, np.array([points[s] for s in steps], np.float64))
  return series


def _tokens_per_step(config: dict) -> int | None:
  try:
    return int(config["train"]["batch_size"]) * int(config["data"]["max_len"])
  except (KeyError, TypeError, ValueError):
    return None


def default_names(workdirs: list[str]) -> list[str]:
  """Legend names: each workdir's last path component, or the last two when those repeat."""
  parts = [str(w).rstrip("/").split("/") for w in workdirs]
  names = [p[-1] for p in parts]
  if len(set(names)) < len(names):
    names = ["/".join(p[-2:]) for p in parts]
  if len(set(names)) < len(names):
    names = [str(w) for w in workdirs]
  return names


def load_run(workdir: str, name: str | None = None) -> Run:
  """Reads a run's metrics, config and step times.

  Args:
    workdir: a local directory or a ``gs://`` URL that a training run wrote.
    name: legend label (default: the workdir's last path component).

  Raises:
    FileNotFoundError: when the workdir holds no ``metrics.jsonl``.
  """
  root = epath.Path(workdir)
  metrics_path = root / "metrics.jsonl"
  if not metrics_path.exists():
    raise FileNotFoundError(
        f"{workdir} holds no metrics.jsonl; pass the workdir of a training run "
        "(the --workdir given to tide_jax.main)."
    )
  notes = []
  rows, bad = _rows(metrics_path)
  if bad:
    notes.append(f"{bad} unreadable line(s) of metrics.jsonl skipped")
  series = _series_from_rows(rows)
  config_path = root / "config.json"
  config = json.loads(config_path.read_text()) if config_path.exists() else {}
  if not config:
    notes.append("no config.json, so no tokens/s")
  tokens = _tokens_per_step(config)
  times = events.read_step_times(root / "tensorboard")
  if times is None:
    notes.append("no TensorBoard event files, so no tokens/s")
  elif tokens is not None:
    if times.truncated_records:
      notes.append(f"{times.truncated_records} cut-off TensorBoard record(s) skipped")
    steps, rates = events.tokens_per_second(times, tokens)
    if steps.size:
      series[TOKENS_PER_S] = (steps, rates)
  label = name or default_names([str(workdir)])[0]
  return Run(label, os.fspath(workdir), series, config, tuple(notes))
