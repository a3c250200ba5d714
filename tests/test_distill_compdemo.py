"""CompDemo (docs/method.md §3.2) and the teacher input builders (docs/method.md §3.4)."""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tide_jax.diffusion import noising
from tide_jax.distill import chunks, compdemo
from tide_jax.teachers import inputs as teacher_inputs

MASK_ID = 97


def random_batch(seed, b=3, length=12, rate=0.6):
  rng = np.random.default_rng(seed)
  clean = rng.integers(0, 90, (b, length)).astype(np.int32)
  masked = rng.random((b, length)) < rate
  valid = np.ones((b, length), bool)
  valid[0, -3:] = False
  masked &= valid
  return clean, masked, valid


class RecordingTeacher:
  """Counts calls; its logits at (row r, position j) encode r, whether j was masked in that
  row, and the row's whole input, so each prediction can be traced to its pass."""

  def __init__(self):
    self.calls = []

  def __call__(self, input_ids, attention_mask, position_ids):
    self.calls.append(input_ids.shape)
    rows, length = input_ids.shape
    row_id = jnp.broadcast_to(jnp.arange(rows, dtype=jnp.float32)[:, None, None], (rows, length, 1))
    was_masked = (input_ids == MASK_ID).astype(jnp.float32)[:, :, None]
    whole_row = jnp.broadcast_to(input_ids.astype(jnp.float32)[:, None, :], (rows, length, length))
    return jnp.concatenate([row_id, was_masked, whole_row], axis=-1)


def build_bidirectional(clean, masked, valid):
  inputs = teacher_inputs.bidirectional_inputs(clean, masked, valid, mask_token_id=MASK_ID)
  return dict(
      input_ids=inputs.input_ids,
      attention_mask=inputs.attention_mask,
      position_ids=inputs.position_ids,
  )


def doubled_call(teacher, clean, masked, in_a, valid):
  """Both passes in one call, then each position read from its pass: ``[b, Lt, ...]``."""
  out2 = teacher(
      **build_bidirectional(
          compdemo.repeat_passes(clean),
          compdemo.doubled_masks(masked, in_a),
          compdemo.repeat_passes(valid),
      )
  )
  return compdemo.select_from_passes(out2, in_a)


@pytest.mark.parametrize("ratio", [0.5, 0.3])
def test_one_teacher_call_on_the_doubled_batch_and_provenance(ratio):
  clean, masked, valid = random_batch(0)
  b, length = clean.shape
  in_a = np.asarray(compdemo.split_tokens(jax.random.key(1), masked, ratio))
  teacher = RecordingTeacher()
  run = jax.jit(lambda *args: doubled_call(teacher, *args))
  out = np.asarray(run(clean, masked, in_a, valid))
  assert teacher.calls == [(2 * b, length)]  # traced once, one call, batch 2b
  assert in_a.any() and (masked & ~in_a).any()
  for i in range(b):
    for j in range(length):
      row, was_masked, row_ids = int(out[i, j, 0]), out[i, j, 1], out[i, j, 2:]
      assert row in (2 * i, 2 * i + 1)  # both passes of a sequence sit next to it
      if masked[i, j]:
        # Masked in the pass it was read from, and the other part of M revealed there.
        assert was_masked == 1
        same_side = in_a[i] if in_a[i, j] else masked[i] & ~in_a[i]
        other_side = masked[i] & ~same_side
        assert np.all(row_ids[same_side] == MASK_ID)
        assert np.array_equal(row_ids[other_side], clean[i][other_side])
        assert row == (2 * i + 1 if in_a[i, j] else 2 * i)
      else:
        # Outside M: pass 1, and the token itself is clean as in a single pass.
        assert row == 2 * i and was_masked == 0 and row_ids[j] == clean[i, j]
  # Every position outside M sees the same input in both passes.
  assert np.array_equal(
      np.asarray(noising.apply_mask(clean, masked, MASK_ID))[~masked], clean[~masked]
  )


def toy_teacher(input_ids, attention_mask, position_ids):
  """A small deterministic bidirectional model with integer-valued (exact) arithmetic."""
  table = jnp.asarray(np.random.default_rng(5).integers(-4, 5, (128, 16)), jnp.float32)
  h = table[input_ids]
  mixed = jnp.einsum("bqk,bkd->bqd", attention_mask[:, 0].astype(jnp.float32), h)
  return mixed + 3.0 * h + position_ids[..., None].astype(jnp.float32)


def test_ratio_zero_equals_the_single_pass_exactly():
  clean, masked, valid = random_batch(2)
  in_a = compdemo.split_tokens(jax.random.key(0), masked, 0.0)
  assert not np.asarray(in_a).any()
  doubled = doubled_call(toy_teacher, clean, masked, in_a, valid)
  single = toy_teacher(**build_bidirectional(clean, masked, valid))
  np.testing.assert_array_equal(doubled, single)


def test_pass_of_indexes_the_same_rows_as_select_from_passes():
  clean, masked, valid = random_batch(3)
  b, length = clean.shape
  in_a = compdemo.split_tokens(jax.random.key(2), masked, 0.5)
  out2 = jnp.asarray(np.random.default_rng(0).normal(size=(2 * b, length, 5)))
  passes = compdemo.pass_of(in_a, (b, length))
  rows = (2 * jnp.arange(b)[:, None] + passes) * length + jnp.arange(length)[None]
  np.testing.assert_array_equal(out2.reshape(-1, 5)[rows], compdemo.select_from_passes(out2, in_a))
  assert not np.asarray(compdemo.pass_of(None, (b, length))).any()


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(seed=st.integers(0, 2**16), ratio=st.floats(0, 1))
def test_property_per_chunk_split_never_splits_a_chunk(seed, ratio):
  rng = np.random.default_rng(seed)
  b, ls, lt, c = 2, 15, 18, 8
  s_ids = np.sort(rng.integers(-1, c, (b, ls)), axis=1).astype(np.int32)
  t_ids = np.sort(rng.integers(-1, c, (b, lt)), axis=1).astype(np.int32)
  s_mask, t_mask = chunks.chunk_consistent_masks(rng.random((b, ls)) < 0.5, s_ids, t_ids, c)
  key = jax.random.key(seed)
  _, s_in_a = compdemo.split_chunks(key, s_mask, s_ids, c, ratio)
  t_in_a = np.asarray(
      compdemo.teacher_split(
          key,
          ratio,
          s_mask,
          t_mask,
          granularity="chunk",
          student_chunk_ids=s_ids,
          teacher_chunk_ids=t_ids,
          max_chunks=c,
      )
  )
  s_in_a, s_mask, t_mask = map(np.asarray, (s_in_a, s_mask, t_mask))
  assert not (s_in_a & ~s_mask).any() and not (t_in_a & ~t_mask).any()
  for i in range(b):
    for chunk in range(c):
      sides = np.concatenate(
          [s_in_a[i][(s_ids[i] == chunk) & s_mask[i]], t_in_a[i][(t_ids[i] == chunk) & t_mask[i]]]
      )
      assert sides.all() or not sides.any()


def test_token_split_is_carried_through_position_pairs():
  masked = np.array([[True, True, False, True]])
  pairs = np.array([[2, 0, 1, -1]], np.int32)  # student position -> teacher position
  teacher_masked = compdemo.flags_to_teacher(masked, pairs, 5)
  np.testing.assert_array_equal(teacher_masked, [[True, False, True, False, False]])
  in_a = compdemo.teacher_split(
      jax.random.key(0), 1.0, masked, teacher_masked, granularity="token", pair_teacher_pos=pairs
  )
  np.testing.assert_array_equal(in_a, teacher_masked)
  with pytest.raises(ValueError, match="granularity"):
    compdemo.teacher_split(jax.random.key(0), 1.0, masked, teacher_masked, granularity="span")


def test_split_ratio_is_respected_on_average():
  masked = np.ones((64, 64), bool)
  in_a = compdemo.split_tokens(jax.random.key(3), masked, 0.3)
  assert abs(float(np.mean(in_a)) - 0.3) < 0.02


# ----------------------------------------------------------------------------- teacher inputs


def test_bidirectional_inputs():
  clean, masked, valid = random_batch(4)
  got = teacher_inputs.bidirectional_inputs(clean, masked, valid, mask_token_id=MASK_ID)
  np.testing.assert_array_equal(got.input_ids, np.where(masked, MASK_ID, clean))
  b, length = clean.shape
  for i in range(b):
    for q in range(length):
      expected = valid[i].copy()
      expected[q] = True  # each query keeps itself
      np.testing.assert_array_equal(got.attention_mask[i, 0, q], expected)
  np.testing.assert_array_equal(got.position_ids, np.tile(np.arange(length), (b, 1)))
  assert got.prediction_offset == 0


def test_x0_xt_inputs_use_the_swapped_bd3lm_mask():
  clean, masked, _ = random_batch(5, b=2, length=8)
  block = 4
  got = teacher_inputs.x0_xt_inputs(clean, masked, block_size=block, mask_token_id=MASK_ID)
  length = clean.shape[1]
  np.testing.assert_array_equal(got.input_ids[:, :length], clean)
  np.testing.assert_array_equal(got.input_ids[:, length:], np.where(masked, MASK_ID, clean))
  np.testing.assert_array_equal(got.position_ids[0], np.tile(np.arange(length), 2))
  # The BD3LM rules (docs/method.md §2) written out, with the clean half first.
  expected = np.zeros((2 * length, 2 * length), bool)
  for q in range(2 * length):
    for k in range(2 * length):
      q_x0, k_x0 = q < length, k < length
      q_blk, k_blk = (q % length) // block, (k % length) // block
      expected[q, k] = (
          (q_x0 == k_x0 and q_blk == k_blk)
          or (not q_x0 and k_x0 and q_blk > k_blk)
          or (q_x0 and k_x0 and q_blk >= k_blk)
      )
  for i in range(2):
    np.testing.assert_array_equal(got.attention_mask[i, 0], expected)
  assert got.prediction_offset == length
  # Padding keys can be removed; a padded query still attends to itself.
  valid = np.ones((2, length), bool)
  valid[1, -2:] = False
  padded = teacher_inputs.x0_xt_inputs(
      clean, masked, block_size=block, mask_token_id=MASK_ID, valid=valid
  )
  assert not padded.attention_mask[1, 0, 0, length - 1]
  assert padded.attention_mask[1, 0, length - 1, length - 1]
