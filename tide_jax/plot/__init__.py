"""Figures of training runs: loss, held-out NLL, bits per byte, learning rate, gradient
norm, tokens/s and the distillation term, for one run or several on shared axes.

  python -m tide_jax.plot --workdir=runs/smoke/student_tide_shared \\
      --compare=runs/smoke/student_bd3lm --out=runs/smoke/plots

  from tide_jax import plot
  result = plot.plot_runs(["runs/a", "gs://bucket/runs/b"], out_dir="plots")
  result.paths["bits_per_byte"]  # -> "plots/bits_per_byte.png"

Workdirs and the output directory may be local paths or ``gs://`` URLs (etils.epath).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from etils import epath
from matplotlib.figure import Figure

from tide_jax.plot.figures import FIGURES, FigureSpec, metric_figure, save_png
from tide_jax.plot.runs import Run, default_names, load_run


@dataclasses.dataclass(frozen=True)
class PlotResult:
  """What :func:`plot_runs` wrote.

  Attributes:
    paths: figure name -> PNG path, in the order of ``FIGURES``.
    skipped: figure name -> why it was not drawn (no run logged its metric).
    runs: the runs as read.
  """

  paths: dict[str, str]
  skipped: dict[str, str]
  runs: list[Run]


def load_runs(workdirs: Sequence[str], names: Sequence[str] | None = None) -> list[Run]:
  """Reads several workdirs; ``names`` (one per workdir) label them in legends."""
  if isinstance(workdirs, str):
    workdirs = [workdirs]
  if not workdirs:
    raise ValueError("No workdir given; pass at least one training run's workdir.")
  if names is not None and len(names) != len(workdirs):
    raise ValueError(
        f"Got {len(names)} names for {len(workdirs)} workdirs; give one name per workdir "
        "or none."
    )
  labels = list(names) if names is not None else default_names([str(w) for w in workdirs])
  return [load_run(str(w), label) for w, label in zip(workdirs, labels)]


def plot_runs(
    workdirs: Sequence[str],
    out_dir: str,
    names: Sequence[str] | None = None,
) -> PlotResult:
  """Draws every figure of ``FIGURES`` for the given runs and writes ``<out_dir>/<name>.png``.

  Args:
    workdirs: one or several training workdirs (local or ``gs://``).
    out_dir: where the PNG files go (local or ``gs://``); created when missing.
    names: legend labels, one per workdir (default: the workdirs' last path components).

  Returns:
    The paths written and the figures skipped, with the reason.
  """
  runs = load_runs(workdirs, names)
  paths, skipped = {}, {}
  for spec in FIGURES:
    fig = metric_figure(spec, runs)
    if fig is None:
      skipped[spec.name] = f"no run logged {spec.metric} ({spec.hint})"
      continue
    paths[spec.name] = save_png(fig, epath.Path(out_dir) / f"{spec.name}.png")
  return PlotResult(paths, skipped, runs)


def reliability_figure(curve, tidal_lambda=None) -> Figure:
  """The teacher's accuracy and NLL on masked tokens against the masking ratio t.

  Args:
    curve: a :class:`tide_jax.eval.reliability.ReliabilityCurve` (``t``, ``accuracy``,
      ``nll`` arrays of the same length).
    tidal_lambda: optional ``[len(t)]`` weights TIDAL gives the teacher at these t (at the
      end of training), drawn on a second y axis of the accuracy panel for comparison.
  """
  fig = Figure(figsize=(9.0, 3.8), dpi=120, layout="constrained")
  acc_ax, nll_ax = fig.subplots(1, 2)
  lines = acc_ax.plot(
      curve.t, curve.accuracy, marker="o", color="C0", label="teacher top-1 accuracy"
  )
  acc_ax.set_ylabel("fraction of masked tokens")
  if tidal_lambda is not None:
    # Its own axis: a briefly trained teacher's accuracy is far below TIDAL's 0..1 weights.
    weight_ax = acc_ax.twinx()
    lines += weight_ax.plot(
        curve.t, tidal_lambda, linestyle="--", color="C3", label="TIDAL teacher weight"
    )
    weight_ax.set_ylabel("TIDAL teacher weight")
    weight_ax.set_ylim(0.0, 1.0)
  acc_ax.set_xlabel("masking ratio t")
  acc_ax.set_title("How often the teacher is right")
  acc_ax.legend(lines, [line.get_label() for line in lines])
  nll_ax.plot(curve.t, curve.nll, marker="o", color="C1", label="teacher NLL")
  nll_ax.set_xlabel("masking ratio t")
  nll_ax.set_ylabel("nats per masked token")
  nll_ax.set_title("Teacher NLL on masked tokens")
  nll_ax.legend()
  for ax in (acc_ax, nll_ax):
    ax.grid(True, alpha=0.3)
  return fig


__all__ = [
    "FIGURES",
    "FigureSpec",
    "PlotResult",
    "Run",
    "load_run",
    "load_runs",
    "metric_figure",
    "plot_runs",
    "reliability_figure",
    "save_png",
]
