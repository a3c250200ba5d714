"""Commit order and counts of the sampler, observed through a scripted-logits stub model."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tests.sampler_fixtures import ScriptedModel
from tide_jax.diffusion import sampler

BASE, MASK, EOS = 100, 255, 254


def commit_steps(block: np.ndarray, bsz: int) -> dict[int, list[int]]:
  """Position -> step map recovered from the stub's tokens (token = BASE + masked count)."""
  by_count: dict[int, list[int]] = {}
  for pos, tok in enumerate(block):
    by_count.setdefault(int(tok) - BASE, []).append(pos)
  # Larger masked counts happened earlier.
  return {step: sorted(by_count[c]) for step, c in enumerate(sorted(by_count, reverse=True))}


def stub_config(bsz, steps, order="low_confidence", blocks=2, temperature=0.0):
  return sampler.SamplerConfig(
      block_size=bsz,
      steps_per_block=steps,
      max_new_tokens=blocks * bsz,
      mask_token_id=MASK,
      eos_token_id=EOS,
      order=order,
      temperature=temperature,
      context_len=256,
  )


def test_low_confidence_commits_most_confident_first_in_schedule_counts():
  bsz, steps = 8, 3
  scores = np.array([3.0, 9.0, 1.0, 7.0, 5.0, 8.0, 2.0, 6.0])
  model = ScriptedModel(scores, base=BASE, mask_id=MASK, eos_id=EOS)
  tokens, _ = sampler.generate(model, [[1, 2, 3], [4]], stub_config(bsz, steps))
  counts = sampler.tokens_per_step(bsz, steps)
  assert counts.tolist() == [3, 2, 3]
  by_conf = np.argsort(-scores, kind="stable")
  for row in tokens:
    for b in range(2):
      block = row[b * bsz : (b + 1) * bsz]
      steps_seen = commit_steps(block, bsz)
      assert [len(steps_seen[s]) for s in range(steps)] == counts.tolist()
      start = 0
      for s in range(steps):
        assert steps_seen[s] == sorted(by_conf[start : start + counts[s]].tolist())
        start += counts[s]
      # The masked count written at each step is what was left before it.
      assert sorted({int(t) - BASE for t in block}, reverse=True) == [8, 5, 3]


def test_one_token_per_step_is_the_paper_protocol():
  bsz = 4
  scores = np.array([1.0, 4.0, 2.0, 3.0])
  model = ScriptedModel(scores, base=BASE, mask_id=MASK, eos_id=EOS)
  tokens, _ = sampler.generate(model, [[7]], stub_config(bsz, bsz, blocks=1))
  # Committed in order of confidence: slot 1 (4 masked), 3 (3), 2 (2), 0 (1).
  assert tokens[0].tolist() == [BASE + 1, BASE + 4, BASE + 2, BASE + 3]


def test_random_order_keeps_counts_and_depends_on_the_key():
  bsz, steps = 8, 4
  model = ScriptedModel(np.linspace(1, 8, bsz), base=BASE, mask_id=MASK, eos_id=EOS)
  cfg = stub_config(bsz, steps, order="random", blocks=1)
  orders = set()
  for seed in range(4):
    tokens, _ = sampler.generate(model, [[1]], cfg, jax.random.PRNGKey(seed))
    again, _ = sampler.generate(model, [[1]], cfg, jax.random.PRNGKey(seed))
    np.testing.assert_array_equal(tokens, again)
    seen = commit_steps(tokens[0], bsz)
    assert [len(seen[s]) for s in range(steps)] == [2, 2, 2, 2]
    orders.add(tuple(tokens[0].tolist()))
  assert len(orders) > 1


def test_sequence_stops_after_the_block_with_eos():
  bsz = 4
  # Logical position 6 emits EOS: the prompt of length 5 has its first block at 5..8.
  model = ScriptedModel(np.ones(bsz), base=BASE, mask_id=MASK, eos_id=EOS, eos_position=6)
  tokens, trimmed = sampler.generate(model, [[1] * 5, [1] * 9], stub_config(bsz, 2, blocks=3))
  assert tokens[0, 1] == EOS and np.all(tokens[0, bsz:] == EOS)
  assert len(trimmed[0]) == 1
  assert not np.any(tokens[1] == EOS) and len(trimmed[1]) == 3 * bsz


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 12), st.integers(0, 2**31 - 1), st.integers(0, 12))
def test_commit_mask_takes_the_k_best_masked_positions(width, seed, k):
  rng = np.random.default_rng(seed)
  conf = rng.random((3, width)).astype(np.float32)
  masked = rng.random((3, width)) < 0.6
  got = np.asarray(sampler.commit_mask(jnp.asarray(conf), jnp.asarray(masked), jnp.int32(k)))
  for row in range(3):
    n = min(k, int(masked[row].sum()))
    assert got[row].sum() == n and not np.any(got[row] & ~masked[row])
    rest = masked[row] & ~got[row]
    if n and rest.any():
      assert conf[row][got[row]].min() >= conf[row][rest].max()


PROJECTED_WIDTHS: list[int] = []  # filled at run time by RecordingModel (not a module field)


class RecordingModel(ScriptedModel):
  """The scripted stub, also recording how many positions each projection received."""

  def logits(self, hidden):
    jax.debug.callback(lambda n: PROJECTED_WIDTHS.append(int(n)), hidden.shape[1])
    return super().logits(hidden)


def test_only_still_masked_positions_are_projected():
  bsz = 8
  scores = np.arange(1.0, 9.0)
  for masked_only, expected in ((True, [8, 7, 6, 5, 4, 3, 2, 1]), (False, [8] * 8)):
    PROJECTED_WIDTHS.clear()
    widths = PROJECTED_WIDTHS
    model = RecordingModel(scores, base=BASE, mask_id=MASK, eos_id=EOS)
    cfg = dataclasses.replace(stub_config(bsz, bsz, blocks=2), project_masked_only=masked_only)
    tokens, _ = sampler.generate(model, [[1, 2]], cfg)
    assert widths == expected * 2
    # The same commits either way: slot 7 (most confident) first, slot 0 last.
    assert tokens[0, :bsz].tolist() == [BASE + n for n in range(1, 9)]


def test_projection_widths_round_up_to_an_eighth_of_the_block():
  cfg = sampler.SamplerConfig(block_size=32)
  assert cfg.projection_widths == (4, 8, 12, 16, 20, 24, 28, 32)
  assert dataclasses.replace(cfg, project_masked_only=False).projection_widths == (32,)
  assert sampler.SamplerConfig(block_size=5).projection_widths == (1, 2, 3, 4, 5)


def threshold_run(threshold, scores, bsz=8, blocks=2, seed=0):
  model = ScriptedModel(scores, base=BASE, mask_id=MASK, eos_id=EOS)
  cfg = dataclasses.replace(stub_config(bsz, bsz, blocks=blocks), threshold=threshold)
  ids, valid, lengths = sampler.pad_prompts([[1, 2, 3], [4]], cfg)
  tokens, blocks_run, steps_run = sampler.generate_padded(
      model, ids, valid, lengths, jax.random.PRNGKey(seed), cfg
  )
  return np.asarray(tokens), int(blocks_run), int(steps_run)


def test_threshold_commits_every_confident_position_and_at_least_one_per_step():
  bsz = 8
  # Chosen-token probability exp(s) / (exp(s) + 255): above 0.5 for s > 5.54, i.e. the
  # slots with scores 9, 7, 8, 6 (1, 3, 5, 7); the other four go one per step.
  scores = np.array([3.0, 9.0, 1.0, 7.0, 5.0, 8.0, 2.0, 6.0])
  tokens, blocks_run, steps_run = threshold_run(0.5, scores)
  assert blocks_run == 2 and steps_run == 2 * 5
  for row in tokens:
    for b in range(2):
      steps_seen = commit_steps(row[b * bsz : (b + 1) * bsz], bsz)
      assert steps_seen == {0: [1, 3, 5, 7], 1: [4], 2: [0], 3: [6], 4: [2]}
  again = threshold_run(0.5, scores, seed=3)
  np.testing.assert_array_equal(tokens, again[0])  # greedy: deterministic, key-independent
  assert again[1:] == (blocks_run, steps_run)


def test_threshold_extremes_bound_the_number_of_steps():
  scores = np.linspace(1.0, 4.0, 8)
  # A tiny threshold commits the whole block in its first step ...
  tokens, blocks_run, steps_run = threshold_run(1e-9, scores)
  assert steps_run == blocks_run == 2
  assert set(commit_steps(tokens[0, :8], 8)) == {0}
  # ... and one no confidence reaches is the one-token-per-step schedule.
  tokens, _, steps_run = threshold_run(0.999, scores)
  reference, _, reference_steps = threshold_run(0.0, scores)
  np.testing.assert_array_equal(tokens, reference)
  assert steps_run == reference_steps == 2 * 8


def test_bad_threshold_settings_are_refused():
  with pytest.raises(ValueError, match="threshold must lie in \\[0, 1\\)"):
    sampler.SamplerConfig(threshold=1.0).validate()
  with pytest.raises(ValueError, match="use order='low_confidence' or threshold=0"):
    sampler.SamplerConfig(threshold=0.9, order="random").validate()
