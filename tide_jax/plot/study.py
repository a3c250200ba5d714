"""Figures of a study with several seeds per condition: curves as mean and band over seeds,
and a quantity over two axes as a heat map (TIDAL's teacher weight over training progress
and masking ratio).

Runs are read by :mod:`tide_jax.plot.runs`; figures are ``matplotlib.figure.Figure``
objects written with :func:`tide_jax.plot.figures.save_png`, like the run figures.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from tide_jax.plot import runs as runs_lib

_COLORS = ("C0", "C1", "C2", "C3", "C4", "C5", "C6", "C7", "C8", "C9")


def seed_statistics(
    runs: Sequence[runs_lib.Run], metric: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Mean and standard deviation (ddof=1; 0 for one run) over runs at the steps all of them
  logged: ``(steps [n], mean [n], sd [n])``.

  Raises:
    ValueError: no run logged ``metric``, or the runs share no step.
  """
  series = [run.series[metric] for run in runs if metric in run.series]
  if not series:
    raise ValueError(f"None of the runs logged {metric}; check the runs' eval settings.")
  steps = series[0][0]
  for other, _ in series[1:]:
    steps = np.intersect1d(steps, other)
  if steps.size == 0:
    raise ValueError(f"The runs logged {metric} at no common step; give them the same eval_every.")
  values = np.stack([v[np.searchsorted(s, steps)] for s, v in series])
  sd = values.std(axis=0, ddof=1) if len(series) > 1 else np.zeros(steps.size)
  return steps, values.mean(axis=0), sd


def seed_band_figure(
    panels: Mapping[str, Mapping[str, Sequence[runs_lib.Run]]],
    metric: str,
    ylabel: str,
    *,
    reference: Mapping[str, float] | None = None,
) -> Figure:
  """One panel per group of conditions: each condition's mean over seeds as a line and
  mean ± sd as a band, on shared y axes.

  Args:
    panels: panel title -> condition label -> that condition's runs (one per seed).
    metric: the key in ``metrics.jsonl`` (e.g. ``eval/bits_per_byte``).
    ylabel: the y axis label.
    reference: optional panel title -> a value drawn as a dashed horizontal line (e.g. the
      teacher's figure), labelled in the legend.
  """
  fig = Figure(figsize=(5.2 * len(panels), 4.2), dpi=120, layout="constrained")
  axes = np.atleast_1d(fig.subplots(1, len(panels), sharey=True))
  labels = sorted({label for conditions in panels.values() for label in conditions})
  color = {label: _COLORS[i % len(_COLORS)] for i, label in enumerate(labels)}
  for ax, (title, conditions) in zip(axes, panels.items()):
    for label, runs in conditions.items():
      steps, mean, sd = seed_statistics(runs, metric)
      ax.plot(steps, mean, color=color[label], label=f"{label} (n={len(runs)})")
      ax.fill_between(steps, mean - sd, mean + sd, color=color[label], alpha=0.2, linewidth=0)
    if reference and title in reference:
      ax.axhline(reference[title], color="0.3", linestyle="--", label="teacher")
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
  axes[0].set_ylabel(ylabel)
  return fig


def heatmap_figure(
    maps: Mapping[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    *,
    xlabel: str,
    ylabel: str,
    colorbar: str,
    vmin: float = 0.0,
    vmax: float = 1.0,
) -> Figure:
  """Heat maps on a shared colour scale, one panel per map.

  Args:
    maps: panel title -> values ``[len(y), len(x)]``.
    x, y: the grids of the horizontal and vertical axes.
    xlabel, ylabel, colorbar: axis and colour bar labels.
    vmin, vmax: the colour scale.
  """
  fig = Figure(figsize=(4.2 * len(maps) + 1.0, 3.8), dpi=120, layout="constrained")
  axes = np.atleast_1d(fig.subplots(1, len(maps), sharey=True))
  image = None
  for ax, (title, values) in zip(axes, maps.items()):
    values = np.asarray(values, np.float64)
    if values.shape != (len(y), len(x)):
      raise ValueError(f"Map {title!r} has shape {values.shape}, not {(len(y), len(x))}.")
    image = ax.pcolormesh(x, y, values, vmin=vmin, vmax=vmax, cmap="viridis", shading="auto")
    levels = [v for v in (0.25, 0.5, 0.75) if values.min() < v < values.max()]
    if levels:
      contours = ax.contour(x, y, values, levels=levels, colors="white", linewidths=0.7)
      ax.clabel(contours, fontsize=7)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
  axes[0].set_ylabel(ylabel)
  fig.colorbar(image, ax=list(axes), label=colorbar)
  return fig
