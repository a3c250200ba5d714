"""``--mode=sample`` and a small interactive chat: generations with tokens/s.

Tokens/s counts the new tokens each sequence produced up to its EOS, divided by the wall
time of the generation call alone; compilation (once per padded prompt length and batch
size) is timed and printed separately.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import jax
import numpy as np

from tide_jax.convert import hf_checkpoint
from tide_jax.data import tokenizers
from tide_jax.diffusion import sampler
from tide_jax.eval import export


@dataclasses.dataclass(frozen=True)
class Generation:
  prompt: str
  text: str
  new_tokens: int


@dataclasses.dataclass(frozen=True)
class SampleStats:
  compile_s: float
  generate_s: float
  new_tokens: int
  blocks_run: int
  steps_run: int  # denoising steps (model calls on a block) over all blocks

  @property
  def tokens_per_s(self) -> float:
    return self.new_tokens / max(self.generate_s, 1e-9)


def encode_prompts(
    tokenizer, texts: Sequence[str], *, chat: bool = True, system: str | None = None
) -> list[list[int]]:
  """Token ids of each prompt, as a single user turn of the chat template when ``chat``."""
  if isinstance(texts, str) or len(texts) == 0:
    raise ValueError("Give a non-empty list of prompt strings to sample from.")
  if not chat:
    return [tokenizer.encode(t, add_special_tokens=False) for t in texts]
  out = []
  for text in texts:
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": text}
    ]
    out.append(encode_chat(tokenizer, messages))
  return out


def encode_chat(tokenizer, messages: Sequence[dict]) -> list[int]:
  """A conversation rendered with the chat template and an open assistant turn."""
  text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
  return tokenizer.encode(text, add_special_tokens=False)


def timed_generate(
    model, prompts: Sequence[Sequence[int]], cfg: sampler.SamplerConfig, key: jax.Array
) -> tuple[list[list[int]], SampleStats]:
  """Generates with compile and run timed separately: (tokens up to EOS, stats)."""
  cfg.validate()
  ids, valid, lengths = sampler.pad_prompts(prompts, cfg)
  start = time.perf_counter()
  run = sampler.compile_generate(model, ids, valid, lengths, key, cfg)
  compiled = time.perf_counter()
  tokens, blocks, steps = run(ids, valid, lengths, key)
  tokens = np.asarray(jax.block_until_ready(tokens))
  done = time.perf_counter()
  new = sampler.truncate_at_eos(tokens, cfg.eos_token_id)
  stats = SampleStats(
      compile_s=compiled - start,
      generate_s=done - compiled,
      new_tokens=sum(map(len, new)),
      blocks_run=int(blocks),
      steps_run=int(steps),
  )
  return new, stats


def run_sample(
    model,
    tokenizer,
    texts: Sequence[str],
    cfg: sampler.SamplerConfig,
    *,
    chat: bool = True,
    system: str | None = None,
    seed: int = 0,
    print_fn: Callable[[str], None] = print,
) -> tuple[list[Generation], SampleStats]:
  """Generates a reply to every prompt in one batch and prints them with tokens/s."""
  prompts = encode_prompts(tokenizer, texts, chat=chat, system=system)
  new, stats = timed_generate(model, prompts, cfg, jax.random.PRNGKey(seed))
  generations = [
      Generation(
          prompt=text, text=tokenizer.decode(ids, skip_special_tokens=True), new_tokens=len(ids)
      )
      for text, ids in zip(texts, new)
  ]
  for i, g in enumerate(generations):
    print_fn(f"=== prompt {i}: {g.prompt}\n{g.text}\n--- {g.new_tokens} new tokens")
  print_fn(
      f"batch of {len(texts)}: {stats.new_tokens} new tokens in {stats.generate_s:.2f} s "
      f"= {stats.tokens_per_s:.1f} tokens/s ({stats.blocks_run} blocks in "
      f"{stats.steps_run} denoising steps; compile {stats.compile_s:.1f} s)"
  )
  return generations, stats


def interactive_chat(
    model,
    tokenizer,
    cfg: sampler.SamplerConfig,
    *,
    system: str | None = None,
    seed: int = 0,
    input_fn: Callable[[str], str] = input,
    print_fn: Callable[[str], None] = print,
) -> list[dict]:
  """A terminal chat; ``/reset`` clears the conversation, ``/exit`` (or end of input) quits.

  Returns the final conversation (list of chat messages).
  """
  base = [{"role": "system", "content": system}] if system else []
  messages = list(base)
  key = jax.random.PRNGKey(seed)
  print_fn("Chat with the student. /reset starts over, /exit quits.")
  for turn in range(1_000_000):
    try:
      line = input_fn("you> ")
    except EOFError:
      break
    command = line.strip()
    if command == "/exit":
      break
    if command == "/reset":
      messages = list(base)
      print_fn("(conversation cleared)")
      continue
    if not command:
      continue
    attempt = messages + [{"role": "user", "content": line}]
    try:
      new, stats = timed_generate(
          model, [encode_chat(tokenizer, attempt)], cfg, jax.random.fold_in(key, turn)
      )
    except ValueError as err:
      print_fn(f"error: {err} Type /reset to start a new conversation.")
      continue
    reply = tokenizer.decode(new[0], skip_special_tokens=True)
    messages = attempt + [{"role": "assistant", "content": reply}]
    print_fn(f"student> {reply}")
    print_fn(f"({stats.new_tokens} tokens, {stats.tokens_per_s:.1f} tokens/s)")
  return messages


def load_student(model_dir: str, **overrides) -> tuple[object, object, sampler.SamplerConfig]:
  """Loads an exported student (see :mod:`tide_jax.eval.export`) with its sampler settings.

  ``overrides`` replace :class:`SamplerConfig` fields (e.g. ``max_new_tokens=64``).
  """
  settings = export.read_sampler_settings(model_dir)
  model = hf_checkpoint.load_dense_from_hf(model_dir)
  tokenizer = tokenizers.get_tokenizer(model_dir)
  fields = {
      "block_size": settings["block_size"],
      "steps_per_block": settings["block_size"],
      "mask_token_id": settings["mask_token_id"],
      "eos_token_id": settings["eos_token_id"],
      "schedule": settings.get("schedule", "linear"),
      "context_len": model.cfg.max_position_embeddings,
  }
  fields.update(overrides)
  return model, tokenizer, sampler.SamplerConfig(**fields)
