"""The data section of a run's configuration, read once, checked, and fingerprinted.

Fields of `data_config` (an ml_collections ConfigDict or any mapping; the run configs get
every field from configs/common.py, the defaults below serve bare data configs):

| field                 | default        | meaning                                                        |
|-----------------------|----------------|----------------------------------------------------------------|
| format                | "chat"         | "chat" (JSON Lines / Parquet records) or "text" (plain files)   |
| train_files           | required*      | list of globs; `pystdlib://` = the Python standard library      |
| sources               | []             | *instead of train_files: a weighted mixture, a list of {files, format, weight, name} (see below) |
| eval_files            | []             | globs; when empty, `eval_fraction` of records is held out       |
| eval_fraction         | 0.0            | share of records (by content hash) held out for "eval"         |
| tokenizer             | "qwen3"        | student tokenizer spec (see tokenizers.get_tokenizer)          |
| restrict_vocab        | False          | train on the ids the corpus uses: resolved by `vocab.restricted_config` into restricted tokenizer folders (see vocab.py) |
| vocab_files           | []             | more globs whose tokens the restricted vocabulary keeps (e.g. a test split read only by bits per byte) |
| chat_template         | None           | Jinja template overriding the student tokenizer's              |
| template_args         | {}             | extra student chat template variables, e.g. {"enable_thinking": False} |
| train_turns           | "last"         | "last": train the last assistant answer; "all": every answer    |
| max_len               | 1024           | L, student row length; a multiple of block_size                |
| block_size            | 32             | BD3LM block; sequences are EOS-padded to a multiple of it      |
| packing               | False          | training rows hold several examples, each from a block boundary, with segment ids and positions (see packing.py); not with a teacher |
| teacher_tokenizer     | None           | set to add the teacher side and an alignment                   |
| teacher_chat_template | None           | Jinja template overriding the teacher tokenizer's              |
| teacher_template_args | {}             | extra teacher chat template variables                          |
| teacher_max_len       | max_len        | Lt, teacher row length; a multiple of teacher_block_size       |
| teacher_block_size    | block_size     | block multiple the teacher sequence is EOS-padded to           |
| alignment             | "chunks"       | "chunks" (cross tokenizer) or "positions" (shared vocabulary)  |
| max_pairs             | max_len        | P, position pairs kept per example                             |
| cache_dir             | ""             | where the TFDS dataset is prepared ("" = <workdir>/data_cache) |
| strict                | False          | raise on the first bad record instead of counting it           |
| num_workers           | 0              | preprocessing processes: 0 = auto (one per core from 20k records), 1 = in-process, n = pool of n |
| max_records           | 0              | read at most this many records per source and split (0 = all) |
| prepare_on            | "first_host"   | who prepares a missing dataset: "first_host" (the explicit step on one host, `python -m tide_jax.data.prepare`; a multi-host run refuses to start without it, a single process prepares on first use) or "every_host" (each host on first use, into a host-local cache_dir) |

A source of `sources`: `files` (globs, required), `format` (default: the `format` field),
`weight` (default 1.0: how many times each of its examples is used per epoch, on average;
1.0 for every source is plain concatenation) and `name` (default "source_<i>", the label of
its counts in summaries and batches).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os

from tide_jax.data import restricted
from tide_jax.data.encode import TRAIN_TURNS
from tide_jax.data.features import Shapes
from tide_jax.data.records import expand_files

FORMATS = ("chat", "text")
# Input files up to this size are identified by a hash of their whole content; larger ones
# by their modification time and a hash of their first and last HASH_EDGE_BYTES.
HASH_WHOLE_BYTES = 4 << 20
HASH_EDGE_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class Source:
  """One input of the training mixture."""

  name: str
  files: tuple[str, ...]
  format: str
  weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class DataOptions:
  format: str
  train_files: tuple[str, ...]
  eval_files: tuple[str, ...]
  eval_fraction: float
  tokenizer: str
  chat_template: str | None
  max_len: int
  block_size: int
  teacher_tokenizer: str | None
  teacher_chat_template: str | None
  teacher_max_len: int
  teacher_block_size: int
  alignment: str
  max_pairs: int
  cache_dir: str
  strict: bool
  num_workers: int
  max_records: int
  prepare_on: str = "first_host"
  train_turns: str = "last"
  template_args: tuple = ()  # sorted (name, value) pairs
  teacher_template_args: tuple = ()
  # The training inputs: `sources` as configured, or one source of train_files / format.
  sources: tuple[Source, ...] = ()
  mixture: bool = False  # `sources` was configured (batches follow the weighted mixture)
  packing: bool = False  # training splits store several examples per row (packing.py)

  @property
  def shapes(self) -> Shapes:
    if not self.teacher_tokenizer:
      return Shapes(self.max_len, self.block_size, packing=self.packing)
    return Shapes(
        self.max_len,
        self.block_size,
        self.teacher_max_len,
        self.teacher_block_size,
        self.alignment,
        self.max_pairs,
    )

  def fingerprint(self) -> str:
    """A short hash of everything that changes the prepared data, the input files included.

    A file is identified by its name and size and, up to HASH_WHOLE_BYTES, a hash of its
    content; a larger file by its modification time and a hash of its first and last
    HASH_EDGE_BYTES. So an edit that keeps the size prepares a new dataset too.
    """
    content = dataclasses.asdict(self)
    for key in ("cache_dir", "strict", "num_workers", "prepare_on"):
      content.pop(key)
    if not self.packing:  # unpacked datasets keep the names they had before the field existed
      content.pop("packing")
    files = {"eval_files": [file_identity(p) for p in expand_files(list(self.eval_files))]}
    for number, source in enumerate(self.sources):
      files[f"source_{number}"] = [file_identity(p) for p in expand_files(list(source.files))]
    blob = json.dumps([content, files], sort_keys=True, default=str).encode()
    return hashlib.sha1(blob).hexdigest()[:12]


def file_identity(path: str) -> list:
  """[name, size, content hash] for a small file; [name, size, mtime, edge hash] for a large one."""
  size = os.path.getsize(path)
  digest = hashlib.sha1()
  with open(path, "rb") as f:
    if size <= HASH_WHOLE_BYTES:
      digest.update(f.read())
      return [os.path.basename(path), size, digest.hexdigest()]
    digest.update(f.read(HASH_EDGE_BYTES))
    f.seek(size - HASH_EDGE_BYTES)
    digest.update(f.read(HASH_EDGE_BYTES))
  return [os.path.basename(path), size, os.stat(path).st_mtime_ns, digest.hexdigest()]


def _get(config, name, default):
  value = config.get(name, default) if hasattr(config, "get") else getattr(config, name, default)
  return default if value is None else value


def _files(value) -> tuple[str, ...]:
  if isinstance(value, str):
    return (value,) if value else ()
  return tuple(value or ())


def _template_args(value, field: str) -> tuple:
  """A mapping of template variables as sorted (name, value) pairs (hashable, fingerprintable)."""
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  if not isinstance(value, dict):
    raise ValueError(
        f"data_config.{field} must be a mapping of template variables, e.g. "
        f"{{'enable_thinking': False}}, not {value!r}"
    )
  for key, item in value.items():
    if not isinstance(item, (bool, int, float, str)):
      raise ValueError(
          f"data_config.{field}[{key!r}] must be a bool, number or string, not {item!r}"
      )
  return tuple(sorted(value.items()))


def _sources(config, fmt: str, train_files: tuple[str, ...]) -> tuple[tuple[Source, ...], bool]:
  """The configured mixture, or one source made of train_files."""
  configured = list(_get(config, "sources", []) or [])
  if not configured:
    return (Source("train", train_files, fmt),), False
  if train_files:
    raise ValueError(
        "data_config.sources and data_config.train_files are both set; put every input "
        "into sources (each {files, format, weight}) and leave train_files empty"
    )
  sources = []
  for number, entry in enumerate(configured):
    if hasattr(entry, "to_dict"):
      entry = entry.to_dict()
    if not isinstance(entry, dict) or not _files(entry.get("files")):
      raise ValueError(
          f"data_config.sources[{number}] must be a mapping with 'files' (a list of globs) and "
          f"optionally 'format', 'weight' and 'name', not {entry!r}"
      )
    unknown = set(entry) - {"files", "format", "weight", "name"}
    if unknown:
      raise ValueError(
          f"data_config.sources[{number}] has unknown keys {sorted(unknown)}; use files, "
          "format, weight and name"
      )
    sources.append(
        Source(
            name=str(entry.get("name") or f"source_{number}"),
            files=_files(entry["files"]),
            format=str(entry.get("format") or fmt),
            weight=float(entry.get("weight", 1.0)),
        )
    )
  return tuple(sources), True


def parse_options(config, workdir_cache: str | None = None) -> DataOptions:
  """Reads and checks `data_config`; every problem is one ValueError naming the field and fix."""
  max_len = int(_get(config, "max_len", 1024))
  block = int(_get(config, "block_size", 32))
  if _get(config, "restrict_vocab", False) and not restricted.is_restricted_folder(
      str(_get(config, "tokenizer", "qwen3"))
  ):
    raise ValueError(
        "data_config.restrict_vocab is set but data_config.tokenizer is not a restricted "
        "tokenizer yet; resolve the run config first with "
        "tide_jax.data.vocab.restricted_config(config, workdir) (tide_jax.main does)"
    )
  teacher = _get(config, "teacher_tokenizer", None) or None
  fmt = str(_get(config, "format", "chat"))
  train_files = _files(_get(config, "train_files", ()))
  sources, mixture = _sources(config, fmt, train_files)
  options = DataOptions(
      format=fmt,
      train_files=train_files,
      eval_files=_files(_get(config, "eval_files", ())),
      eval_fraction=float(_get(config, "eval_fraction", 0.0)),
      tokenizer=str(_get(config, "tokenizer", "qwen3")),
      chat_template=_get(config, "chat_template", None) or None,
      max_len=max_len,
      block_size=block,
      teacher_tokenizer=teacher,
      teacher_chat_template=_get(config, "teacher_chat_template", None) or None,
      teacher_max_len=int(_get(config, "teacher_max_len", 0) or max_len),
      teacher_block_size=int(_get(config, "teacher_block_size", 0) or block),
      alignment=str(_get(config, "alignment", "chunks")) if teacher else "",
      max_pairs=int(_get(config, "max_pairs", 0) or max_len),
      cache_dir=str(
          _get(config, "cache_dir", "")
          or (os.path.join(workdir_cache, "data_cache") if workdir_cache else "")
      ),
      strict=bool(_get(config, "strict", False)),
      num_workers=int(_get(config, "num_workers", 0)),
      max_records=int(_get(config, "max_records", 0)),
      prepare_on=str(_get(config, "prepare_on", "first_host")),
      train_turns=str(_get(config, "train_turns", "last")),
      template_args=_template_args(_get(config, "template_args", {}), "template_args"),
      teacher_template_args=_template_args(
          _get(config, "teacher_template_args", {}), "teacher_template_args"
      ),
      sources=sources,
      mixture=mixture,
      packing=bool(_get(config, "packing", False)),
  )
  _check(options)
  return options


def _check(o: DataOptions) -> None:
  if o.format not in FORMATS:
    raise ValueError(f"data_config.format must be 'chat' or 'text', not {o.format!r}")
  if not any(source.files for source in o.sources):
    raise ValueError(
        "data_config.train_files is empty; give a list of file globs (e.g. "
        "['pystdlib://json/*.py']) or a mixture in data_config.sources"
    )
  names = [source.name for source in o.sources]
  for number, source in enumerate(o.sources):
    if source.format not in FORMATS:
      raise ValueError(
          f"data_config.sources[{number}].format must be 'chat' or 'text', not {source.format!r}"
      )
    if not (math.isfinite(source.weight) and source.weight > 0):
      raise ValueError(
          f"data_config.sources[{number}].weight must be a positive number, not {source.weight}"
      )
    if names.count(source.name) > 1:
      raise ValueError(f"data_config.sources has two sources named {source.name!r}; rename one")
  if o.train_turns not in TRAIN_TURNS:
    raise ValueError(
        f"data_config.train_turns must be 'last' (the last answer) or 'all' (every answer), "
        f"not {o.train_turns!r}"
    )
  if o.block_size <= 0 or o.max_len <= 0 or o.max_len % o.block_size:
    raise ValueError(
        f"data_config.max_len ({o.max_len}) must be a positive multiple of block_size ({o.block_size})"
    )
  if not 0.0 <= o.eval_fraction < 1.0:
    raise ValueError(f"data_config.eval_fraction must be in [0, 1), not {o.eval_fraction}")
  if not o.cache_dir:
    raise ValueError(
        "data_config.cache_dir is empty and no workdir was given; set data_config.cache_dir, "
        "or give the run's workdir (--workdir=DIR, or `launch/prepare.sh CONFIG WORKDIR`)"
    )
  if o.prepare_on not in ("first_host", "every_host"):
    raise ValueError(
        f"data_config.prepare_on must be 'first_host' or 'every_host', not {o.prepare_on!r}"
    )
  if o.prepare_on == "every_host" and "://" in o.cache_dir:
    raise ValueError(
        f"data_config.prepare_on='every_host' has every host write its own dataset, but "
        f"cache_dir {o.cache_dir} is shared by the hosts; use a host-local cache_dir, or "
        "prepare_on='first_host' and the prepare step"
    )
  if o.packing and o.teacher_tokenizer:
    raise ValueError(
        "data_config.packing=True cannot be combined with a teacher (data_config."
        "teacher_tokenizer is set): packed rows carry no teacher side; turn packing off to distill"
    )
  if o.teacher_tokenizer:
    if o.teacher_max_len % o.teacher_block_size:
      raise ValueError(
          f"data_config.teacher_max_len ({o.teacher_max_len}) must be a multiple of teacher_block_size ({o.teacher_block_size})"
      )
    if o.alignment not in ("chunks", "positions"):
      raise ValueError(
          f"data_config.alignment must be 'chunks' or 'positions', not {o.alignment!r}"
      )
