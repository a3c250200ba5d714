"""--mode=eval / sample / export on a freshly trained smoke student."""

import contextlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from configs import smoke
from tests.hf_fixtures import tiny_qwen
from tests.test_train_e2e import REPO, run_main
from tide_jax.diffusion.masks import causal_attention_mask
from tide_jax import modes
from tide_jax.train import loop


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  root = tmp_path_factory.mktemp("modes")
  c = smoke.get_config("bd3lm")
  c.data.max_len = 64
  c.data.cache_dir = str(root / "cache")
  c.train.batch_size = 2
  c.train.num_steps = 2
  c.train.eval_every = 2
  c.train.eval_batches = 1
  c.sampler.max_new_tokens = 32
  c.sampler.steps_per_block = 8
  c.eval.bpb_files = ["pystdlib://this.py"]
  c.eval.bpb_max_texts = 1
  workdir = str(root / "wd")
  loop.train_and_evaluate(c, workdir)
  return c, workdir


def test_eval_mode_is_reproducible(trained):
  config, workdir = trained
  a = modes.run_eval(config, workdir)
  b = modes.run_eval(config, workdir)
  assert a["step"] == 2
  # An untrained-ish student is far from a good model but must be a finite, positive bound.
  assert 0.5 < a["bits_per_byte"] < 40
  assert a["bits_per_byte"] == b["bits_per_byte"]
  assert json.loads(open(os.path.join(workdir, "eval.json")).read())["step"] == 2


def test_sample_and_export_modes(trained, tmp_path, capsys):
  config, workdir = trained
  generations, stats = modes.run_sample(config, workdir, ["def add(a, b):"], chat=False)
  assert len(generations) == 1 and stats.new_tokens > 0
  assert "tokens/s" in capsys.readouterr().out
  with pytest.raises(ValueError, match="No prompts given"):
    modes.run_sample(config, workdir, [], chat=False)
  out = modes.run_export(config, workdir, str(tmp_path / "export"))
  model, _ = modes.load_trained_student(config, workdir)
  hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  ids = np.arange(1, 17, dtype=np.int64)[None] * 101
  with torch.no_grad():
    ref = hf(input_ids=torch.from_numpy(ids)).logits.numpy()
  got = np.asarray(
      model(jnp.asarray(ids, jnp.int32), jnp.arange(16)[None], causal_attention_mask(16))
  )
  assert np.max(np.abs(ref - got)) < 1e-4


def test_eval_mode_without_checkpoint_fails_cleanly(tmp_path):
  res = run_main(f"--workdir={tmp_path / 'empty'}", "--mode=eval")
  assert res.returncode == 2
  assert "holds no checkpoint and model.init_from is empty" in res.stderr


def test_export_into_the_workdir_is_refused_and_deletes_nothing(trained):
  config, workdir = trained
  before = sorted(os.path.join(r, f) for r, _, files in os.walk(workdir) for f in files)
  for overwrite in (False, True):
    with pytest.raises(ValueError, match="export directory .* (is not empty|holds files the)"):
      modes.run_export(config, workdir, workdir, overwrite=overwrite)
  after = sorted(os.path.join(r, f) for r, _, files in os.walk(workdir) for f in files)
  assert before == after and any("checkpoints" in f for f in after)


def test_modes_use_model_init_from_before_any_checkpoint(tmp_path, capsys):
  hf_dir = str(tmp_path / "hf")
  hf_model = tiny_qwen("qwen3", hf_dir, tied=True, vocab=151936, head_dim=16, num_layers=1)
  c = smoke.get_config("bd3lm")
  c.data.restrict_vocab = False  # a full-vocabulary checkpoint
  c.model.init_from = hf_dir
  c.data.max_len = 64
  c.sampler.max_new_tokens = 8
  c.sampler.steps_per_block = 8
  c.eval.bpb_files = ["pystdlib://this.py"]
  c.eval.bpb_max_texts = 1
  workdir = str(tmp_path / "fresh")
  result = modes.run_eval(c, workdir)
  assert result["step"] is None and 0.5 < result["bits_per_byte"] < 40
  assert "initial weights (model.init_from)" in capsys.readouterr().out
  generations, _ = modes.run_sample(c, workdir, ["def f():"], chat=False)
  assert len(generations) == 1
  out = modes.run_export(c, workdir, str(tmp_path / "export"))
  exported = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  ids = torch.arange(1, 13)[None] * 1000
  with torch.no_grad():
    np.testing.assert_allclose(
        exported(input_ids=ids).logits.numpy(), hf_model(input_ids=ids).logits.numpy(), atol=1e-5
    )


@contextlib.contextmanager
def read_only(path: str):
  """Makes ``path`` and everything under it unwritable, also for root (which ignores mode
  bits: the immutable attribute binds it), and restores it afterwards."""
  if os.geteuid() == 0:
    subprocess.run(["chattr", "-R", "+i", path], check=True)
    try:
      yield
    finally:
      subprocess.run(["chattr", "-R", "-i", path], check=True)
    return
  entries = [path] + [os.path.join(r, n) for r, dirs, files in os.walk(path) for n in dirs + files]
  modes_before = {p: os.stat(p).st_mode for p in entries}
  for p in reversed(entries):
    os.chmod(p, modes_before[p] & ~0o222)
  try:
    yield
  finally:
    for p in entries:
      os.chmod(p, modes_before[p])


def cli_args(config, workdir):
  return [
      f"--workdir={workdir}",
      "--config.data.max_len=64",
      f"--config.data.cache_dir={config.data.cache_dir}",
      "--config.train.batch_size=2",
      "--config.train.eval_every=2",
      "--config.train.eval_batches=1",
      "--config.eval.bpb_files=pystdlib://this.py",
      "--config.eval.bpb_max_texts=1",
  ]


def test_eval_on_a_read_only_workdir_prints_its_result_then_one_sentence(trained, tmp_path):
  config, source = trained
  workdir = str(tmp_path / "ro")
  shutil.copytree(source, workdir)
  with read_only(workdir):
    res = run_main(*cli_args(config, workdir), "--mode=eval")
  assert res.returncode == 2, res.stderr[-2000:]
  assert re.search(r"^step 2: [0-9.]+ bits/byte", res.stdout, re.MULTILINE), res.stdout
  lines = res.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(
      f"error: Cannot write or read {workdir}/eval.json: "
  )


def test_training_on_a_read_only_workdir_is_one_sentence(trained, tmp_path):
  config, _ = trained
  workdir = tmp_path / "ro_train"
  workdir.mkdir()
  with read_only(str(workdir)):
    res = run_main(*cli_args(config, workdir), "--config.train.num_steps=2")
  lines = res.stderr.strip().splitlines()
  assert res.returncode == 2 and len(lines) == 1, res.stderr[-2000:]
  assert lines[0].startswith(f"error: Cannot write or read {workdir}/run.lock: ")


def test_a_full_workdir_during_training_is_one_sentence(trained, tmp_path):
  config, _ = trained
  workdir = tmp_path / "full"

  def small_files():  # every file above 8 MB (checkpoint data) fails to write, as on a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (8 << 20, 8 << 20))

  res = subprocess.run(
      [
          sys.executable,
          "-m",
          "tide_jax.main",
          "--config=configs/smoke.py:bd3lm",
          *cli_args(config, workdir),
          "--config.train.num_steps=2",
          "--config.data.restrict_vocab=False",  # checkpoint arrays well above 8 MB
      ],
      cwd=REPO,
      env=dict(os.environ, JAX_PLATFORMS="cpu"),
      capture_output=True,
      text=True,
      timeout=600,
      preexec_fn=small_files,
  )
  # stderr also carries the data preparation's progress bars; the failure is one line.
  lines = res.stderr.strip().splitlines()
  assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
  assert [line for line in lines if line.startswith("error:")] == lines[-1:]
  assert lines[-1].startswith(
      f"error: Could not write the checkpoint of step 2 to {workdir}/checkpoints (File too large)"
  )


def test_sampler_threshold_is_read_from_the_config():
  class Tokenizer:
    eos_token_id = 151645

  config = smoke.get_config("bd3lm")
  assert modes.sampler_config(config, Tokenizer()).threshold == 0.0
  config.sampler.threshold = 0.9
  cfg = modes.sampler_config(config, Tokenizer())
  assert cfg.threshold == 0.9 and cfg.project_masked_only
