"""Block sampler speed (and, with a trained student, the threshold mode's speed and quality).

Part 1, random weights. A smoke-sized student (Qwen3 layout: hidden 128, 4 layers, 4 heads
of dim 32, 2 kv heads, MLP 384; the real Qwen vocabulary of 151,936 and a small 8,192 one)
generates 1, 2, 4 and 8 blocks of 32 tokens after one prompt, greedily, one token per step
(32 steps per block). EOS is disabled (the EOS id is set to the mask id, which is never
chosen), so every run decodes its full budget. Three samplers, compiled ahead of time and
timed interleaved (best of ``--repeats``):

* recompute: no cache; each step runs the whole sequence so far (prompt + finished blocks
  + current block) with block-causal attention and projects the whole current block (one
  jitted program, per-block lengths unrolled, so the ratio measures work, not Python);
* cached, whole block: :func:`tide_jax.diffusion.sampler.generate_padded` with
  ``project_masked_only=False``: each step runs the current block against the cached
  keys/values and projects all B positions onto the vocabulary (the earlier sampler);
* cached, masked only: the default; each step projects only the still-masked positions.

All three are checked to produce identical tokens.

Part 2 (``--trained-workdir``, the workdir of ``configs/smoke.py:bd3lm`` after training):
the trained smoke student completes HumanEval prompts (raw text, as it was trained on
Python source) with one token per step and with threshold mode at several thresholds:
tokens/s, denoising steps per block, exact match of the greedy completions with the
one-token-per-step ones, and HumanEval pass@1 of the completions.

Usage:
  python benchmarks/bench_sampler.py [--vocabs 151936 8192] [--prompt-lens 200] [--repeats 3]
      [--trained-workdir runs/bd3lm --tasks 40 --max-new 128 --quality-repeats 2]
      [--write docs/benchmarks/sampler.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import sys
import time

# Run from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from ml_collections import config_dict  # noqa: E402

from tide_jax import modes  # noqa: E402
from tide_jax.diffusion import sampler  # noqa: E402
from tide_jax.eval import humaneval  # noqa: E402
from tide_jax.models import dense  # noqa: E402
from tide_jax.models.config import DecoderConfig  # noqa: E402

BLOCK = 32
MASK_ID = 151669
THRESHOLDS = (0.9, 0.5, 0.1, 0.03, 0.025)
NOTES = """Reading part 1: with the real vocabulary a step of this small student is dominated
by the output projection and softmax over the projected positions x 151,936 logits (about
1.2 GFLOP for a whole block of 32), while the transformer body costs about 1.6 MFLOP per
token. Projecting only the still-masked positions projects 16.5 positions per step on
average instead of 32 with one token per step (rounded up to a multiple of 4 it is 18),
so it removes about 45% of the head's work; the cache removes the prefix recomputation,
which matters when the body dominates (the small vocabulary here, and the 0.6B student,
whose body is about 0.9 GFLOP per token against a head of 0.3 GFLOP). The cached step
always attends over the whole preallocated cache (prompt + budget, a static shape), which
is why its time per token rises a little with the budget. CPU timings on a shared
machine are noisy (best of the repeats is reported)."""


def smoke_student(vocab: int) -> dense.DenseDecoder:
  cfg = DecoderConfig(
      model_type="qwen3",
      vocab_size=vocab,
      hidden_size=128,
      num_layers=4,
      num_heads=4,
      num_kv_heads=2,
      head_dim=32,
      intermediate_size=384,
      rope_theta=1e6,
      rms_norm_eps=1e-6,
      tie_word_embeddings=True,
      qk_norm=True,
      qkv_bias=False,
      o_bias=False,
      max_position_embeddings=4096,
  )
  return dense.build_decoder(cfg, seed=0)


def _recompute(graphdef, state, ids, valid, lengths, key, cfg: sampler.SamplerConfig):
  """No cache: every step re-runs prompt + finished blocks + the current block."""
  model = nnx.merge(graphdef, state)
  b, plen = ids.shape
  ks = jnp.asarray(sampler.tokens_per_step(BLOCK, cfg.steps_per_block, cfg.schedule))
  prompt_pos = jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1, 0)
  seq, seq_valid, seq_pos = ids, valid, prompt_pos
  live = jnp.ones((b,), bool)
  for j in range(cfg.num_blocks):
    length = plen + (j + 1) * BLOCK
    blk = np.arange(length) // BLOCK
    block_causal = jnp.asarray(blk[None, :] <= blk[:, None])
    positions = jnp.concatenate([seq_pos, lengths[:, None] + j * BLOCK + jnp.arange(BLOCK)], 1)
    mask = (
        block_causal[None] & jnp.concatenate([seq_valid, jnp.ones((b, BLOCK), bool)], 1)[:, None, :]
    )
    block_key = jax.random.fold_in(key, j)

    def step(s, block, seq=seq, positions=positions, mask=mask, block_key=block_key):
      hidden = model.hidden_states(jnp.concatenate([seq, block], 1), positions, mask)
      step_key = jax.random.fold_in(block_key, s)
      return sampler.denoise_step(model, hidden[:, -BLOCK:], block, live, step_key, ks[s], cfg)[0]

    block = jax.lax.fori_loop(
        0, cfg.steps_per_block, step, jnp.full((b, BLOCK), cfg.mask_token_id, jnp.int32)
    )
    seq = jnp.concatenate([seq, block], 1)
    seq_valid = jnp.concatenate([seq_valid, jnp.ones((b, BLOCK), bool)], 1)
    seq_pos = positions
  return seq[:, plen:]


def best_times(fns, repeats: int) -> tuple[list[float], list[np.ndarray]]:
  """Best wall time of each function; the functions alternate within every repeat so a
  change in machine load hits all of them alike."""
  times, outs = [[] for _ in fns], [None] * len(fns)
  for _ in range(repeats):
    for i, fn in enumerate(fns):
      start = time.perf_counter()
      out = jax.block_until_ready(fn())
      times[i].append(time.perf_counter() - start)
      outs[i] = np.asarray(out[0] if isinstance(out, tuple) else out)
  return [min(t) for t in times], outs


def run(prompt_len: int, repeats: int, vocab: int, batch: int) -> list[dict]:
  model = smoke_student(vocab)
  graphdef, state = nnx.split(model)
  rng = np.random.default_rng(0)
  mask_id = MASK_ID if vocab > MASK_ID else vocab - 1
  prompts = [rng.integers(0, min(150_000, mask_id), prompt_len).tolist() for _ in range(batch)]
  key = jax.random.PRNGKey(0)
  rows = []
  for blocks in (1, 2, 4, 8):
    cfg = sampler.SamplerConfig(
        block_size=BLOCK,
        steps_per_block=BLOCK,
        max_new_tokens=blocks * BLOCK,
        mask_token_id=mask_id,
        eos_token_id=mask_id,
        context_len=4096,
    )
    whole_cfg = dataclasses.replace(cfg, project_masked_only=False)
    ids, valid, lengths = sampler.pad_prompts(prompts, cfg)
    args = (jnp.asarray(ids), jnp.asarray(valid), jnp.asarray(lengths), key)
    masked_only = sampler.compile_generate(model, *args, cfg)
    whole_block = sampler.compile_generate(model, *args, whole_cfg)
    recompute = (
        jax.jit(functools.partial(_recompute, graphdef, cfg=whole_cfg))
        .lower(state, *args)
        .compile()
    )
    times, tokens = best_times(
        [
            lambda: recompute(state, *args),
            lambda: whole_block(*args),
            lambda: masked_only(*args),
        ],
        repeats,
    )
    new = blocks * BLOCK * batch
    rows.append(
        {
            "blocks": blocks,
            "new_tokens": new,
            "recompute_tps": new / times[0],
            "whole_tps": new / times[1],
            "masked_s": times[2],
            "masked_tps": new / times[2],
            "vs_whole": times[1] / times[2],
            "vs_recompute": times[0] / times[2],
            "identical": all(np.array_equal(tokens[0], t) for t in tokens[1:]),
        }
    )
    print(rows[-1], flush=True)
  return rows


def table(rows: list[dict]) -> str:
  lines = [
      "| blocks | new tokens | recompute tok/s | cached, whole block tok/s | cached, masked "
      "only s | cached, masked only tok/s | masked only vs whole block | masked only vs "
      "recompute | same tokens |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
        f"| {r['blocks']} | {r['new_tokens']} | {r['recompute_tps']:.1f} | "
        f"{r['whole_tps']:.1f} | {r['masked_s']:.3f} | {r['masked_tps']:.1f} | "
        f"{r['vs_whole']:.2f}x | {r['vs_recompute']:.2f}x | {r['identical']} |"
    )
  return "\n".join(lines)


def interleaved_best(fns: dict, repeats: int) -> dict:
  """Best wall time of each zero-argument function, alternating within each repeat."""
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
  return {name: min(t) for name, t in times.items()}


def first_step_confidence(model, ids, valid, cfg) -> tuple[float, float, float]:
  """Median, 99th percentile and maximum chosen-token probability over the positions of
  a fully masked first block after each prompt (what the first denoising step sees)."""
  b, plen = ids.shape
  tokens = np.concatenate([ids, np.full((b, BLOCK), cfg.mask_token_id, np.int32)], axis=1)
  keys = np.concatenate([valid, np.ones((b, BLOCK), bool)], axis=1)
  blk = np.arange(plen + BLOCK) // BLOCK
  mask = (blk[None, :] <= blk[:, None])[None] & keys[:, None, :]
  positions = np.maximum(np.cumsum(keys, axis=1) - 1, 0).astype(np.int32)
  hidden = model.hidden_states(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask))
  logits = model.logits(hidden[:, -BLOCK:])
  _, probability = sampler.choose_tokens(logits, jax.random.PRNGKey(0), 0.0, cfg.mask_token_id)
  p = np.asarray(probability).reshape(-1)
  return float(np.median(p)), float(np.quantile(p, 0.99)), float(p.max())


def trained_student_section(
    workdir: str, num_tasks: int, batch: int, max_new: int, repeats: int
) -> str:
  """Threshold mode vs one token per step on the trained smoke student (HumanEval prompts)."""
  # The run's own resolved config (its tokenizer and shape), as the loop wrote it.
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    config = config_dict.ConfigDict(json.load(f))
  model, step = modes.load_trained_student(config, workdir)
  tokenizer = modes.student_tokenizer(config)
  problems = humaneval.load_problems()
  task_ids = list(problems)[:num_tasks]
  prompts = [tokenizer.encode(problems[t]["prompt"], add_special_tokens=False) for t in task_ids]
  base = dataclasses.replace(
      modes.sampler_config(config, tokenizer), max_new_tokens=max_new, context_len=2048
  )
  # One padded length for every prompt, so each setting compiles once.
  all_ids, all_valid, all_lengths = sampler.pad_prompts(prompts, base)
  extra = -len(prompts) % batch
  all_ids, all_valid, all_lengths = (
      np.concatenate([x, np.repeat(x[-1:], extra, axis=0)])
      for x in (all_ids, all_valid, all_lengths)
  )
  settings = {t: dataclasses.replace(base, threshold=t) for t in (0.0,) + THRESHOLDS}
  key = jax.random.PRNGKey(0)

  def generate_all(cfg):
    """Every prompt, batch by batch: (new tokens per prompt, steps, blocks)."""
    new_tokens, steps, blocks = [], 0, 0
    for start in range(0, len(all_ids), batch):
      here = slice(start, start + batch)
      tokens, blocks_run, steps_run = jax.block_until_ready(
          sampler.generate_padded(
              model, all_ids[here], all_valid[here], all_lengths[here], key, cfg
          )
      )
      steps, blocks = steps + int(steps_run), blocks + int(blocks_run)
      new_tokens += sampler.truncate_at_eos(np.asarray(tokens), cfg.eos_token_id)
    return new_tokens[: len(prompts)], steps, blocks

  outputs = {t: generate_all(cfg) for t, cfg in settings.items()}  # also compiles
  times = interleaved_best(
      {t: functools.partial(generate_all, cfg) for t, cfg in settings.items()}, repeats
  )
  reference = outputs[0.0][0]
  rows = []
  for threshold, (new_tokens, steps, blocks) in outputs.items():
    completions = {t: [tokenizer.decode(ids)] for t, ids in zip(task_ids, new_tokens)}
    results = humaneval.check_completions(problems, completions)
    passed = sum(r[0]["status"] == "passed" for r in results.values())
    same = sum(a == b for a, b in zip(new_tokens, reference))
    agree = sum(sum(x == y for x, y in zip(a, b)) for a, b in zip(new_tokens, reference)) / max(
        1, sum(len(b) for b in reference)
    )
    total = sum(map(len, new_tokens))
    rows.append(
        f"| {'one token per step' if threshold == 0 else threshold} | {total} | "
        f"{total / times[threshold]:.1f} | {steps / max(blocks, 1):.2f} | "
        f"{same}/{len(task_ids)} | {agree:.1%} | {passed}/{len(task_ids)} |"
    )
    print(rows[-1], flush=True)
  confidence = first_step_confidence(model, all_ids, all_valid, base)
  return "\n".join(
      [
          "### Trained smoke student: threshold mode vs one token per step",
          "",
          f"Student: `configs/smoke.py:bd3lm` trained to step {step} (hidden 64, 2 layers, "
          f"Python standard-library source). Prompts: the first {len(task_ids)} HumanEval "
          f"prompts as raw text (the model was trained on code, not chat), batches of "
          f"{batch}, up to {max_new} new tokens, block {BLOCK}, greedy, EOS ends a "
          "sequence. 'steps / block': denoising steps per decoded block (32 = one token "
          "per step). 'same completion': completions identical to the one-token-per-step "
          "ones; 'token agreement': positions where they agree, over the reference's "
          f"tokens. tok/s: best of {repeats} passes over all prompts, the settings "
          "interleaved, no compilation. The model's chosen-token probability at the first "
          f"step of the first block (all 32 positions masked): median {confidence[0]:.3f}, "
          f"99th percentile {confidence[1]:.3f}, maximum {confidence[2]:.3f}.",
          "",
          "| threshold | new tokens | tok/s | steps / block | same completion | token "
          "agreement | HumanEval pass@1 |",
          "|---|---|---|---|---|---|---|",
          *rows,
      ]
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--prompt-lens", type=int, nargs="+", default=[200])
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--vocabs", type=int, nargs="*", default=[151_936, 8192])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--trained-workdir", default="", help="workdir of configs/smoke.py:bd3lm")
  parser.add_argument("--tasks", type=int, default=40, help="HumanEval prompts in part 2")
  parser.add_argument("--max-new", type=int, default=128, help="new tokens per prompt, part 2")
  parser.add_argument("--quality-repeats", type=int, default=2, help="timed passes, part 2")
  parser.add_argument("--write", default=None, help="markdown file for the results")
  args = parser.parse_args()
  sections = []
  for vocab in args.vocabs:
    for prompt_len in args.prompt_lens:
      rows = run(prompt_len, args.repeats, vocab, args.batch)
      padded = -(-prompt_len // BLOCK) * BLOCK
      sections.append(
          f"### Vocabulary {vocab:,}, prompt of {prompt_len} tokens "
          f"(left-padded to {padded})\n\n" + table(rows)
      )
      print(sections[-1], flush=True)
  if args.trained_workdir:
    sections.append(
        trained_student_section(
            args.trained_workdir, args.tasks, 8, args.max_new, args.quality_repeats
        )
    )
    print(sections[-1], flush=True)
  if args.write:
    command = (
        f"python benchmarks/bench_sampler.py --vocabs {' '.join(map(str, args.vocabs))} "
        f"--prompt-lens {' '.join(map(str, args.prompt_lens))} --batch {args.batch} "
        f"--repeats {args.repeats}"
    )
    if args.trained_workdir:  # the workdir's own path is machine-specific
      command += (
          f" --trained-workdir WORKDIR --tasks {args.tasks} --max-new {args.max_new} "
          f"--quality-repeats {args.quality_repeats}"
      )
    command += f" --write {args.write}"
    device = (
        f"{jax.devices()[0].platform} ({platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores visible)"
    )
    with open(args.write, "w") as f:
      f.write(
          f"# Block sampler speed\n\nCommand: `{command.strip()}`\n\nDevice: {device}; "
          f"jax {jax.__version__}.\n\nPart 1, random weights: Qwen3 layout, hidden 128, 4 "
          f"layers, 4 heads x 32, 2 kv heads, MLP 384; vocabulary as in each heading (the "
          f"real Qwen size, and a small one where the transformer body rather than the "
          f"vocabulary projection dominates a step, as it does for the 0.6B student). "
          f"Batch {args.batch}, block {BLOCK}, one token per step (32 steps per block), "
          f"greedy, EOS disabled. Best of {args.repeats} runs (the variants alternating) "
          f'after ahead-of-time compilation. "same tokens": the three samplers generated '
          f"identical tokens.\n\n" + "\n\n".join(sections) + "\n\n" + NOTES + "\n"
      )


if __name__ == "__main__":
  main()
