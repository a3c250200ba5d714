"""tide_jax.plot on two short training runs: files, axes, legends, the values drawn, tokens/s
from TensorBoard wall times, gs:// workdirs and bad input."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from tensorboardX import SummaryWriter

from configs import smoke
from tests.test_gcs_checkpoint import BUCKET, REPO, gcs  # noqa: F401  (emulator fixture)
from tide_jax import plot
from tide_jax.plot import events
from tide_jax.train import loop

NAMES = ["lr_3e-3", "lr_1e-3"]


def short_config(tmp_path, learning_rate):
  c = smoke.get_config("bd3lm")
  c.data.max_len = 64
  c.data.train_files = ["pystdlib://json/*.py"]
  c.data.cache_dir = str(tmp_path / "cache")
  c.optim.learning_rate = learning_rate
  c.optim.warmup_steps = 2
  c.train.batch_size = 2
  c.train.num_steps = 6
  c.train.eval_every = 3
  c.train.log_every = 3
  c.train.eval_batches = 1
  c.train.checkpoint_every = 6
  c.eval.bpb_files = ["pystdlib://this.py"]
  c.eval.bpb_max_texts = 1
  return c


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("plot_runs")
  workdirs = []
  for name, lr in zip(NAMES, (3e-3, 1e-3)):
    workdir = str(root / name)
    loop.train_and_evaluate(short_config(root, lr), workdir)
    workdirs.append(workdir)
  return workdirs


def read_rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_two_runs_share_axes_with_labels_and_legends(two_runs, tmp_path):
  out = tmp_path / "plots"
  result = plot.plot_runs(two_runs, str(out))
  drawn = [spec.name for spec in plot.FIGURES if spec.name != "distillation"]
  assert list(result.paths) == drawn
  # No bd3lm run logs a distillation term: skipped, with the reason.
  assert list(result.skipped) == ["distillation"]
  assert "train/distill/loss" in result.skipped["distillation"]
  for name, path in result.paths.items():
    assert path == str(out / f"{name}.png")
    with Image.open(path) as png:
      assert png.format == "PNG" and png.size == (840, 504)  # 7 x 4.2 inches at 120 dpi

  runs = plot.load_runs(two_runs)
  assert [r.name for r in runs] == NAMES  # default names: the directories' names
  for spec in plot.FIGURES[:-1]:
    ax = plot.metric_figure(spec, runs).axes[0]
    assert ax.get_xlabel() == "step"
    assert ax.get_ylabel() == spec.ylabel and ax.get_title() == spec.title
    assert [t.get_text() for t in ax.get_legend().get_texts()] == NAMES

  # The values drawn are the values logged (held-out NLL at steps 0, 3, 6).
  nll = plot.metric_figure(plot.FIGURES[1], runs).axes[0].get_lines()
  for line, workdir in zip(nll, two_runs):
    logged = [
        (r["step"], r["eval/masked_nll"]) for r in read_rows(workdir) if "eval/masked_nll" in r
    ]
    assert [s for s, _ in logged] == [0, 3, 6]
    np.testing.assert_allclose(line.get_xdata(), [s for s, _ in logged])
    np.testing.assert_allclose(line.get_ydata(), [v for _, v in logged], rtol=1e-12)
  # The learning-rate schedules differ by the peak ratio 3 once warm-up has started.
  lr_a, lr_b = (r.series["train/learning_rate"][1] for r in runs)
  np.testing.assert_allclose(lr_a[1:], 3.0 * lr_b[1:], rtol=1e-5)
  # tokens/s: one value per step after the first, from the event files' wall times.
  for run in runs:
    steps, rates = run.series[plot.runs.TOKENS_PER_S]
    assert list(steps) == [2, 3, 4, 5, 6]
    assert np.all(rates > 0) and np.all(np.isfinite(rates))


def test_a_run_without_the_metric_is_named_under_the_axes(two_runs, tmp_path):
  # A copy of the first run that also logged a distillation term.
  distilled = tmp_path / "distilled"
  shutil.copytree(two_runs[0], distilled)
  rows = read_rows(distilled)
  for row in rows:
    if "train/loss" in row:
      row["train/distill/loss"] = 0.1 * row["step"]
  (distilled / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  result = plot.plot_runs([str(distilled), two_runs[1]], str(tmp_path / "plots"))
  assert "distillation" in result.paths and not result.skipped
  fig = plot.metric_figure(plot.FIGURES[-1], result.runs)
  ax = fig.axes[0]
  assert [t.get_text() for t in ax.get_legend().get_texts()] == ["distilled"]
  np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), 0.1 * np.arange(1, 7))
  notes = [t.get_text() for t in ax.texts]
  assert notes == ["not logged by: lr_1e-3 (only recipes with a teacher log it)"]


def test_tokens_per_s_from_wall_times_per_event_file(tmp_path):
  tb = tmp_path / "tensorboard"
  first = SummaryWriter(str(tb), filename_suffix=".a")
  for step, wall in [(1, 100.0), (2, 102.0), (3, 103.0), (4, 107.0)]:
    first.add_scalar("train/loss", 1.0, step, walltime=wall)
  first.close()
  # The run was resumed from step 2 an hour later: a new file; the pause is no slow step.
  second = SummaryWriter(str(tb), filename_suffix=".b")
  for step, wall in [(3, 3700.0), (4, 3701.0)]:
    second.add_scalar("train/loss", 1.0, step, walltime=wall)
  second.close()
  times = events.read_step_times(plot.runs.epath.Path(tb))
  assert times.truncated_records == 0
  steps, rates = events.tokens_per_second(times, tokens_per_step=256)
  np.testing.assert_array_equal(steps, [2, 3, 4, 4])
  np.testing.assert_allclose(rates, [128.0, 256.0, 64.0, 256.0], rtol=1e-12)
  # A writer killed mid-record leaves a cut-off record: counted, the rest still read.
  path = sorted(tb.iterdir())[0]
  path.write_bytes(path.read_bytes()[:-7])
  cut = events.read_step_times(plot.runs.epath.Path(tb))
  assert cut.truncated_records == 1
  assert [list(s) for s, _ in cut.files] == [[1, 2, 3], [3, 4]]


def test_gs_workdirs_through_the_command_line(two_runs, gcs, tmp_path):  # noqa: F811
  fs = gcs["fs"]
  for workdir in two_runs:
    name = os.path.basename(workdir)
    for item in ("metrics.jsonl", "config.json", "tensorboard"):
      fs.put(os.path.join(workdir, item), f"{BUCKET}/plots/{name}/{item}", recursive=True)
  out = tmp_path / "from_gcs"
  done = subprocess.run(
      [
          sys.executable,
          "-m",
          "tide_jax.plot",
          f"--workdir=gs://{BUCKET}/plots/{NAMES[0]}",
          f"--compare=gs://{BUCKET}/plots/{NAMES[1]}",
          f"--out={out}",
      ],
      cwd=REPO,
      env=gcs["env"],
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert "distillation: skipped, no run logged train/distill/loss" in done.stdout
  assert sorted(os.listdir(out)) == sorted(f"{s.name}.png" for s in plot.FIGURES[:-1])
  # What was read from gs:// is what the local workdir holds, tokens/s included.
  read = subprocess.run(
      [sys.executable, "-c", READ_SERIES, f"gs://{BUCKET}/plots/{NAMES[0]}"],
      cwd=REPO,
      env=gcs["env"],
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert read.returncode == 0, read.stderr[-3000:]
  remote = json.loads(read.stdout.strip().splitlines()[-1])
  local = plot.load_run(two_runs[0]).series
  assert sorted(remote) == sorted(local)
  for key, (steps, values) in local.items():
    assert remote[key][0] == steps.tolist()
    np.testing.assert_allclose(remote[key][1], values, rtol=1e-12)


READ_SERIES = """
import json, sys
from tide_jax import plot
run = plot.load_run(sys.argv[1])
print(json.dumps({k: [s.tolist(), v.tolist()] for k, (s, v) in run.series.items()}))
"""


def test_bad_input_is_one_sentence(tmp_path):
  with pytest.raises(FileNotFoundError, match="holds no metrics.jsonl; pass the workdir"):
    plot.load_run(str(tmp_path))
  with pytest.raises(ValueError, match="Got 1 names for 2 workdirs"):
    plot.load_runs([str(tmp_path), str(tmp_path)], names=["a"])
  done = subprocess.run(
      [sys.executable, "-m", "tide_jax.plot", f"--workdir={tmp_path}", f"--out={tmp_path}/p"],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert done.returncode == 2
  assert done.stderr.strip().startswith("error: ") and "Traceback" not in done.stderr
