"""Resuming safely: noise past a NaN (train.rng_offset), damaged checkpoints, one run per
workdir, metrics written once per step."""

import glob
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.test_train_e2e import REPO, read_metrics, run_main, short_config
from tide_jax import modes
from tide_jax.train import loop, workdir_lock
from tide_jax.train import metrics as metrics_lib
from tide_jax.train import step as step_lib
from tide_jax.train.step import NonFiniteError, check_finite


def fast_config(tmp_path, num_steps=3, stop_at=0):
  """The shortened smoke config without periodic evaluation (these tests only resume)."""
  c = short_config(tmp_path, num_steps=num_steps, stop_at=stop_at)
  c.train.batch_size = 2
  c.train.eval_every = 0
  c.train.eval_batches = 1
  c.eval.bpb_during_training = False
  return c


def test_rng_offset_changes_the_step_key_and_zero_keeps_it():
  state = step_lib.TrainState(
      step=jnp.asarray(5, jnp.int32),
      params={},
      opt_state=(),
      rng=jax.random.key_data(jax.random.key(0)),
  )
  plain = jax.random.fold_in(jax.random.key(0), 5)
  same = lambda a, b: np.array_equal(jax.random.key_data(a), jax.random.key_data(b))
  assert same(step_lib.step_key(state), plain)
  assert same(step_lib.step_key(state, 0), plain)
  assert not same(step_lib.step_key(state, 1), plain)
  assert not same(step_lib.step_key(state, 1), step_lib.step_key(state, 2))


def test_nan_advice_names_rng_offset_and_resume_accepts_it(tmp_path):
  with pytest.raises(NonFiniteError, match="--config.train.rng_offset=N") as err:
    check_finite(7, {"loss": float("nan"), "grad_norm": 1.0})
  assert "different seed" not in str(err.value)
  workdir = str(tmp_path / "run")
  loop.train_and_evaluate(fast_config(tmp_path, stop_at=2), workdir)
  resumed = fast_config(tmp_path)
  resumed.train.rng_offset = 1
  assert loop.train_and_evaluate(resumed, workdir)["step"] == 3
  assert [r["step"] for r in read_metrics(workdir) if "train/loss" in r] == [1, 2, 3]


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
  """A finished 4-step run with checkpoints at steps 2 and 4, and its metrics."""
  root = tmp_path_factory.mktemp("four")
  c = fast_config(root, num_steps=4)
  c.train.checkpoint_every = 2
  workdir = str(root / "wd")
  loop.train_and_evaluate(c, workdir)
  return root, workdir, read_metrics(workdir)


def damage(step_dir: str, kind: str) -> None:
  if kind == "truncated file":
    data = glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*"))
    with open(max(data, key=os.path.getsize), "r+b") as f:
      f.truncate(1000)
  elif kind == "missing metadata":
    os.remove(os.path.join(step_dir, "state", "_METADATA"))
  elif kind == "empty step folder":
    shutil.rmtree(step_dir)
    os.mkdir(step_dir)


@pytest.mark.parametrize("kind", ["truncated file", "missing metadata", "empty step folder"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(four_steps, kind, capsys):
  root, source, rows = four_steps
  workdir = str(root / kind.replace(" ", "_"))
  shutil.copytree(source, workdir)
  damage(os.path.join(workdir, "checkpoints", "4"), kind)
  c = fast_config(root, num_steps=4)
  c.train.checkpoint_every = 2
  # Evaluation reports the damage, uses step 2 and moves nothing.

  _, step = modes.load_trained_student(c, workdir)
  out = capsys.readouterr().out
  assert step == 2 and "Checkpoint of step 4 in" in out and "is damaged (" in out
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "4"))
  # Training reports it, sets it aside (not deleted) and redoes steps 3-4 from step 2.
  assert loop.train_and_evaluate(c, workdir)["step"] == 4
  out = capsys.readouterr().out
  assert "Checkpoint of step 4 in" in out and "moved it to" in out
  assert "Resuming from checkpoint at step 2" in out
  assert os.path.isdir(os.path.join(workdir, "checkpoints_damaged", "4"))
  assert read_metrics(workdir) == rows  # exactly the uninterrupted run's metrics


HOLD_LOCK = """
import sys, time
from tide_jax.train import workdir_lock
workdir_lock.acquire(sys.argv[1], stale_after_s=float(sys.argv[2]), settle_s=0.2)
print("held", flush=True)
time.sleep(600)
"""


def hold_lock(workdir: str, stale_after_s: float = 300.0, env=None) -> subprocess.Popen:
  """A separate process that takes the workdir lock and keeps it until killed."""
  proc = subprocess.Popen(
      [sys.executable, "-c", HOLD_LOCK, workdir, str(stale_after_s)],
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
  )
  line = proc.stdout.readline()
  assert line.strip() == "held", proc.stderr.read()[-2000:]
  return proc


def test_a_second_run_on_a_workdir_is_refused_before_writing_anything(tmp_path, capsys):
  workdir = str(tmp_path / "wd")
  holder = hold_lock(workdir)
  try:
    with pytest.raises(workdir_lock.WorkdirInUse) as err:
      loop.train_and_evaluate(fast_config(tmp_path), workdir)
    message = str(err.value)
    assert message.startswith(f"Workdir {workdir} is in use by another run (host ")
    assert f"pid {holder.pid}, started " in message and message.count(". ") == 0
    assert sorted(os.listdir(workdir)) == ["run.lock"]  # no metrics, config or checkpoints
    assert not (tmp_path / "data_cache").exists()  # and no data prepared
    res = run_main(f"--workdir={workdir}", f"--config.data.cache_dir={tmp_path / 'cache'}")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr[-2000:]
    assert lines[0].startswith(f"error: Workdir {workdir} is in use by another run (host ")
  finally:
    holder.kill()
    holder.wait()
  # The holder died without releasing: its lock is taken over, with a notice.
  lock = workdir_lock.acquire(workdir, stale_after_s=300.0, say=print)
  assert f"pid {holder.pid}" in capsys.readouterr().out
  lock.release()
  assert not os.path.exists(os.path.join(workdir, "run.lock"))


def test_metrics_are_written_once_per_step_and_group(tmp_path):
  rows = [
      {"step": 0, "eval/masked_nll": 11.9},
      {"step": 1, "train/loss": 3.0},
      {"step": 2, "train/loss": 2.5},
      {"step": 2, "eval/masked_nll": 9.0},
  ]
  doubled = rows[:2] + rows[:2] + rows[2:] + rows[2:]  # two runs appending to one file
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in doubled))
  writer = metrics_lib.MetricsWriter(str(tmp_path), resume_step=2)
  assert [json.loads(line) for line in path.read_text().splitlines()] == rows
  writer.write(2, {"loss": 2.5}, prefix="train/")  # the same step again: replaced, not added
  writer.write(3, {"loss": 2.0}, prefix="train/")
  writer.close()
  assert [json.loads(line) for line in path.read_text().splitlines()] == rows + [
      {"step": 3, "train/loss": 2.0}
  ]
