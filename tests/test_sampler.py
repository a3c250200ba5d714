"""Block sampler: the KV-cached sampler equals a full-recompute reference token for token."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.sampler_fixtures import EOS_ID, MASK_ID, VOCAB, tiny_decoder
from tide_jax.diffusion import sampler


def linear_commits(block_size: int, steps: int) -> list[int]:
  """Per-step commit counts of the linear schedule, re-derived in float64."""
  left = [int(np.round(block_size * (1.0 - s / steps))) for s in range(steps + 1)]
  return [left[s] - left[s + 1] for s in range(steps)]


REF_LEN = 64


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids, positions, mask):
  return nnx.merge(graphdef, state)(ids, positions, mask)


def reference_generate(model, prompt: list[int], cfg: sampler.SamplerConfig) -> list[int]:
  """Slow reference: one prompt, no padding, no cache; the whole sequence is recomputed
  at every step with BD3LM block-causal attention (a token sees its own block and all
  earlier blocks). Block boundaries are those of the prompt left-padded to a multiple of
  B, i.e. logical position p lies in block ``(p + pad) // B``.
  """
  graphdef, state = nnx.split(model)
  bsz = cfg.block_size
  pad = (-len(prompt)) % bsz
  commits = linear_commits(bsz, cfg.steps_per_block)
  seq = list(prompt)
  for _ in range(cfg.num_blocks):
    block = np.full(bsz, MASK_ID, np.int64)
    for k in commits:
      here = len(seq) + bsz
      # Later blocks are invisible under block-causal attention, so right-filling the
      # sequence to a fixed length with mask tokens changes nothing and avoids recompiles.
      ids = np.array(seq + block.tolist() + [MASK_ID] * (REF_LEN - here), np.int32)[None]
      blk = (np.arange(REF_LEN) + pad) // bsz
      mask = blk[None, :] <= blk[:, None]
      pos = np.arange(REF_LEN, dtype=np.int32)[None]
      logits = np.asarray(
          _forward(graphdef, state, jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(mask)),
          np.float64,
      )[0, here - bsz : here]
      logits[:, MASK_ID] = -np.inf
      tokens = logits.argmax(-1)
      probs = np.exp(logits - logits.max(-1, keepdims=True))
      probs /= probs.sum(-1, keepdims=True)
      conf = np.where(block == MASK_ID, probs[np.arange(bsz), tokens], -np.inf)
      chosen = np.argsort(-conf, kind="stable")[:k]
      block[chosen] = tokens[chosen]
    seq += block.tolist()
    if EOS_ID in block:
      break
  new = seq[len(prompt) :]
  return new + [EOS_ID] * (cfg.num_blocks * bsz - len(new))


@pytest.mark.parametrize("block_size,steps", [(4, 4), (4, 2), (8, 4)])
def test_cached_sampler_matches_full_recompute_reference(block_size, steps):
  model = tiny_decoder(seed=block_size + steps)
  rng = np.random.default_rng(block_size)
  prompts = [rng.integers(0, 60, n).tolist() for n in (3, 8, 13)]
  cfg = sampler.SamplerConfig(
      block_size=block_size,
      steps_per_block=steps,
      max_new_tokens=3 * block_size,
      mask_token_id=MASK_ID,
      eos_token_id=EOS_ID,
      context_len=128,
  )
  tokens, _ = sampler.generate(model, prompts, cfg)
  for i, prompt in enumerate(prompts):
    assert tokens[i].tolist() == reference_generate(model, prompt, cfg), f"prompt {i}"
  assert not np.any(tokens == MASK_ID)


def test_batching_and_padding_do_not_change_a_sequence():
  model = tiny_decoder(seed=3)
  cfg = sampler.SamplerConfig(
      block_size=4,
      steps_per_block=4,
      max_new_tokens=8,
      mask_token_id=MASK_ID,
      eos_token_id=EOS_ID,
      context_len=128,
  )
  short, long = [5, 6, 7], list(range(1, 19))
  alone, _ = sampler.generate(model, [short], cfg)
  together, _ = sampler.generate(model, [short, long], cfg)
  np.testing.assert_array_equal(alone[0], together[0])


def test_tokens_per_step_follows_the_schedule():
  for bsz, steps in [(32, 32), (32, 8), (8, 3), (5, 5), (7, 2)]:
    got = sampler.tokens_per_step(bsz, steps, "linear")
    assert got.tolist() == linear_commits(bsz, steps)
    assert got.sum() == bsz and got.max() - got.min() <= 1
  t = 1.0 - np.arange(9) / 8
  left = np.round(32 * np.cos(0.5 * np.pi * (1.0 - t)))
  np.testing.assert_array_equal(sampler.tokens_per_step(32, 8, "cosine"), left[:-1] - left[1:])


def test_truncate_at_eos():
  rows = sampler.truncate_at_eos(np.array([[1, 2, 9, 3], [4, 5, 6, 7]]), 9)
  assert rows == [[1, 2], [4, 5, 6, 7]]


def test_bad_input_is_refused_with_a_clear_error():
  model = tiny_decoder()
  cfg = sampler.SamplerConfig(
      block_size=4,
      steps_per_block=4,
      max_new_tokens=8,
      mask_token_id=MASK_ID,
      eos_token_id=EOS_ID,
      context_len=32,
  )
  with pytest.raises(ValueError, match="prompt list is empty"):
    sampler.generate(model, [], cfg)
  with pytest.raises(ValueError, match="exceeds the context of 32"):
    sampler.generate(model, [[1] * 25], cfg)
  with pytest.raises(ValueError, match="Prompt 1 is empty"):
    sampler.generate(model, [[1], []], cfg)
  bad = sampler.SamplerConfig(block_size=4, steps_per_block=5)
  with pytest.raises(ValueError, match="steps_per_block"):
    sampler.generate(model, [[1]], bad)
  with pytest.raises(ValueError, match="commit order"):
    sampler.generate(model, [[1]], sampler.SamplerConfig(order="entropy"))


def test_temperature_sampling_is_reproducible_and_tends_to_greedy():
  model = tiny_decoder(seed=5)
  base = dict(
      block_size=4,
      steps_per_block=2,
      max_new_tokens=8,
      mask_token_id=MASK_ID,
      eos_token_id=EOS_ID,
      context_len=128,
  )
  prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
  hot = sampler.SamplerConfig(temperature=1.0, **base)
  a, _ = sampler.generate(model, prompts, hot, jax.random.PRNGKey(1))
  b, _ = sampler.generate(model, prompts, hot, jax.random.PRNGKey(1))
  others = [sampler.generate(model, prompts, hot, jax.random.PRNGKey(k))[0] for k in (2, 3, 4)]
  np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, o) for o in others)
  assert not np.any(a == MASK_ID) and a.min() >= 0 and a.max() < VOCAB
  greedy, _ = sampler.generate(model, prompts, sampler.SamplerConfig(**base))
  cold, _ = sampler.generate(
      model, prompts, sampler.SamplerConfig(temperature=1e-6, **base), jax.random.PRNGKey(7)
  )
  np.testing.assert_array_equal(cold, greedy)


@pytest.mark.parametrize(
    "settings",
    [
        dict(block_size=4, steps_per_block=4),
        dict(block_size=8, steps_per_block=3, temperature=0.7),
        dict(block_size=8, steps_per_block=8, order="random"),
        dict(block_size=8, steps_per_block=8, threshold=0.2),
    ],
)
def test_masked_only_projection_gives_the_whole_block_tokens(settings):
  """Projecting only the still-masked positions changes no token, with sampling too (each
  position's Gumbel noise is keyed by its place in the block, not by the projection)."""
  model = tiny_decoder(seed=11)
  prompts = [[1, 2, 3], list(range(5, 17))]
  cfg = sampler.SamplerConfig(
      max_new_tokens=16, mask_token_id=MASK_ID, eos_token_id=EOS_ID, context_len=128, **settings
  )
  key = jax.random.PRNGKey(4)
  masked_only, _ = sampler.generate(model, prompts, cfg, key)
  whole_block, _ = sampler.generate(
      model, prompts, dataclasses.replace(cfg, project_masked_only=False), key
  )
  np.testing.assert_array_equal(masked_only, whole_block)
  assert not np.any(masked_only == MASK_ID)


def test_threshold_mode_is_deterministic_and_never_slower_than_one_token_per_step():
  model = tiny_decoder(seed=2)
  base = sampler.SamplerConfig(
      block_size=8,
      steps_per_block=8,
      max_new_tokens=24,
      mask_token_id=MASK_ID,
      eos_token_id=MASK_ID,  # never chosen: every block is decoded
      context_len=128,
  )
  prompts = [[3, 1, 4, 1, 5], [9, 2, 6]]
  ids, valid, lengths = sampler.pad_prompts(prompts, base)
  runs = {}
  for seed, threshold in enumerate((0.0, 0.055, 0.055, 0.9)):
    cfg = dataclasses.replace(base, threshold=threshold)
    key = jax.random.PRNGKey(seed)  # greedy: the key must not matter
    tokens, blocks, steps = sampler.generate_padded(model, ids, valid, lengths, key, cfg)
    runs.setdefault(threshold, []).append((np.asarray(tokens), int(blocks), int(steps)))
  first, second = runs[0.055]
  np.testing.assert_array_equal(first[0], second[0])
  assert first[1:] == second[1:]
  one_per_step = runs[0.0][0]
  assert one_per_step[2] == 3 * 8
  for threshold in (0.055, 0.9):
    tokens, blocks, steps = runs[threshold][0]
    assert blocks == 3 and blocks <= steps <= 3 * 8
    assert not np.any(tokens == MASK_ID)
  # The tiny model's chosen-token probabilities are about 0.05 to 0.06 (64 tokens), so a
  # threshold of 0.055 commits several positions in some steps.
  assert runs[0.055][0][2] < one_per_step[2]
