"""--mode=eval / sample / export on a freshly trained smoke student."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from configs import smoke
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


def test_sampler_threshold_is_read_from_the_config():
  class Tokenizer:
    eos_token_id = 151645

  config = smoke.get_config("bd3lm")
  assert modes.sampler_config(config, Tokenizer()).threshold == 0.0
  config.sampler.threshold = 0.9
  cfg = modes.sampler_config(config, Tokenizer())
  assert cfg.threshold == 0.9 and cfg.project_masked_only
