"""Restricted vocabularies (data.restrict_vocab) with the real Qwen3 and Llama-3 tokenizers:
exact round trips, unchanged alignments, ids renumbered into a small table, config resolution."""

import os

import numpy as np
import pytest

from configs import smoke
from tide_jax.data import encode, options, preprocess, records, restricted, vocab
from tide_jax.data.tokenizers import get_tokenizer, token_bytes

CORPUS = [("text", ["pystdlib://json/*.py", "pystdlib://email/mime/*.py"])]
OUTSIDE = {  # text the table was not built from: every dropped token is spelled with kept ones
    "stdlib": records.resolve_pattern("pystdlib://http/cookiejar.py"),
    "cjk": "你好，世界。日本語のテキスト。한국어 텍스트입니다.",
    "emoji": "emoji 🎉🎉 family 👩‍👩‍👧 flag 🇯🇵 ✨ done",
    "specials": "a<|endoftext|>b <|im_start|>user\nhi<|im_end|>",
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  cache = str(tmp_path_factory.mktemp("vocab"))
  return {
      "qwen3": vocab.restricted_tokenizer_dir("qwen3", CORPUS, {151669}, cache),
      "llama3": vocab.restricted_tokenizer_dir("llama3", CORPUS, {128002}, cache),
  }


def corpus_texts():
  return [
      item.text
      for item in records.read_records(records.expand_files(CORPUS[0][1]), "text")
      if isinstance(item, records.TextRecord)
  ]


def outside_text(name):
  text = OUTSIDE[name]
  return open(text, encoding="utf-8").read() if os.path.isfile(text) else text


@pytest.mark.parametrize("spec", ["qwen3", "llama3"])
def test_corpus_text_keeps_its_tokens_and_round_trips(folders, spec):
  base, tok = get_tokenizer(spec), get_tokenizer(folders[spec])
  assert isinstance(tok, restricted.RestrictedTokenizer)
  # An order of magnitude fewer ids: the corpus's, the 256 single bytes, the added tokens.
  assert 1_000 < len(tok) < len(base) / 10
  for text in corpus_texts():
    ids = tok.encode(text)
    assert tok.to_base(ids) == base.encode(text, add_special_tokens=False)  # same tokens
    assert max(ids) < len(tok) and min(ids) >= 0
    assert tok.decode(ids) == text
  for name in ("eos_token_id", "pad_token_id"):
    assert int(tok.kept[getattr(tok, name)]) == getattr(base, name)


@pytest.mark.parametrize("spec", ["qwen3", "llama3"])
@pytest.mark.parametrize("name", sorted(OUTSIDE))
def test_text_outside_the_corpus_round_trips_exactly(folders, spec, name):
  base, tok = get_tokenizer(spec), get_tokenizer(folders[spec])
  text = outside_text(name)
  ids = tok.encode(text)
  assert max(ids) < len(tok)
  assert tok.decode(ids) == text
  # Same bytes, and at least as many tokens (dropped ones are spelled with kept ones).
  table, base_table = token_bytes(tok), token_bytes(base)
  base_ids = base.encode(text, add_special_tokens=False)
  assert b"".join(table[i] for i in ids) == b"".join(base_table[i] for i in base_ids)
  assert len(ids) >= len(base_ids)
  if name == "stdlib":
    assert len(ids) > len(base_ids)  # the json/email corpus lacks some of its tokens


def test_the_mask_slot_past_the_tokenizer_is_kept_without_text(folders):
  tok = get_tokenizer(folders["qwen3"])
  mask = tok.to_restricted(151669)
  assert mask == len(tok) - 1 and token_bytes(tok)[mask] == b""
  assert mask in tok.added_token_ids()
  with pytest.raises(ValueError, match="not part of the restricted vocabulary"):
    tok.to_restricted(151000)


def examples(spec_student, spec_teacher, alignment, max_len=64):
  opts = options.parse_options(
      {
          "format": "text",
          "train_files": CORPUS[0][1],
          "tokenizer": spec_student,
          "teacher_tokenizer": spec_teacher,
          "alignment": alignment,
          "max_len": max_len,
          "teacher_max_len": max_len,
          "block_size": 32,
          "cache_dir": "unused",
      }
  )
  out = []
  for text in corpus_texts()[:4]:
    for feats, status, _, _ in preprocess.process_record(records.TextRecord(text, "t"), opts):
      out.append(feats)
  return out


@pytest.mark.parametrize(
    "student,teacher,alignment",
    [("qwen3", "llama3", "chunks"), ("qwen3", "qwen3", "positions")],
)
def test_prepared_examples_and_alignments_are_unchanged(folders, student, teacher, alignment):
  full = examples(student, teacher, alignment)
  cut = examples(folders[student], folders[teacher], alignment)
  assert len(full) == len(cut) > 20
  s_tok, t_tok = get_tokenizer(folders[student]), get_tokenizer(folders[teacher])
  for a, b in zip(full, cut):
    assert set(a) == set(b)
    # Token ids are renumbered (and map back to the same tokens) ...
    np.testing.assert_array_equal(s_tok.kept[b["input_ids"]], a["input_ids"])
    np.testing.assert_array_equal(t_tok.kept[b["teacher_input_ids"]], a["teacher_input_ids"])
    # ... and everything else, the alignments above all, is identical.
    for key in set(a) - {"input_ids", "teacher_input_ids"}:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  if alignment == "chunks":
    assert sum(int(a["num_chunks"]) for a in full) > 100


def test_saved_restricted_tokenizer_loads_back(folders, tmp_path):
  tok = get_tokenizer(folders["qwen3"])
  tok.save_pretrained(str(tmp_path / "export"))
  again = get_tokenizer(str(tmp_path / "export"))
  text = outside_text("stdlib")
  assert again.encode(text) == tok.encode(text) and len(again) == len(tok)
  info = encode.tokenizer_info(folders["qwen3"])
  assert info.table == tuple(token_bytes(tok)) and info.special.sum() == 27  # 26 added + mask


def restricted_smoke(tmp_path, variant):
  c = smoke.get_config(variant)
  c.data.restrict_vocab = True
  c.data.train_files = CORPUS[0][1]
  c.data.eval_files = ["pystdlib://json/tool.py"]
  c.data.cache_dir = str(tmp_path / "cache")
  return c


def test_run_config_is_resolved_once_and_consistently(tmp_path):
  config = restricted_smoke(tmp_path, "shared")
  with pytest.raises(ValueError, match="resolve the run config first"):
    options.parse_options(config.data)
  out = vocab.restricted_config(config, str(tmp_path))
  tok = get_tokenizer(out.data.tokenizer)
  # One table for both sides of a shared tokenizer: positions pair identical ids.
  assert out.data.teacher_tokenizer == out.data.tokenizer == out.teacher.tokenizer
  assert out.model.vocab_size == len(tok) < 20_000
  assert tok.kept[out.objective.mask_token_id] == config.objective.mask_token_id == 151669
  assert tok.kept[out.teacher.mask_token_id] == 151669
  assert options.parse_options(out.data).tokenizer == out.data.tokenizer
  assert vocab.restricted_config(out, str(tmp_path)) is out  # already resolved
  cross = vocab.restricted_config(restricted_smoke(tmp_path, "cross"), str(tmp_path))
  assert cross.data.tokenizer == out.data.tokenizer  # the same corpus gives the same table
  teacher = get_tokenizer(cross.data.teacher_tokenizer)
  assert teacher.kept[cross.teacher.mask_token_id] == 128002  # <|reserved_special_token_0|>
  init = restricted_smoke(tmp_path, "bd3lm")
  init.model.init_from = "some/hf_dir"
  with pytest.raises(ValueError, match="model.init_from names a full-vocabulary checkpoint"):
    vocab.restricted_config(init, str(tmp_path))
