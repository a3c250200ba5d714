"""Sampling CLI: printed generations with tokens/s, a scripted chat session, an exported student."""

from __future__ import annotations

import pytest

from tests.sampler_fixtures import tiny_decoder
from tide_jax.data.tokenizers import get_tokenizer
from tide_jax.diffusion import sampler
from tide_jax.eval import export, sample_cli

MASK_ID = 151669


@pytest.fixture(scope="module")
def tokenizer():
  return get_tokenizer("qwen3")


@pytest.fixture(scope="module")
def model():
  return tiny_decoder(seed=4, scale=3.0, vocab=151936)


def config(tokenizer, **kw):
  fields = dict(
      block_size=4,
      steps_per_block=2,
      max_new_tokens=8,
      mask_token_id=MASK_ID,
      eos_token_id=tokenizer.eos_token_id,
      context_len=128,
  )
  fields.update(kw)
  return sampler.SamplerConfig(**fields)


def test_run_sample_prints_generations_and_tokens_per_second(model, tokenizer):
  lines = []
  gens, stats = sample_cli.run_sample(
      model, tokenizer, ["Hi there", "Write a haiku"], config(tokenizer), print_fn=lines.append
  )
  assert [g.prompt for g in gens] == ["Hi there", "Write a haiku"]
  assert stats.new_tokens == sum(g.new_tokens for g in gens)
  assert 1 <= stats.blocks_run <= 2 and stats.generate_s > 0
  assert "tokens/s" in lines[-1] and f"{stats.new_tokens} new tokens" in lines[-1]
  # The printed reply is the decoding of the sampler's own tokens for that prompt.
  ids = sample_cli.encode_prompts(tokenizer, ["Hi there"])
  _, new = sampler.generate(
      model, ids + sample_cli.encode_prompts(tokenizer, ["Write a haiku"]), config(tokenizer)
  )
  assert gens[0].text == tokenizer.decode(new[0], skip_special_tokens=True)
  assert gens[0].text in lines[0]


def test_chat_session_keeps_history_and_resets(model, tokenizer):
  script = iter(
      ["hello", "and then?", "/reset", "", "word " * 200, "fresh start", "/exit", "unused"]
  )
  lines = []
  final = sample_cli.interactive_chat(
      model,
      tokenizer,
      config(tokenizer),
      system="Be brief.",
      input_fn=lambda _: next(script),
      print_fn=lines.append,
  )
  replies = [l for l in lines if l.startswith("student> ")]
  assert len(replies) == 3
  assert any("exceeds the context of 128 tokens" in l for l in lines)
  assert [m["role"] for m in final] == ["system", "user", "assistant"]
  assert final[1]["content"] == "fresh start"
  assert next(script) == "unused"


def test_bad_prompt_lists_are_refused(model, tokenizer):
  with pytest.raises(ValueError, match="non-empty list of prompt strings"):
    sample_cli.run_sample(model, tokenizer, [], config(tokenizer))
  with pytest.raises(ValueError, match="exceeds the context"):
    sample_cli.run_sample(model, tokenizer, ["word " * 200], config(tokenizer))


def test_load_exported_student_samples_the_same(model, tokenizer, tmp_path):
  out = export.export_student(
      model, tokenizer, str(tmp_path / "s"), block_size=4, mask_token_id=MASK_ID
  )
  loaded, tok, cfg = sample_cli.load_student(
      out, steps_per_block=2, max_new_tokens=8, context_len=128
  )
  assert cfg == config(tokenizer)
  a, _ = sample_cli.run_sample(model, tokenizer, ["Hi"], cfg, print_fn=lambda _: None)
  b, _ = sample_cli.run_sample(loaded, tok, ["Hi"], cfg, print_fn=lambda _: None)
  assert a == b
