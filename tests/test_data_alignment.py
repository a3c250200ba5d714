"""Alignment acceptance with the real Qwen3 (student) and Llama-3 (teacher) tokenizers."""

import unicodedata

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tide_jax.data import alignment, encode, features
from tide_jax.data.tokenizers import token_bytes

TEXTS = {
    "python": "def add(a, b):\n    '''Sum.'''\n    return a + b  # 42\n\n\nclass Foo:\n\tpass\n",
    "english": "The quick brown fox doesn't jump over 1234567 lazy dogs; it'd rather SLEEP.",
    "cjk": "你好，世界。日本語のテキスト。한국어 텍스트입니다.",
    "emoji": "emoji 🎉🎉 family 👩‍👩‍👧 flag 🇯🇵 ✨ done",
    "whitespace": "   leading\n\n\n\t\t  mixed   runs \r\n   \n        end   ",
}

OTHER_TEMPLATE = (  # different role markers, an injected system prompt, no trailing newline
    "<|im_start|>SYSTEM: You are the teacher.<|im_end|>"
    "{% for m in messages %}<|im_start|>[{{ m['role'] | upper }}] {{ m['content'] }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>[ASSISTANT] {% endif %}"
)


@pytest.fixture(scope="module")
def infos():
  return {
      "qwen3": encode.tokenizer_info("qwen3"),
      "llama3": encode.tokenizer_info("llama3"),
      "qwen3_other": encode.tokenizer_info("qwen3", OTHER_TEMPLATE),
  }


@pytest.fixture(scope="module")
def tables(infos):
  return {name: token_bytes(info.tokenizer) for name, info in infos.items()}


def check_chunks(s_side, t_side, s_chunk, t_chunk, n, s_table, t_table, full_cover_text=None):
  """The chunk invariants: equal bytes, ordered, contiguous, finest, covering."""
  s_ids, t_ids = s_side.ids, t_side.ids
  for chunk_ids in (s_chunk, t_chunk):
    used = chunk_ids[chunk_ids >= 0]
    assert (np.diff(used) >= 0).all()  # ordered along the sequence
    assert set(used.tolist()) == set(range(n))  # numbered 0..n-1, all present on this side
    for c in range(n):  # contiguous tokens
      where = np.flatnonzero(chunk_ids == c)
      assert (np.diff(where) == 1).all()
  covered = []
  for c in range(n):
    s_tok, t_tok = s_ids[s_chunk == c], t_ids[t_chunk == c]
    s_bytes = [s_table[i] for i in s_tok]
    t_bytes = [t_table[i] for i in t_tok]
    assert b"".join(s_bytes) == b"".join(t_bytes), c
    # Finest: no boundary strictly inside the chunk is shared by both sides.
    s_cuts = set(np.cumsum([len(b) for b in s_bytes])[:-1].tolist())
    t_cuts = set(np.cumsum([len(b) for b in t_bytes])[:-1].tolist())
    assert not s_cuts & t_cuts, c
    # Disjoint and adjacent: each chunk starts where the previous one ended.
    where = np.flatnonzero(s_chunk == c)
    covered.append((int(s_side.starts[where[0]]), int(s_side.ends[where[-1]])))
  for (a0, b0), (a1, b1) in zip(covered, covered[1:]):
    assert b0 <= a1
  if full_cover_text is not None:
    assert covered[0][0] == 0 and covered[-1][1] == len(full_cover_text.encode())
    assert all(b0 == a1 for (_, b0), (a1, _) in zip(covered, covered[1:]))


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_text_chunks_qwen3_vs_llama3(name, infos, tables):
  text = TEXTS[name]
  s, t = encode.encode_text(infos["qwen3"], text), encode.encode_text(infos["llama3"], text)
  s_chunk, t_chunk, n = alignment.chunk_alignment(
      s, t, infos["qwen3"].special, infos["llama3"].special
  )
  assert n >= 1
  check_chunks(s, t, s_chunk, t_chunk, n, tables["qwen3"], tables["llama3"], full_cover_text=text)


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_identical_tokenizers_give_one_token_per_chunk(name, infos):
  text = TEXTS[name]
  s = encode.encode_text(infos["qwen3"], text)
  s_chunk, t_chunk, n = alignment.chunk_alignment(
      s, s, infos["qwen3"].special, infos["qwen3"].special
  )
  assert n == len(s.ids)
  np.testing.assert_array_equal(s_chunk, np.arange(n))
  np.testing.assert_array_equal(t_chunk, np.arange(n))


@settings(max_examples=40, deadline=None)
@given(text=st.text(min_size=1, max_size=80))
def test_random_unicode_chunks(text, infos, tables):
  text = unicodedata.normalize("NFC", text)
  s, t = encode.encode_text(infos["qwen3"], text), encode.encode_text(infos["llama3"], text)
  s_chunk, t_chunk, n = alignment.chunk_alignment(
      s, t, infos["qwen3"].special, infos["llama3"].special
  )
  has_special = infos["qwen3"].special[s.ids].any() or infos["llama3"].special[t.ids].any()
  check_chunks(
      s,
      t,
      s_chunk,
      t_chunk,
      n,
      tables["qwen3"],
      tables["llama3"],
      full_cover_text=None if has_special else text,
  )


CHAT = (
    ("system", "Answer in code."),
    ("user", "  Write 日本語 sum 🎉 please\n\n"),
    ("assistant", "  def f(x):\n    return x ** 2  # ok\n"),
    ("user", "Thanks! Now in one line?"),
    ("assistant", "f = lambda x: x ** 2"),
)


def test_chat_chunks_never_hold_template_tokens(infos, tables):
  s, t = encode.encode_chat(infos["qwen3"], CHAT), encode.encode_chat(infos["llama3"], CHAT)
  s_chunk, t_chunk, n = alignment.chunk_alignment(
      s, t, infos["qwen3"].special, infos["llama3"].special
  )
  check_chunks(s, t, s_chunk, t_chunk, n, tables["qwen3"], tables["llama3"])
  # Every chunked token lies inside some message's content span, on both sides.
  for side, chunk_ids in ((s, s_chunk), (t, t_chunk)):
    spans = [(a, b) for a, b, _ in filter(None, side.spans)]
    for i in np.flatnonzero(chunk_ids >= 0):
      assert any(a <= side.starts[i] and side.ends[i] <= b for a, b in spans)
  assert not infos["qwen3"].special[s.ids[s_chunk >= 0]].any()
  assert not infos["llama3"].special[t.ids[t_chunk >= 0]].any()
  # Llama-3 trims contents; the chunks still reach the trimmed content's last bytes.
  last = np.flatnonzero(t_chunk >= 0)[-1]
  assert infos["llama3"].tokenizer.decode(t.ids[last : last + 1]).strip().endswith("2")


def test_chunk_truncation_keeps_only_what_survives_on_both_sides(infos, tables):
  s, t = encode.encode_chat(infos["qwen3"], CHAT), encode.encode_chat(infos["llama3"], CHAT)
  shapes = features.Shapes(
      max_len=96,
      block_size=16,
      teacher_max_len=64,
      teacher_block_size=16,
      alignment="chunks",
      max_pairs=96,
  )
  feats, status = features.build_example(s, infos["qwen3"], shapes, t, infos["llama3"])
  assert status == "truncated" and len(t.ids) > 64
  n = int(feats["num_chunks"])
  s_chunk, t_chunk = feats["student_chunk"], feats["teacher_chunk"]
  assert len(t_chunk) == 64 and n > 0
  full_s, full_t, full_n = alignment.chunk_alignment(
      s, t, infos["qwen3"].special, infos["llama3"].special
  )
  assert n < full_n
  for c in range(n):  # surviving chunks are whole on both sides and unchanged
    np.testing.assert_array_equal(np.flatnonzero(s_chunk == c), np.flatnonzero(full_s == c))
    np.testing.assert_array_equal(np.flatnonzero(t_chunk == c), np.flatnonzero(full_t == c))
  assert set(s_chunk[s_chunk >= 0].tolist()) == set(t_chunk[t_chunk >= 0].tolist()) == set(range(n))


def test_shared_vocabulary_pairs_do_not_shift(infos):
  s = encode.encode_chat(infos["qwen3"], CHAT)
  same = encode.encode_chat(infos["qwen3"], CHAT)
  other = encode.encode_chat(infos["qwen3_other"], CHAT)
  ps, pt = alignment.position_pairs(s, same)
  np.testing.assert_array_equal(ps, pt)  # the same template pairs every content token with itself
  ps2, pt2 = alignment.position_pairs(s, other)
  assert (s.ids[ps2] == other.ids[pt2]).all()
  assert len(ps2) >= 0.8 * len(ps)  # only tokens touching a template boundary may be lost
  # Within each message the teacher position is the student position plus one constant.
  for (sa, sb), (ta, tb) in alignment.matched_spans(s, other):
    inside = (s.starts[ps2] >= sa) & (s.ends[ps2] <= sb)
    shift = pt2[inside] - ps2[inside]
    assert inside.any() and (shift == shift[0]).all()
    assert ((other.starts[pt2[inside]] - ta) == (s.starts[ps2[inside]] - sa)).all()


@settings(max_examples=30, deadline=None)
@given(
    question=st.text(min_size=1, max_size=40).filter(str.strip),
    answer=st.text(min_size=1, max_size=40).filter(str.strip),
)
def test_random_contents_pairs_point_at_equal_ids(question, answer, infos):
  question, answer = (unicodedata.normalize("NFC", t) for t in (question, answer))
  chat = (("user", question), ("assistant", answer))
  s = encode.encode_chat(infos["qwen3"], chat)
  other = encode.encode_chat(infos["qwen3_other"], chat)
  ps, pt = alignment.position_pairs(s, other)
  assert (s.ids[ps] == other.ids[pt]).all()
  for (sa, sb), (ta, tb) in alignment.matched_spans(s, other):
    inside = (s.starts[ps] >= sa) & (s.ends[ps] <= sb)
    assert ((other.starts[pt[inside]] - ta) == (s.starts[ps[inside]] - sa)).all()
    assert ((other.ends[pt[inside]] - ta) == (s.ends[ps[inside]] - sa)).all()
