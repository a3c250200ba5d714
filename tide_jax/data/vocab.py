"""`data.restrict_vocab`: train on the token ids the run's corpus uses, renumbered.

A model trained from scratch on a small corpus needs only the ids that occur in it; the
others are rows of the embedding and the output projection that no example ever touches
(151,936 rows for Qwen3, of which a few MB of Python source use about 15,000). With
`data.restrict_vocab = True` the run's config is resolved once, before anything else, by
`restricted_config(config, workdir)`:

- for the student's tokenizer and the teacher's (one table when they are the same), the
  table of kept ids is built from every text the run reads (`data.train_files` or
  `data.sources`, `data.eval_files`, `eval.bpb_files` and `data.vocab_files`), plus every
  single-byte token, every added token and the configured mask ids; it is stored as a
  restricted tokenizer folder under `<data cache>/vocab/` (`restricted.py`), named by a
  fingerprint of the tokenizer, the files' identities and the extra ids, so that every
  run over the same corpus shares it;
- `data.tokenizer` / `data.teacher_tokenizer` (and `teacher.tokenizer`) name those
  folders, `model.vocab_size` becomes the student's kept ids, and the mask ids
  (`objective.mask_token_id`, `teacher.mask_token_id`) and `distill.shared_vocab` are
  translated to restricted ids.

Everything downstream (preparation, alignments on bytes, batches, bits per byte, sampling,
export) reads the restricted tokenizer like any other. Resolution is idempotent: a config
whose tokenizer already is a restricted folder is returned as it is.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import unicodedata
import uuid

import numpy as np
from ml_collections import config_dict

from tide_jax.data import encode, records, restricted, templates, tokenizers
from tide_jax.data.options import file_identity

VOCAB_DIR = "vocab"


def corpus_patterns(config) -> list[tuple[str, list[str]]]:
  """(format, globs) of every text a run reads: training inputs, eval split, bits per byte,
  and `data.vocab_files`."""
  d = config.data
  out = [(d.format, list(d.train_files or []))]
  for source in d.get("sources") or []:
    source = source.to_dict() if hasattr(source, "to_dict") else dict(source)
    out.append((source.get("format") or d.format, list(source["files"])))
  out.append((d.format, list(d.eval_files or [])))
  if "eval" in config:
    out.append(("text", list(config.eval.get("bpb_files") or [])))
  out.append(("text", list(d.get("vocab_files") or [])))
  return [(fmt, globs) for fmt, globs in out if globs]


def corpus_token_ids(tokenizer, patterns: list[tuple[str, list[str]]]) -> tuple[np.ndarray, dict]:
  """Sorted unique ids of the base tokenizer over the corpus, and counts of what was read.

  Text files are tokenized whole (in `encode.text_windows`, which gives the whole text's
  tokens); chat records as rendered by the tokenizer's own template. Unreadable records
  are counted, not fatal: the data preparation reports them again with their location.
  """
  seen = np.zeros(len(tokenizer), bool)
  counts = {"files": 0, "records": 0, "tokens": 0, "problems": 0}
  for fmt, globs in patterns:
    files = records.expand_files(globs)
    counts["files"] += len(files)
    for item in records.read_records(files, fmt):
      if isinstance(item, records.Problem):
        counts["problems"] += 1
        continue
      counts["records"] += 1
      if isinstance(item, records.TextRecord):
        texts = encode.text_windows(item.text)
      else:
        messages = [
            {"role": r, "content": unicodedata.normalize("NFC", c)} for r, c in item.messages
        ]
        try:
          texts = [templates.render(tokenizer, messages)]
        except templates.TemplateError:
          texts = [m["content"] for m in messages]
      for text in texts:
        ids = np.asarray(tokenizer.encode(text, add_special_tokens=False), np.int64)
        seen[ids] = True
        counts["tokens"] += int(ids.size)
  return np.flatnonzero(seen), counts


def kept_ids(tokenizer, corpus_ids: np.ndarray, extra_ids) -> np.ndarray:
  """The corpus's ids plus every single-byte token (what any other text is spelled with),
  every added token, and `extra_ids` (mask slots, which may lie past the tokenizer)."""
  table = tokenizers.token_bytes(tokenizer)
  added = set(tokenizers.added_token_ids(tokenizer))
  single = [i for i, b in enumerate(table) if len(b) == 1 and i not in added]
  keep = set(corpus_ids.tolist()) | set(single) | added | {int(i) for i in extra_ids}
  return np.asarray(sorted(keep), np.int64)


def _fingerprint(spec: str, patterns, extra_ids) -> str:
  files = [
      [fmt, [file_identity(p) for p in records.expand_files(globs)]] for fmt, globs in patterns
  ]
  blob = [restricted.TABLE_VERSION, spec, files, sorted(int(i) for i in extra_ids)]
  return hashlib.sha1(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:12]


def restricted_tokenizer_dir(spec: str, patterns, extra_ids, cache_dir: str) -> str:
  """The folder of `spec` restricted to the corpus of `patterns`, built once (idempotent;
  concurrent builders each write a private folder and the first rename wins)."""
  if restricted.is_restricted_folder(spec):
    raise ValueError(f"tokenizer {spec!r} is already restricted; restrict its base tokenizer")
  name = os.path.basename(os.path.normpath(spec)) if os.path.isdir(spec) else spec
  target = os.path.join(cache_dir, VOCAB_DIR, f"{name}-{_fingerprint(spec, patterns, extra_ids)}")
  if restricted.is_restricted_folder(target):
    return target
  base = tokenizers.get_tokenizer(spec)
  corpus, counts = corpus_token_ids(base, patterns)
  kept = kept_ids(base, corpus, extra_ids)
  partial = f"{target}.partial-{uuid.uuid4().hex[:8]}"
  os.makedirs(partial)
  base.save_pretrained(partial)
  info = {
      "name": f"{name} restricted",
      "base": spec,
      "base_ids": len(base),
      "corpus_ids": int(corpus.size),
      "extra_ids": sorted(int(i) for i in extra_ids),
      **counts,
  }
  restricted.write_table(partial, kept, info)
  try:
    os.rename(partial, target)
  except OSError:  # another process finished first: its folder is identical
    shutil.rmtree(partial, ignore_errors=True)
  return target


def _mask_ids(config, side: str) -> set[int]:
  if side == "student":
    return {int(config.objective.mask_token_id)}
  if "teacher" in config and int(config.teacher.mask_token_id) >= 0:
    return {int(config.teacher.mask_token_id)}
  raise ValueError(
      "data.restrict_vocab=True with a teacher tokenizer needs teacher.mask_token_id (the "
      "teacher's mask id in its full vocabulary) to keep it in the restricted vocabulary"
  )


def restricted_config(config, workdir: str | None) -> config_dict.ConfigDict:
  """`config` with `data.restrict_vocab` applied (see the module docstring); unchanged when
  it is off or already applied.

  Args:
    config: a run config.
    workdir: the run's workdir (the vocabulary goes to `data.cache_dir`, else to
      `<workdir>/data_cache`).
  """
  d = config.data
  if not d.get("restrict_vocab", False) or restricted.is_restricted_folder(d.tokenizer):
    return config
  if config.model.get("init_from", ""):
    raise ValueError(
        "data.restrict_vocab=True trains on the corpus's token ids from scratch, but "
        "model.init_from names a full-vocabulary checkpoint; unset one of them"
    )
  cache_dir = d.cache_dir or (
      os.path.join(os.path.abspath(workdir), "data_cache") if workdir else ""
  )
  if not cache_dir:
    raise ValueError(
        "data.restrict_vocab=True needs data.cache_dir or a workdir to store the vocabulary in"
    )
  patterns = corpus_patterns(config)
  teacher_spec = d.get("teacher_tokenizer") or ""
  student_extra = _mask_ids(config, "student")
  teacher_extra = _mask_ids(config, "teacher") if teacher_spec else set()
  if teacher_spec == d.tokenizer:  # one table, so that shared ids stay shared
    student_extra = teacher_extra = student_extra | teacher_extra
  out = config_dict.ConfigDict(config.copy_and_resolve_references())
  out.unlock()
  student_dir = restricted_tokenizer_dir(d.tokenizer, patterns, student_extra, cache_dir)
  student = tokenizers.get_tokenizer(student_dir)
  out.data.tokenizer = student_dir
  out.model.vocab_size = len(student)
  out.objective.mask_token_id = student.to_restricted(config.objective.mask_token_id)
  print(_summary("student", d.tokenizer, student), flush=True)
  if teacher_spec:
    teacher_dir = restricted_tokenizer_dir(teacher_spec, patterns, teacher_extra, cache_dir)
    teacher = tokenizers.get_tokenizer(teacher_dir)
    out.data.teacher_tokenizer = teacher_dir
    if teacher_dir != student_dir:
      print(_summary("teacher", teacher_spec, teacher), flush=True)
    if "teacher" in out:
      out.teacher.tokenizer = teacher_dir
      out.teacher.mask_token_id = teacher.to_restricted(config.teacher.mask_token_id)
    shared = out.get("distill", {}).get("shared_vocab") if "distill" in out else None
    if shared:
      if teacher_dir != student_dir:
        raise ValueError(
            "distill.shared_vocab with data.restrict_vocab needs the same tokenizer on both "
            "sides; unset shared_vocab or data.restrict_vocab"
        )
      out.distill.shared_vocab = int(np.sum(student.kept < int(shared)))
  if config.is_locked:
    out.lock()
  return out


def _summary(side: str, spec: str, tok: restricted.RestrictedTokenizer) -> str:
  return (
      f"restricted vocabulary ({side}, {spec}): {tok.info['base_ids']:,} -> {len(tok):,} ids "
      f"({tok.info['corpus_ids']:,} in {tok.info['files']} files of the corpus)"
  )
