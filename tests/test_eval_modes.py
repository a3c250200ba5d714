"""--mode=eval / sample / export on a freshly trained smoke student."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from configs import smoke
from tests.hf_fixtures import tiny_qwen
from tests.test_train_e2e import run_main
from tide_jax.diffusion.masks import causal_attention_mask
from tide_jax.eval import modes
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
