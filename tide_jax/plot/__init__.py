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
from typing import Mapping, Sequence

from etils import epath
from matplotlib.figure import Figure

from tide_jax.plot.figures import FIGURES, FigureSpec, metric_figure, save_png
from tide_jax.plot.runs import Run, default_names, load_run
from tide_jax.plot.study import heatmap_figure, seed_band_figure, seed_statistics


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
  """Accuracy and NLL on masked tokens against the masking ratio t: one teacher, or several
  models side by side (teachers and a student for contrast).

  Args:
    curve: a :class:`tide_jax.eval.reliability.ReliabilityCurve` (``t``, ``accuracy``,
      ``nll`` arrays of the same length), or a mapping of legend labels to curves.
    tidal_lambda: optional ``[len(t)]`` weights TIDAL gives the teacher at these t (at the
      end of training), drawn on a second y axis of the accuracy panel for comparison.
  """
  curves = dict(curve) if isinstance(curve, Mapping) else {"teacher": curve}
  fig = Figure(figsize=(9.0, 3.8), dpi=120, layout="constrained")
  acc_ax, nll_ax = fig.subplots(1, 2)
  lines = []
  for i, (name, c) in enumerate(curves.items()):
    color = f"C{i}"
    lines += acc_ax.plot(c.t, c.accuracy, marker="o", color=color, label=f"{name} top-1 accuracy")
    nll_ax.plot(c.t, c.nll, marker="o", color=color, label=f"{name} NLL")
  acc_ax.set_ylabel("fraction of masked tokens")
  if tidal_lambda is not None:
    # Its own axis: a briefly trained teacher's accuracy is far below TIDAL's 0..1 weights.
    weight_ax = acc_ax.twinx()
    t = next(iter(curves.values())).t
    lines += weight_ax.plot(
        t, tidal_lambda, linestyle="--", color="0.3", label="TIDAL teacher weight"
    )
    weight_ax.set_ylabel("TIDAL teacher weight")
    weight_ax.set_ylim(0.0, 1.0)
  acc_ax.set_xlabel("masking ratio t")
  acc_ax.set_title("How often the teacher is right" if len(curves) == 1 else "Top-1 accuracy")
  acc_ax.legend(lines, [line.get_label() for line in lines], fontsize=8)
  nll_ax.set_xlabel("masking ratio t")
  nll_ax.set_ylabel("nats per masked token")
  nll_ax.set_title("Teacher NLL on masked tokens" if len(curves) == 1 else "NLL on masked tokens")
  nll_ax.legend()
  for ax in (acc_ax, nll_ax):
    ax.grid(True, alpha=0.3)
  return fig


__all__ = [
    "FIGURES",
    "FigureSpec",
    "heatmap_figure",
    "PlotResult",
    "Run",
    "load_run",
    "load_runs",
    "metric_figure",
    "plot_runs",
    "reliability_figure",
    "save_png",
    "seed_band_figure",
    "seed_statistics",
]
