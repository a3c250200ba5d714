"""PNG figures of one or several runs on shared axes (matplotlib, without pyplot).

Figures are built as ``matplotlib.figure.Figure`` objects, never through pyplot's global
state, so plotting works the same in a terminal, a notebook kernel and a test, and
nothing is shown on screen. Each run keeps its colour across figures. Per-step training
curves with many points are drawn twice: every step as a thin line and a moving average
as the labelled line.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Sequence

import numpy as np
from etils import epath
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from tide_jax.plot import runs as runs_lib

_SMOOTH_FROM = 50  # curves with at least this many points get a moving average
_COLORS = ("C0", "C1", "C2", "C3", "C4", "C5", "C6", "C7", "C8", "C9")


@dataclasses.dataclass(frozen=True)
class FigureSpec:
  """One figure: which metric, and how its axes are labelled."""

  name: str  # file stem of the PNG
  metric: str  # key in metrics.jsonl (or runs.TOKENS_PER_S)
  title: str
  ylabel: str
  hint: str  # what enables the metric, for the "not logged" message


FIGURES = (
    FigureSpec("loss", "train/loss", "Training loss", "loss (nats)", "always logged"),
    FigureSpec(
        "heldout_masked_nll",
        "eval/masked_nll",
        "Held-out masked-token NLL (fixed noise)",
        "nats per masked token",
        "set train.eval_every > 0",
    ),
    FigureSpec(
        "bits_per_byte",
        "eval/bits_per_byte",
        "Held-out bits per byte (diffusion bound)",
        "bits per UTF-8 byte",
        "set eval.bpb_during_training=True",
    ),
    FigureSpec(
        "learning_rate",
        "train/learning_rate",
        "Learning rate",
        "learning rate",
        "always logged",
    ),
    FigureSpec(
        "grad_norm",
        "train/grad_norm",
        "Gradient norm (before clipping)",
        "global L2 norm",
        "always logged",
    ),
    FigureSpec(
        "tokens_per_s",
        runs_lib.TOKENS_PER_S,
        "Training throughput",
        "tokens/s",
        "needs TensorBoard event files and config.json in the workdir",
    ),
    FigureSpec(
        "distillation",
        "train/distill/loss",
        "Distillation term (weight x term)",
        "nats",
        "only recipes with a teacher log it",
    ),
)


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
  """Trailing mean over ``window`` points: float64 ``[n - window + 1]``."""
  kernel = np.ones(window) / window
  return np.convolve(values, kernel, mode="valid")


def _draw(ax, steps: np.ndarray, values: np.ndarray, label: str, color: str) -> None:
  if steps.size >= _SMOOTH_FROM:
    window = max(2, steps.size // 25)
    ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
    ax.plot(steps[window - 1 :], moving_average(values, window), color=color, label=label)
  else:
    ax.plot(steps, values, color=color, label=label, marker="o" if steps.size < 12 else None)


def metric_figure(spec: FigureSpec, runs: Sequence[runs_lib.Run]) -> Figure | None:
  """The figure of ``spec.metric`` for every run that logged it; None when none did.

  Runs without the metric are named in a note under the axes.
  """
  present = [(i, r) for i, r in enumerate(runs) if spec.metric in r.series]
  if not present:
    return None
  fig = Figure(figsize=(7.0, 4.2), dpi=120, layout="constrained")
  ax = fig.add_subplot()
  for i, run in present:
    steps, values = run.series[spec.metric]
    _draw(ax, steps, values, run.name, _COLORS[i % len(_COLORS)])
  ax.set_title(spec.title)
  ax.set_xlabel("step")
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.set_ylabel(spec.ylabel)
  ax.grid(True, alpha=0.3)
  ax.legend(title="run")
  absent = [r.name for r in runs if spec.metric not in r.series]
  if absent:
    ax.text(
        0.0,
        -0.16,
        f"not logged by: {', '.join(absent)} ({spec.hint})",
        transform=ax.transAxes,
        fontsize=8,
        color="0.35",
    )
  return fig


def save_png(fig: Figure, path: str | epath.Path) -> str:
  """Writes ``fig`` as PNG to a local path or URL (through etils.epath); returns the path."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png")
  target = epath.Path(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  target.write_bytes(buffer.getvalue())
  return str(target)
