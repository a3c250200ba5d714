"""Chat formats as the models learned them: golden renderings against `transformers`, trained turns.

The reference is `apply_chat_template` of the official templates stored under
tests/fixtures/chat_templates (see the README there for their sources), loaded by
`transformers.AutoTokenizer` from a tokenizer folder: the project's rendering and token ids
must equal it exactly.
"""

import functools
import json
import os
import shutil

import numpy as np
import pytest
import tokenizers as hf_tokenizers
import transformers

from tide_jax.data import alignment, encode, features
from tide_jax.data.tokenizers import get_tokenizer

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "chat_templates")
QWEN3_CONFIG = os.path.join(FIXTURES, "qwen3-0.6b_tokenizer_config.json")
LLADA2_TEMPLATE = os.path.join(FIXTURES, "llada2.0-mini.jinja")
THINKING_OFF = (("enable_thinking", False),)

CONVERSATIONS = {
    "single": [("user", "What is 2 + 2?"), ("assistant", "2 + 2 = 4.")],
    "system": [
        ("system", "You are a concise assistant."),
        ("user", "Name a colour."),
        ("assistant", "Blue."),
    ],
    "empty_system": [("system", ""), ("user", "Hi"), ("assistant", "Hello!")],
    "multi_turn": [
        ("user", "Write add."),
        ("assistant", "Sure:\ndef add(a, b):\n    return a + b"),
        ("user", "And sub?"),
        ("assistant", "def sub(a, b):\n    return a - b"),
    ],
    "multi_turn_system_code": [
        ("system", "Answer with code only."),
        ("user", "Reverse a list in Python.\n\n```python\nxs = [1, 2, 3]\n```"),
        ("assistant", "\n\n```python\nxs[::-1]\n```\n"),
        ("user", "  In place?  "),
        ("assistant", "\nxs.reverse()"),
    ],
    "unicode": [
        ("user", "Traduis « café crème » en 日本語 🎉"),
        ("assistant", "カフェ・クレーム ☕ (café crème), Ωμέγα, שׁלום"),
    ],
    "answer_is_a_role_name": [("user", "Which role answers?"), ("assistant", "assistant")],
}


def _crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli), the checksum the HuggingFace hub's storage lists for files."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
  return crc ^ 0xFFFFFFFF


def test_qwen3_fixture_is_the_published_file():
  """The fixture is byte for byte Qwen/Qwen3-0.6B's tokenizer_config.json (size 9,732,
  CRC-32C base64 "PUp7Mg==" as listed for the hub file)."""
  data = open(QWEN3_CONFIG, "rb").read()
  assert len(data) == 9732
  assert _crc32c(data) == int.from_bytes(bytes.fromhex("3d4a7b32"), "big")


def _save_backend(folder, tok, extra_specials=()) -> None:
  backend = hf_tokenizers.Tokenizer.from_str(tok.backend_tokenizer.to_str())
  backend.add_special_tokens(list(extra_specials))
  os.makedirs(folder, exist_ok=True)
  backend.save(os.path.join(folder, "tokenizer.json"))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  """Tokenizer folders with the official templates: Qwen3's (its published
  tokenizer_config.json next to the Qwen3 vocabulary) and LLaDA2.0's (its template and role
  tokens on the same byte-level vocabulary)."""
  root = tmp_path_factory.mktemp("tokenizers")
  qwen = get_tokenizer("qwen3")
  _save_backend(root / "qwen3", qwen)
  shutil.copy(QWEN3_CONFIG, root / "qwen3" / "tokenizer_config.json")
  _save_backend(root / "llada2", qwen, ["<role>", "</role>", "<|role_end|>"])
  config = {
      "tokenizer_class": "PreTrainedTokenizerFast",
      "eos_token": "<|endoftext|>",
      "pad_token": "<|endoftext|>",
      "chat_template": open(LLADA2_TEMPLATE).read(),
  }
  (root / "llada2" / "tokenizer_config.json").write_text(json.dumps(config))
  return {"qwen3": str(root / "qwen3"), "llada2": str(root / "llada2")}


@functools.lru_cache(maxsize=4)
def _auto_tokenizer(folder):
  return transformers.AutoTokenizer.from_pretrained(folder)


def _reference(folder, messages, **kwargs):
  """(text, ids) of transformers' own apply_chat_template on the folder."""
  tok = _auto_tokenizer(folder)
  dicts = [{"role": r, "content": c} for r, c in messages]
  text = tok.apply_chat_template(dicts, tokenize=False, **kwargs)
  ids = tok.apply_chat_template(dicts, tokenize=True, return_dict=True, **kwargs)["input_ids"]
  return text, list(ids)


def _ours(info, messages, template_args=()):
  side = encode.encode_chat(info, tuple(messages), template_args)
  dicts = [{"role": r, "content": c} for r, c in messages]
  text = encode.render(info.tokenizer, dicts, template_args=dict(template_args))
  return text, side.ids.tolist(), side


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("where", ["builtin", "folder"])
def test_golden_rendering_qwen3(name, where, folders):
  """The built-in `qwen3` template and the official one from a folder (with thinking
  disabled) render every conversation exactly as transformers renders the official one."""
  messages = CONVERSATIONS[name]
  want_text, want_ids = _reference(folders["qwen3"], messages, enable_thinking=False)
  info = encode.tokenizer_info("qwen3" if where == "builtin" else folders["qwen3"])
  args = () if where == "builtin" else THINKING_OFF
  text, ids, _ = _ours(info, messages, args)
  assert text == want_text
  assert ids == want_ids
  # The evaluation prompt carries the same empty think block before the answer.
  prompt = messages[: max(k for k, (r, _) in enumerate(messages) if r == "user") + 1]
  want_prompt, _ = _reference(
      folders["qwen3"], prompt, enable_thinking=False, add_generation_prompt=True
  )
  dicts = [{"role": r, "content": c} for r, c in prompt]
  assert want_prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
  got = encode.render(info.tokenizer, dicts, generation_prompt=True, template_args=dict(args))
  assert got == want_prompt


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_golden_rendering_llada2(name, folders):
  messages = CONVERSATIONS[name]
  want_text, want_ids = _reference(folders["llada2"], messages)
  text, ids, _ = _ours(encode.tokenizer_info(folders["llada2"]), messages)
  assert text == want_text and ids == want_ids


def _expected_mask(tok, segments):
  """Token ids and trained flags from hand-written (text, trained) segments; checks that
  the segments tokenize independently (each boundary is a token boundary)."""
  ids, mask = [], []
  for text, trained in segments:
    part = tok.encode(text, add_special_tokens=False)
    ids += part
    mask += [trained] * len(part)
  assert ids == tok.encode("".join(t for t, _ in segments), add_special_tokens=False)
  return np.array(ids), np.array(mask)


QWEN3_SEGMENTS = [  # multi_turn in the Qwen3 format, thinking disabled
    ("<|im_start|>user\nWrite add.<|im_end|>\n<|im_start|>assistant\n", False),
    ("Sure:\ndef add(a, b):\n    return a + b<|im_end|>\n", "all"),
    ("<|im_start|>user\nAnd sub?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n", False),
    ("def sub(a, b):\n    return a - b<|im_end|>\n", True),
]
LLADA2_SEGMENTS = [  # multi_turn in the LLaDA2.0 format
    (
        "<role>SYSTEM</role>detailed thinking off<|role_end|><role>HUMAN</role>Write add."
        "<|role_end|><role>ASSISTANT</role>",
        False,
    ),
    ("Sure:\ndef add(a, b):\n    return a + b<|role_end|>", "all"),
    ("<role>HUMAN</role>And sub?<|role_end|><role>ASSISTANT</role>", False),
    ("def sub(a, b):\n    return a - b<|role_end|>", True),
]


@pytest.mark.parametrize("train_turns", ["last", "all"])
@pytest.mark.parametrize("where", ["builtin", "qwen3_folder", "llada2_folder"])
def test_trained_tokens_match_hand_derived_masks(train_turns, where, folders):
  """`last` trains the last answer (content, end-of-turn marker and its newline); `all` every
  answer; role headers and Qwen3's empty think block are prompt."""
  spec = {"builtin": "qwen3", "qwen3_folder": folders["qwen3"]}.get(where, folders["llada2"])
  segments = LLADA2_SEGMENTS if where == "llada2_folder" else QWEN3_SEGMENTS
  info = encode.tokenizer_info(spec)
  segments = [(t, flag is True or (flag == "all" and train_turns == "all")) for t, flag in segments]
  want_ids, want_mask = _expected_mask(info.tokenizer, segments)
  side = encode.encode_chat(info, tuple(CONVERSATIONS["multi_turn"]), THINKING_OFF, train_turns)
  np.testing.assert_array_equal(side.ids, want_ids)
  np.testing.assert_array_equal(side.trained, want_mask)
  # The prompt is everything before the last answer, whatever is trained.
  assert side.prompt_length == sum(
      len(info.tokenizer.encode(t, add_special_tokens=False)) for t, _ in segments[:3]
  )


def test_prompt_too_long_is_judged_before_the_last_answer():
  info = encode.tokenizer_info("qwen3")
  messages = (
      ("user", "Tell me a story."),
      ("assistant", "Once upon a time " * 40),
      ("user", "Shorter?"),
      ("assistant", "Once."),
  )
  shapes = features.Shapes(max_len=64, block_size=32)
  for turns in ("last", "all"):
    side = encode.encode_chat(info, messages, train_turns=turns)
    assert side.trained[:64].any() == (turns == "all")  # the first answer starts early
    feats, status = features.build_example(side, info, shapes)
    assert feats is None and status == "prompt_too_long"
  fits = features.Shapes(max_len=256, block_size=32)
  feats, status = features.build_example(encode.encode_chat(info, messages), info, fits)
  assert status == "kept" and info.tokenizer.decode(feats["input_ids"][feats["maskable"]]) == (
      "Once.<|im_end|>\n" + "<|im_end|>" * int(feats["maskable"].sum() - 4)
  )


OTHER_TEMPLATE = (  # the teacher side of a shared vocabulary: other role markers
    "{% for m in messages %}<|im_start|>[{{ m['role'] | upper }}]\n{{ m['content'] }}<|im_end|>"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>[ASSISTANT]\n{% endif %}"
)


@pytest.mark.parametrize("answer", ["assistant", "a", "im_start"])
def test_answer_text_found_in_the_role_header_is_still_paired(answer):
  """The answer's tokens are paired, not the header tokens that contain the same text."""
  student = encode.encode_chat(
      encode.tokenizer_info("qwen3"), (("user", "Say it."), ("assistant", answer))
  )
  teacher = encode.encode_chat(
      encode.tokenizer_info("qwen3", OTHER_TEMPLATE), (("user", "Say it."), ("assistant", answer))
  )
  ps, pt = alignment.position_pairs(student, teacher)
  tok = encode.tokenizer_info("qwen3").tokenizer
  answer_ids = tok.encode(answer, add_special_tokens=False)
  start = student.prompt_length
  np.testing.assert_array_equal(student.ids[start : start + len(answer_ids)], answer_ids)
  assert set(range(start, start + len(answer_ids))) <= set(ps.tolist())
  assert student.trained[ps].all() == teacher.trained[pt].all()
  assert tok.decode(student.ids[ps[-len(answer_ids) :]]) == answer


CHATML = (  # content verbatim
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TRIMMING = (  # content trimmed after a header that ends in a space
    "{% for m in messages %}<|im_start|>{{ m['role'] }}: {{ m['content'] | trim }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant: {% endif %}"
)


def test_pairs_never_hold_template_whitespace():
  """A teacher template that trims the answer " Hello world" after "assistant: ": the
  teacher's content span must not take the header's space for the answer's, which paired
  the student's trained " Hello" with the teacher's prompt token " Hello"."""
  messages = (("user", "Greet me."), ("assistant", " Hello world"))
  student = encode.encode_chat(encode.tokenizer_info("qwen3", CHATML), messages)
  teacher = encode.encode_chat(encode.tokenizer_info("qwen3", TRIMMING), messages)
  ps, pt = alignment.position_pairs(student, teacher)
  np.testing.assert_array_equal(student.trained[ps], teacher.trained[pt])
  tok = encode.tokenizer_info("qwen3").tokenizer
  answer = pt[teacher.trained[pt]]
  assert tok.decode(teacher.ids[answer]) == " world"  # " Hello" differs: "Hello" vs " Hello"
  assert tok.decode(student.ids[ps[student.trained[ps]]]) == " world"


def test_offsets_of_text_that_is_not_nfc_are_refused():
  """U+FB2A decomposes under NFC (3 bytes -> 4): token offsets of the raw text would be
  shifted, so tokenize_with_offsets refuses it; the encoders normalise first."""
  info = encode.tokenizer_info("qwen3")
  text = "shin \ufb2a and more text"
  with pytest.raises(encode.OffsetError, match="not NFC-normalised"):
    encode.tokenize_with_offsets(info, text)
  side = encode.encode_text(info, text)
  normalised = "shin \u05e9\u05c1 and more text".encode("utf-8")
  assert b"".join(info.table[i] for i in side.ids) == normalised
  for i in range(len(side.ids)):
    assert normalised[side.starts[i] : side.ends[i]] == info.table[side.ids[i]]
