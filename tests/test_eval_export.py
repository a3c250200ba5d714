"""Export of the student: transformers reloads it with the same logits and the same tokenizer."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from tests.sampler_fixtures import tiny_decoder
from tide_jax.data.tokenizers import get_tokenizer
from tide_jax.diffusion.masks import bd3lm_attention_mask, causal_attention_mask
from tide_jax.eval import export

TOL = 1e-4
MASK_ID = 151669


def torch_logits(model, ids, positions, mask):
  mask4 = torch.from_numpy(np.broadcast_to(mask, (ids.shape[0], 1) + mask.shape[-2:]).copy())
  with torch.no_grad():
    out = model(
        input_ids=torch.from_numpy(ids).long(),
        position_ids=torch.from_numpy(positions).long(),
        attention_mask=mask4,
    )
  return out.logits.float().numpy()


def test_exported_student_reloads_with_identical_logits_and_tokenizer(tmp_path):
  tok = get_tokenizer("qwen3")
  model = tiny_decoder(seed=2, scale=2.0, vocab=151936)
  out = export.export_student(
      model, tok, str(tmp_path / "student"), block_size=4, mask_token_id=MASK_ID
  )
  hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  ids = np.array(tok(["def f(x):\n    return x * 2 + 1  # twice plus one"])["input_ids"], np.int32)
  length = ids.shape[1]
  pos = np.arange(length, dtype=np.int32)[None]
  causal = causal_attention_mask(length)
  flax = np.asarray(model(jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(causal)))
  assert np.max(np.abs(torch_logits(hf, ids, pos, causal) - flax)) < TOL
  # The BD3LM [x_t ; x_0] input a diffusion evaluator feeds.
  even = length - length % 4
  x0 = ids[:, :even]
  x_t = np.where(np.arange(even) % 3 == 0, MASK_ID, x0).astype(np.int32)
  both, pos2 = np.concatenate([x_t, x0], 1), np.concatenate([pos[:, :even]] * 2, 1)
  mask = bd3lm_attention_mask(even, 4)
  flax = np.asarray(model(jnp.asarray(both), jnp.asarray(pos2), jnp.asarray(mask)))
  assert np.max(np.abs(torch_logits(hf, both, pos2, mask) - flax)) < TOL

  reloaded = transformers.AutoTokenizer.from_pretrained(out)
  text = "Größe ☕ <|im_end|> code"
  assert reloaded.encode(text) == tok.encode(text)
  messages = [{"role": "user", "content": "hi"}]
  assert reloaded.apply_chat_template(
      messages, tokenize=False, add_generation_prompt=True
  ) == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  assert export.read_sampler_settings(out) == {
      "block_size": 4,
      "mask_token_id": MASK_ID,
      "schedule": "linear",
      "eos_token_id": tok.eos_token_id,
  }
  config = json.load(open(os.path.join(out, "config.json")))
  assert config["eos_token_id"] == tok.eos_token_id
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no staging left


def test_export_refuses_a_mismatched_tokenizer(tmp_path):
  with pytest.raises(
      ValueError, match="tokenizer has 151669 tokens but the model's vocabulary only 64"
  ):
    export.export_student(
        tiny_decoder(), get_tokenizer("qwen3"), str(tmp_path / "x"), block_size=4, mask_token_id=3
    )
  assert not os.path.exists(tmp_path / "x")
  with pytest.raises(FileNotFoundError, match="no bd3lm.json"):
    export.read_sampler_settings(str(tmp_path))


def test_export_refuses_a_non_empty_directory_and_never_removes_foreign_files(tmp_path):
  tok = get_tokenizer("qwen3")
  model = tiny_decoder(seed=2, vocab=151936)
  workdir = tmp_path / "workdir"
  (workdir / "checkpoints" / "5").mkdir(parents=True)
  (workdir / "checkpoints" / "5" / "state").write_text("weights")
  (workdir / "metrics.jsonl").write_text('{"step": 5}\n')
  args = dict(block_size=4, mask_token_id=MASK_ID)
  with pytest.raises(ValueError, match=r"directory .*workdir is not empty; .* pass --overwrite"):
    export.export_student(model, tok, str(workdir), **args)
  with pytest.raises(ValueError, match=r"holds files the export did not write \(checkpoints, "):
    export.export_student(model, tok, str(workdir), overwrite=True, **args)
  assert (workdir / "checkpoints" / "5" / "state").read_text() == "weights"
  assert (workdir / "metrics.jsonl").read_text() == '{"step": 5}\n'
  assert sorted(os.listdir(tmp_path)) == ["workdir"]  # no staging left behind

  # A previous export is replaced only with overwrite=True.
  out = str(tmp_path / "student")
  export.export_student(model, tok, out, **args)
  with pytest.raises(ValueError, match="is not empty"):
    export.export_student(model, tok, out, **args)
  export.export_student(tiny_decoder(seed=3, vocab=151936), tok, out, overwrite=True, **args)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
  embed = reloaded.get_input_embeddings().weight.detach().numpy()
  np.testing.assert_array_equal(embed, np.asarray(tiny_decoder(seed=3, vocab=151936).embed[...]))
  assert sorted(os.listdir(tmp_path)) == ["student", "workdir"]


def test_exported_directory_follows_the_umask(tmp_path):
  previous = os.umask(0o022)
  try:
    out = export.export_student(
        tiny_decoder(vocab=151936),
        get_tokenizer("qwen3"),
        str(tmp_path / "student"),
        block_size=4,
        mask_token_id=MASK_ID,
    )
  finally:
    os.umask(previous)
  assert os.stat(out).st_mode & 0o777 == 0o755
  modes = {name: os.stat(os.path.join(out, name)).st_mode & 0o777 for name in os.listdir(out)}
  assert "model.safetensors" in modes and "tokenizer.json" in modes
  assert set(modes.values()) == {0o644}, modes


def test_transformers_generate_reproduces_greedy_decoding_of_the_export(tmp_path):
  tok = get_tokenizer("qwen3")
  model = tiny_decoder(seed=4, scale=3.0, vocab=151936)
  out = export.export_student(
      model, tok, str(tmp_path / "student"), block_size=4, mask_token_id=MASK_ID
  )
  hf = transformers.AutoModelForCausalLM.from_pretrained(
      out, dtype=torch.float32, attn_implementation="eager"
  ).eval()
  prompt = tok("def fibonacci(n):\n    ")["input_ids"]
  new_tokens = 24
  with torch.no_grad():
    generated = hf.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        pad_token_id=tok.eos_token_id,
    )[0, len(prompt) :].tolist()
  # The same greedy decoding with the Flax model, recomputing the whole prefix each step on
  # a fixed-length buffer (causal attention: the unused tail does not affect the prefix).
  total = len(prompt) + new_tokens
  buffer = np.zeros((1, total), np.int32)
  buffer[0, : len(prompt)] = prompt
  forward = jax.jit(lambda ids: model(ids, jnp.arange(total)[None], causal_attention_mask(total)))
  margins = []
  for length in range(len(prompt), total):
    logits = np.asarray(forward(jnp.asarray(buffer)))[0, length - 1]
    top2 = np.sort(logits)[-2:]
    margins.append(top2[1] - top2[0])
    buffer[0, length] = int(np.argmax(logits))
  ids = buffer[0].tolist()
  assert min(margins) > 1e-3  # no near-tie that float32 noise could flip
  assert generated == ids[len(prompt) :]
  assert len(set(generated)) > 3  # a real sequence, not one repeated token
