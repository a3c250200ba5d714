"""Sequence packing (data.packing): the packer, the packed BD3LM mask, and packed-vs-unpacked
parity of per-example losses and gradients of a tiny float32 student."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import common
from tide_jax import configs_lib
from tide_jax.data import corpora, features, packing
from tide_jax.data.options import parse_options
from tide_jax.data.pipeline import make_iterator
from tide_jax.diffusion import masks
from tide_jax.distill import plan as plan_lib
from tide_jax.models import dense
from tide_jax.models.config import DecoderConfig

MASK_ID = 39


def stored_example(number: int, length: int, source: int = 0) -> tuple[str, dict]:
  """A stored example whose tokens name it: ids ``number * 1000 + 0..length-1``."""
  rng = np.random.default_rng(number)
  return f"{number:06d}", {
      "input_ids": (number * 1000 + np.arange(length)).astype(np.int32),
      "maskable": rng.random(length) < 0.7,
      "source": np.int32(source),
  }


# ----------------------------------------------------------------------------- the packer


@pytest.mark.parametrize("open_rows", [1, 4, 1000])
def test_packer_keeps_every_example_once_on_block_boundaries(open_rows):
  max_len, block = 64, 8
  rng = np.random.default_rng(open_rows)
  lengths = block * rng.integers(1, max_len // block + 1, size=300)
  examples = [stored_example(n, int(length)) for n, length in enumerate(lengths)]
  rows = list(packing.pack_examples(iter(examples), max_len, block, open_rows))

  seen = []
  for key, row in rows:
    m = len(row["input_ids"])
    assert m <= max_len and len(row["maskable"]) == len(row["segment_ids"]) == m
    assert row["source"] == 0
    segments = row["segment_ids"]
    starts = np.flatnonzero(np.r_[True, segments[1:] != segments[:-1]])
    # Segments 1, 2, ..., k in order, each starting on a block boundary.
    np.testing.assert_array_equal(segments[starts], np.arange(1, len(starts) + 1))
    assert (starts % block == 0).all()
    first = int(row["input_ids"][0]) // 1000
    assert key == f"{first:06d}"  # a row is named after its first example
    for start, end in zip(starts, np.r_[starts[1:], m]):
      ids = row["input_ids"][start:end]
      number = int(ids[0]) // 1000
      _, original = examples[number]
      np.testing.assert_array_equal(ids, original["input_ids"])  # whole, uncut
      np.testing.assert_array_equal(row["maskable"][start:end], original["maskable"])
      seen.append(number)
  assert sorted(seen) == list(range(len(examples)))  # none lost, none repeated
  # Counts: tokens add up; rows are fewer than examples and at least the bound.
  used = np.array([len(r["input_ids"]) for _, r in rows])
  assert used.sum() == lengths.sum()
  assert -(-lengths.sum() // max_len) <= len(rows) < len(examples)
  if open_rows == 1:  # one open row: no two rows written one after the other could merge
    assert (used[1:] + used[:-1] > max_len).all()
  if open_rows >= len(examples):  # plain first fit: no two rows could be merged
    pairs = used[:, None] + used[None, :]
    assert (pairs[~np.eye(len(used), dtype=bool)] > max_len).all()


def test_packer_refuses_a_misaligned_example_and_mixed_sources():
  with pytest.raises(ValueError, match="multiple of block_size=8"):
    list(packing.pack_examples([stored_example(0, 12)], 64, 8))
  with pytest.raises(ValueError, match="mixes sources"):
    list(packing.pack_examples([stored_example(0, 8, 0), stored_example(1, 8, 1)], 64, 8))


def test_row_positions_restart_per_segment():
  shapes = features.Shapes(max_len=16, block_size=4, packing=True)
  _, stored = next(packing.pack_examples(iter([stored_example(1, 8), stored_example(2, 4)]), 16, 4))
  row = features.to_row(stored, shapes, s_pad=7)
  np.testing.assert_array_equal(row["segment_ids"], [1] * 8 + [2] * 4 + [0] * 4)
  np.testing.assert_array_equal(row["positions"], [*range(8), *range(4), 0, 0, 0, 0])
  np.testing.assert_array_equal(row["valid"], row["segment_ids"] > 0)
  np.testing.assert_array_equal(row["input_ids"][12:], [7] * 4)
  empty = features.empty_row(shapes, 7)
  assert (empty["segment_ids"] == 0).all() and (empty["positions"] == 0).all()


def _chat_config(root, cache, packing_on: bool):
  return ml_collections.ConfigDict(
      dict(
          format="chat",
          train_files=[str(root / "*.jsonl")],
          tokenizer="qwen3",
          max_len=256,
          block_size=16,
          cache_dir=str(cache),
          eval_fraction=0.2,
          packing=packing_on,
      )
  )


def _segments(batches) -> list[bytes]:
  """Every example of the batches as the bytes of its (input_ids, maskable)."""
  out = []
  for batch in batches:
    for ids, maskable, segments in zip(batch["input_ids"], batch["maskable"], batch["segment_ids"]):
      for number in range(1, int(segments.max(initial=0)) + 1):
        at = segments == number
        out.append(ids[at].tobytes() + maskable[at].tobytes())
  return out


def test_packed_pipeline_holds_every_example_of_the_unpacked_one(tmp_path):
  (tmp_path / "chats.jsonl").write_text(
      "\n".join(json.dumps(chat) for chat in corpora.stdlib_chats(60)), encoding="utf-8"
  )
  packed = make_iterator(
      _chat_config(tmp_path, tmp_path / "packed", True),
      split="train",
      batch_size=4,
      seed=0,
      repeat=False,
  )
  plain = make_iterator(
      _chat_config(tmp_path, tmp_path / "plain", False),
      split="train",
      batch_size=4,
      seed=0,
      repeat=False,
  )
  packed_batches = list(packed)
  assert set(packed_batches[0]) == {
      "input_ids",
      "maskable",
      "valid",
      "source",
      "segment_ids",
      "positions",
  }
  unpacked = []
  for batch in plain:
    for ids, maskable, valid in zip(batch["input_ids"], batch["maskable"], batch["valid"]):
      if valid.any():
        unpacked.append(ids[valid].tobytes() + maskable[valid].tobytes())
  assert sorted(_segments(packed_batches)) == sorted(unpacked)
  summary, plain_summary = packed.summary["train"], plain.summary["train"]
  assert summary["examples"] == plain_summary["examples"] == len(unpacked)
  assert summary["truncated"] == plain_summary["truncated"]
  assert summary["rows"] == packed.num_records < summary["examples"] == plain_summary["rows"]
  tokens = summary["student_tokens"]
  assert summary["padding_tokens"] == summary["rows"] * 256 - tokens
  assert plain_summary["padding_tokens"] == plain_summary["rows"] * 256 - tokens
  # The held-out split stays one example per row.
  held_out = make_iterator(
      _chat_config(tmp_path, tmp_path / "packed", True),
      split="eval",
      batch_size=4,
      seed=0,
      repeat=False,
  )
  for batch in held_out:
    assert (batch["segment_ids"] <= 1).all()
    np.testing.assert_array_equal(batch["segment_ids"] == 1, batch["valid"])
  assert held_out.summary["eval"]["rows"] == held_out.summary["eval"]["examples"]


def test_packing_with_a_teacher_is_refused(tmp_path):
  config = _chat_config(tmp_path, tmp_path, True)
  config.teacher_tokenizer = "llama3"
  with pytest.raises(ValueError, match="packing=True cannot be combined with a teacher"):
    parse_options(config)
  run = common.base_config()
  run.data.packing = True
  configs_lib.validate(run)  # the student alone packs
  run.data.teacher_tokenizer = "qwen3"
  with pytest.raises(ValueError, match=r"^data.packing=True cannot be used with a teacher"):
    configs_lib.validate(run)


# ----------------------------------------------------------------------------- the mask


def test_packed_mask_is_the_block_diagonal_of_the_examples_masks():
  length, block = 48, 4
  rng = np.random.default_rng(0)
  for _ in range(20):
    lengths, used = [], 0
    while True:
      n = block * int(rng.integers(1, 5))
      if used + n > length or rng.random() < 0.15:
        break
      lengths.append(n)
      used += n
    segments = np.zeros(length, np.int32)
    expected = np.zeros((2 * length, 2 * length), bool)
    offset = 0
    for number, n in enumerate(lengths, start=1):
      segments[offset : offset + n] = number
      own = masks.bd3lm_attention_mask(n, block)
      places = np.r_[np.arange(offset, offset + n), length + np.arange(offset, offset + n)]
      expected[np.ix_(places, places)] = own
      offset += n
    got = np.asarray(masks.packed_bd3lm_attention_mask(jnp.asarray(segments[None]), block))[0]
    np.testing.assert_array_equal(got, expected)


# ----------------------------------------------------------------------------- parity


def tiny_student():
  cfg = DecoderConfig(
      model_type="qwen3",
      vocab_size=40,
      hidden_size=16,
      num_layers=2,
      num_heads=2,
      num_kv_heads=1,
      head_dim=8,
      intermediate_size=24,
      rope_theta=1e4,
      rms_norm_eps=1e-6,
      tie_word_embeddings=False,
      qk_norm=True,
      qkv_bias=False,
      o_bias=False,
  )
  return dense.build_decoder(cfg, seed=5)


def _layouts(block: int, max_len: int):
  """The same examples, noise included, packed and one per row.

  Returns ``(packed, unpacked, count)``: each layout as (batch, noise, places), places
  mapping example k to its (row, start, length); count, the number of examples.
  """
  rng = np.random.default_rng(3)
  lengths = [8, 4, 12, 4, 8, 16, 4]
  examples = []
  for number, n in enumerate(lengths):
    ids = rng.integers(0, MASK_ID, n).astype(np.int32)
    maskable = np.ones(n, bool)
    maskable[: rng.integers(0, n // 2 + 1)] = False  # a prompt
    t = float(rng.uniform(0.05, 1.0))
    masked = maskable & (rng.random(n) < t)
    masked[np.flatnonzero(maskable)[0]] = True  # at least one scored token
    examples.append(dict(ids=ids, maskable=maskable, t=t, masked=masked, n=n))
  stream = (
      (f"{k:03d}", {"input_ids": e["ids"], "maskable": e["maskable"], "source": np.int32(0)})
      for k, e in enumerate(examples)
  )
  rows = [stored for _, stored in packing.pack_examples(stream, max_len, block)]
  assert len(rows) < len(examples)

  def layout(row_contents, packed: bool):
    b = len(row_contents)
    out = {
        "input_ids": np.zeros((b, max_len), np.int32),
        "maskable": np.zeros((b, max_len), bool),
        "valid": np.zeros((b, max_len), bool),
        "x_t": np.zeros((b, max_len), np.int32),
        "masked": np.zeros((b, max_len), bool),
        "t": np.ones((b, max_len), np.float32),
        "segment_ids": np.zeros((b, max_len), np.int32),
    }
    places = {}
    for r, members in enumerate(row_contents):
      start = 0
      for number, e in enumerate(members, start=1):
        k = next(i for i, x in enumerate(examples) if x is e)
        span = slice(start, start + e["n"])
        out["input_ids"][r, span] = e["ids"]
        out["maskable"][r, span] = e["maskable"]
        out["valid"][r, span] = True
        out["masked"][r, span] = e["masked"]
        out["x_t"][r, span] = np.where(e["masked"], MASK_ID, e["ids"])
        out["t"][r, span] = e["t"]
        out["segment_ids"][r, span] = number
        places[k] = (r, start, e["n"])
        start += e["n"]
    batch = {key: jnp.asarray(out[key]) for key in ("input_ids", "maskable", "valid")}
    t = jnp.asarray(out["t"])
    if packed:
      batch["segment_ids"] = jnp.asarray(out["segment_ids"])
      batch["positions"] = jnp.asarray(
          np.stack([packing.segment_positions(s) for s in out["segment_ids"]])
      )
    else:
      t = t[:, 0]  # one time per row, the row's example's
    noise = plan_lib.Noise(jnp.asarray(out["x_t"]), jnp.asarray(out["masked"]), t)
    return batch, noise, places

  by_ids = {e["ids"].tobytes(): e for e in examples}
  packed_rows = [
      [
          by_ids[row["input_ids"][row["segment_ids"] == s].tobytes()]
          for s in np.unique(row["segment_ids"])
      ]
      for row in rows
  ]
  packed = layout(packed_rows, True)
  unpacked = layout([[e] for e in examples], False)
  return packed, unpacked, len(examples)


def _example_losses(plan, model, batch, noise, places, count):
  """Each example's loss: its cross-entropy sum over its own maskable tokens."""
  row, start, length = (jnp.asarray([places[k][i] for k in range(count)]) for i in range(3))
  b, max_len = batch["input_ids"].shape
  column = jnp.arange(max_len)[None, :]

  def one(k):
    mine = (jnp.arange(b)[:, None] == row[k]) & (column >= start[k])
    mine &= column < start[k] + length[k]
    parts = plan.loss_parts(model, None, batch, noise.replace(masked=noise.masked & mine), 0.0)
    return parts["ce_sum"] / jnp.sum(batch["maskable"] & mine)

  return jax.lax.map(one, jnp.arange(count))


@pytest.mark.parametrize("kind", ["bd3lm", "mdlm"])
def test_packed_losses_and_gradients_equal_the_unpacked(kind):
  block, max_len = 4, 16
  (p_batch, p_noise, p_places), (u_batch, u_noise, u_places), count = _layouts(block, max_len)
  plan = plan_lib.Plan(plan_lib.Objective(kind, "linear", 1e-3, MASK_ID, block, row_block=7))
  graphdef, params = nnx.split(tiny_student())
  weights = jnp.asarray(np.random.default_rng(0).normal(size=count), jnp.float32)

  def per_example(params, batch, noise, places):
    return _example_losses(plan, nnx.merge(graphdef, params), batch, noise, places, count)

  def combined(params, batch, noise, places):
    # A random combination checks every example's gradient in one backward pass.
    return jnp.sum(weights * per_example(params, batch, noise, places))

  def batch_loss(params, batch, noise, places):
    del places
    parts = plan.loss_parts(nnx.merge(graphdef, params), None, batch, noise, 0.0)
    return plan.loss(parts, plan.totals(batch, noise))

  def run(fn, batch, noise, places):  # compiled: the step's own numerics, and fast
    return jax.jit(lambda p, b, n: fn(p, b, n, places))(params, batch, noise)

  packed_losses = run(per_example, p_batch, p_noise, p_places)
  unpacked_losses = run(per_example, u_batch, u_noise, u_places)
  assert float(jnp.min(unpacked_losses)) > 0.1  # real losses, not empty sums
  np.testing.assert_allclose(packed_losses, unpacked_losses, rtol=1e-5, atol=1e-6)
  for loss_fn in (combined, batch_loss):
    packed_value, packed_grads = run(jax.value_and_grad(loss_fn), p_batch, p_noise, p_places)
    unpacked_value, unpacked_grads = run(jax.value_and_grad(loss_fn), u_batch, u_noise, u_places)
    np.testing.assert_allclose(packed_value, unpacked_value, rtol=1e-5)
    assert jax.tree.leaves(packed_grads)
    for a, b in zip(jax.tree.leaves(packed_grads), jax.tree.leaves(unpacked_grads)):
      assert float(jnp.max(jnp.abs(b))) > 0.0
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # The batch loss keeps today's normalisation: the maskable tokens of the whole batch.
  assert float(jnp.sum(p_batch["maskable"])) == float(jnp.sum(u_batch["maskable"]))


def test_drawn_noise_is_per_example_in_packed_rows():
  block, max_len = 4, 16
  (p_batch, _, _), _, _ = _layouts(block, max_len)
  plan = plan_lib.Plan(plan_lib.Objective("bd3lm", "linear", 1e-3, MASK_ID, block, row_block=7))
  noise = plan.draw(jax.random.key(1), p_batch)
  t, segments = np.asarray(noise.t), np.asarray(p_batch["segment_ids"])
  assert t.shape == segments.shape
  times = []
  for row_t, row_segments in zip(t, segments):
    for number in range(1, row_segments.max() + 1):
      own = row_t[row_segments == number]
      assert (own == own[0]).all() and 1e-3 <= own[0] < 1.0  # one time per example
      times.append(own[0])
  assert len(set(times)) == len(times)  # examples of a row drawn independently
  assert not np.asarray(noise.masked)[~np.asarray(p_batch["maskable"])].any()
  x_t = np.asarray(noise.x_t)
  np.testing.assert_array_equal(x_t == MASK_ID, np.asarray(noise.masked))
