"""End-to-end training on the smoke config (shortened): loss falls, resume is exact, and
bad input ends in one clear sentence without writing anything."""

import json
import os
import subprocess
import sys

import pytest

from configs import smoke
from tests.hf_fixtures import tiny_qwen
from tide_jax.train import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def short_config(tmp_path, num_steps=40, stop_at=0):
  c = smoke.get_config("bd3lm")
  c.data.restrict_vocab = False  # the real 151,936-row head (the assertions below use it)
  c.data.max_len = 64
  c.data.cache_dir = str(tmp_path / "data_cache")
  c.train.batch_size = 4
  c.train.num_steps = num_steps
  c.train.eval_every = num_steps // 2
  c.train.eval_batches = 2
  c.train.checkpoint_every = 1000
  c.train.log_every = 10
  c.train.stop_at_step = stop_at
  c.optim.warmup_steps = 5
  return c


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_smoke_trains_and_resume_is_exact(tmp_path):
  full = str(tmp_path / "full")
  out = loop.train_and_evaluate(short_config(tmp_path), full)
  rows = read_metrics(full)
  eval_rows = [r for r in rows if "eval/masked_nll" in r]
  first, last = eval_rows[0]["eval/masked_nll"], out["eval"]["masked_nll"]
  # Random init scores ~log(151936) = 11.9 nats; 40 steps on real text must get well below.
  assert first > 11.0
  assert last < first - 2.0, (first, last)
  # The periodic bits-per-byte eval runs on the same fixed grid: it must fall too.
  assert eval_rows[-1]["eval/bits_per_byte"] < eval_rows[0]["eval/bits_per_byte"]
  train_losses = [r["train/loss"] for r in rows if "train/loss" in r]
  assert sum(train_losses[-5:]) / 5 < sum(train_losses[:5]) / 5 - 1.0
  for name in ("config.json", "summary.json", "checkpoints"):
    assert os.path.exists(os.path.join(full, name))
  assert os.listdir(os.path.join(full, "tensorboard"))

  # Stop after K = 20 steps, then re-run the same command to 2K = 40.
  split = str(tmp_path / "split")
  loop.train_and_evaluate(short_config(tmp_path, stop_at=20), split)
  assert read_metrics(split)[-1]["step"] == 20
  resumed = loop.train_and_evaluate(short_config(tmp_path), split)
  assert resumed["step"] == 40
  assert read_metrics(split) == rows


def run_main(*args, cwd=REPO):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(
      [sys.executable, "-m", "tide_jax.main", "--config=configs/smoke.py:bd3lm", *args],
      cwd=cwd,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )


def test_bad_block_multiple_fails_cleanly(tmp_path):
  workdir = tmp_path / "wd"
  res = run_main(f"--workdir={workdir}", "--config.data.max_len=100")
  assert res.returncode == 2
  assert "data.max_len=100 is not a multiple of block_size=32" in res.stderr
  assert "Traceback" not in res.stderr
  assert not workdir.exists()


def test_nonexistent_and_unsupported_hf_dirs_fail_cleanly(tmp_path):
  workdir = tmp_path / "wd"
  full = (
      "--config.data.restrict_vocab=False"  # the smoke's restricted vocabulary trains from scratch
  )
  res = run_main(f"--workdir={workdir}", full, f"--config.model.init_from={tmp_path / 'missing'}")
  assert res.returncode == 2 and "does not exist" in res.stderr
  assert not workdir.exists()
  bad = tmp_path / "gpt2"
  bad.mkdir()
  (bad / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 50257}))
  res = run_main(f"--workdir={workdir}", full, f"--config.model.init_from={bad}")
  assert res.returncode == 2
  assert "Unsupported architecture model_type='gpt2'" in res.stderr
  assert not workdir.exists()


def test_checkpoint_of_a_different_model_is_refused(tmp_path):
  workdir = str(tmp_path / "wd")
  loop.train_and_evaluate(short_config(tmp_path, num_steps=2), workdir)
  before = sorted(
      (p, os.path.getmtime(os.path.join(r, p))) for r, _, files in os.walk(workdir) for p in files
  )
  c = short_config(tmp_path, num_steps=4)
  c.model.hidden_size = 96
  with pytest.raises(
      ValueError,
      match="holds a checkpoint of a different model "
      r"\(hidden_size 64 in the checkpoint vs 96 now\)",
  ):
    loop.train_and_evaluate(c, workdir)
  after = sorted(
      (p, os.path.getmtime(os.path.join(r, p))) for r, _, files in os.walk(workdir) for p in files
  )
  assert before == after


def test_student_initialised_from_hf_directory(tmp_path):
  hf_dir = str(tmp_path / "hf")
  tiny_qwen("qwen3", hf_dir, tied=True, vocab=151936, head_dim=16, num_layers=1)
  c = short_config(tmp_path, num_steps=2)
  c.model.init_from = hf_dir
  out = loop.train_and_evaluate(c, str(tmp_path / "wd"))
  assert out["step"] == 2


def test_cli_trains_with_a_relative_workdir_and_resumes(tmp_path):
  rel = os.path.relpath(tmp_path / "cli_run", REPO)
  args = [
      f"--workdir={rel}",
      "--config.train.num_steps=2",
      "--config.train.batch_size=2",
      "--config.data.max_len=64",
      f"--config.data.cache_dir={tmp_path / 'cache'}",
      "--config.train.eval_batches=1",
  ]
  res = run_main(*args)
  assert res.returncode == 0, res.stderr[-2000:]
  assert "step 2/2" in res.stdout
  assert os.path.isdir(tmp_path / "cli_run" / "checkpoints" / "2")
  again = run_main(*args[:1], "--config.train.num_steps=3", *args[2:])
  assert again.returncode == 0, again.stderr[-2000:]
  assert "Resuming from checkpoint at step 2" in again.stdout


def test_non_finite_loss_stops_training_naming_the_step(tmp_path):
  from tide_jax.train.step import NonFiniteError, check_finite

  with pytest.raises(NonFiniteError, match="Training stopped at step 7: grad_norm is inf"):
    check_finite(7, {"loss": 1.0, "grad_norm": float("inf")})
  c = short_config(tmp_path, num_steps=4)
  c.optim.learning_rate = 1e30  # the first update overflows the parameters
  c.optim.warmup_steps = 0
  with pytest.raises(NonFiniteError, match=r"Training stopped at step [23]: (loss|grad_norm) is"):
    loop.train_and_evaluate(c, str(tmp_path / "nan"))
