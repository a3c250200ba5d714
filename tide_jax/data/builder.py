"""The TFDS dataset (array_record files, no TensorFlow needed) holding preprocessed examples.

One builder config per data fingerprint, so changing the tokenizer, lengths or input files
prepares a new dataset next to the old one instead of reading stale data. Each training
source is its own split (`train_0`, `train_1`, ...: the mixture reads them side by side);
held-out records of all sources form the `eval` split. With `packing` the training splits
store several examples per row (packing.py); the `eval` split keeps one per row. The
summaries (kept, truncated, dropped by reason, stored rows and their padding; for "train"
in total and per source) are written into the dataset's metadata.

TFDS writes the array_record files with local file writes, so a dataset whose `cache_dir` is
remote (`gs://`) is prepared under a local staging directory and then uploaded, its
`dataset_info.json` last: a dataset that looks prepared is complete. It is read from `gs://`
directly (array_record's reader has a GCS client).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from typing import Callable

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from tide_jax.data import packing, preprocess, records
from tide_jax.data.options import DataOptions

HASH_BUCKETS = 1_000_000
# Written last by an upload, in this order: TFDS sees a dataset as prepared once both exist.
_INFO_FILES = ("features.json", "dataset_info.json")
_COPY_PIECE = 64 << 20  # bytes per read while uploading; bounds the copy's memory


@dataclasses.dataclass(eq=False)
class TideSftConfig(tfds.core.BuilderConfig):
  options: DataOptions | None = None


def _feature_spec(options: DataOptions) -> dict:
  ints = lambda: tfds.features.Tensor(shape=(None,), dtype=np.int32)  # noqa: E731
  bools = lambda: tfds.features.Tensor(shape=(None,), dtype=np.bool_)  # noqa: E731
  spec = {
      "input_ids": ints(),
      "maskable": bools(),
      "source": tfds.features.Tensor(shape=(), dtype=np.int32),
  }
  if options.packing:
    spec["segment_ids"] = ints()
  if options.teacher_tokenizer:
    spec.update(teacher_input_ids=ints(), teacher_maskable=bools())
    if options.alignment == "positions":
      spec.update(pair_student=ints(), pair_teacher=ints())
    else:
      spec.update(
          student_chunk=ints(),
          teacher_chunk=ints(),
          num_chunks=tfds.features.Tensor(shape=(), dtype=np.int32),
      )
  return spec


def train_splits(options: DataOptions) -> tuple[str, ...]:
  """The stored training splits, one per source, in source order."""
  return tuple(f"train_{number}" for number in range(len(options.sources)))


def splits_of(options: DataOptions) -> tuple[str, ...]:
  """The splits a caller may ask for: "train", plus "eval" when eval files or an eval
  fraction are configured."""
  return ("train", "eval") if options.eval_files or options.eval_fraction > 0 else ("train",)


def in_eval(item, fraction: float) -> bool:
  """Deterministic held-out membership by content hash."""
  return (records.record_hash(item) % HASH_BUCKETS) < fraction * HASH_BUCKETS


def split_items(options: DataOptions, split: str):
  """(source id, record or problem) pairs of a stored split ("train_<i>" or "eval").

  eval_files records have source id -1.
  """
  if split == "eval" and options.eval_files:
    for item in records.read_records(
        records.expand_files(list(options.eval_files)), options.format
    ):
      yield -1, item
    return
  holdout = 0.0 if options.eval_files else options.eval_fraction
  numbers = range(len(options.sources)) if split == "eval" else [int(split.split("_")[1])]
  for number in numbers:
    source = options.sources[number]
    for item in records.read_records(records.expand_files(list(source.files)), source.format):
      # Problems belong to the train split's report only, so each is counted once.
      if isinstance(item, records.Problem):
        if split != "eval":
          yield number, item
      elif (split == "eval") == in_eval(item, holdout):
        yield number, item


class TideSft(tfds.core.GeneratorBasedBuilder):
  """Tokenized (and, with a teacher, aligned) SFT examples of variable length."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First version."}
  BUILDER_CONFIGS = []  # configs are made per data fingerprint

  @tfds.core.utils.classproperty
  @classmethod
  def url_infos(cls):
    # Nothing is downloaded. TFDS would otherwise look for a checksums file next to this
    # module through `importlib_resources`, a package it does not install.
    return None

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="TIDE SFT examples: student (and teacher) token ids, trained-token masks, alignments.",
        features=tfds.features.FeaturesDict(_feature_spec(self.builder_config.options)),
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    options = self.builder_config.options
    splits = train_splits(options) + (("eval",) if "eval" in splits_of(options) else ())
    return {split: self._generate_examples(split) for split in splits}

  def _generate_examples(self, split):
    options = self.builder_config.options
    tally = preprocess.Tally()
    stored = preprocess.examples(split_items(options, split), options, tally)
    if options.packing:  # training rows are packed; held-out rows stay one example each
      stored = (
          packing.one_per_row(stored)
          if split == "eval"
          else packing.pack_examples(stored, options.max_len, options.block_size)
      )
    for key, features in stored:
      tally.count_row(len(features["input_ids"]), options.max_len)
      yield key, features
    summary = self.info.metadata.setdefault("summary", {})
    if split == "eval":
      summary["eval"] = tally.as_dict()
      print(tally.report("eval"), flush=True)
      if not tally.examples:
        raise ValueError(
            "the 'eval' split got no examples (see the summary above); add data, "
            "fix the inputs, or change eval_fraction/eval_files"
        )
      return
    source = options.sources[int(split.split("_")[1])]
    print(tally.report(f"train, source {source.name!r}"), flush=True)
    if not tally.examples:
      raise ValueError(
          f"the training source {source.name!r} got no examples (see the summary above); "
          "add data or fix its inputs"
      )
    # "train": the totals over the sources, and each source's own counts.
    per_source = dict(summary.get("train", {}).get("sources", {}))
    per_source[source.name] = tally.as_dict()
    total = preprocess.Tally()
    for counts in per_source.values():
      total.add(preprocess.Tally.from_dict(counts))
    summary["train"] = {**total.as_dict(), "sources": per_source}


def make_builder(options: DataOptions) -> TideSft:
  config = TideSftConfig(name=f"d{options.fingerprint()}", version="1.0.0", options=options)
  return TideSft(config=config, data_dir=options.cache_dir, file_format="array_record")


def is_remote(path: str) -> bool:
  """Whether `path` names a remote filesystem (`scheme://...`) rather than local disk."""
  return "://" in path


def upload(local_dir: str, remote_dir: str, say: Callable[[str], None] = print) -> None:
  """Copies a prepared dataset's files to `remote_dir`; last the two TFDS looks for.

  A file already there with the same size is not copied again (a re-run after an
  interrupted upload copies only what is missing).
  """
  target = epath.Path(remote_dir)
  target.mkdir(parents=True, exist_ok=True)
  rank = lambda name: (_INFO_FILES.index(name) + 1 if name in _INFO_FILES else 0, name)  # noqa: E731
  for name in sorted(os.listdir(local_dir), key=rank):
    local = os.path.join(local_dir, name)
    if not os.path.isfile(local):
      continue
    remote = target / name
    size = os.path.getsize(local)
    if name not in _INFO_FILES and remote.exists() and remote.stat().length == size:
      continue
    say(f"uploading {name} ({size / 1e6:.1f} MB) -> {remote}")
    with open(local, "rb") as reader, remote.open("wb") as writer:
      shutil.copyfileobj(reader, writer, _COPY_PIECE)


def prepare(options: DataOptions, stage_root: str | None = None) -> TideSft:
  """Prepares the dataset if it is not there yet (idempotent) and returns its builder.

  Args:
    options: the data options; the dataset goes under `options.cache_dir`.
    stage_root: for a remote `cache_dir`, the local directory the dataset is prepared in
      before the upload (default: a temporary directory, removed afterwards). A staged
      dataset that is complete is uploaded without being prepared again.
  """
  builder = make_builder(options)
  if builder.is_prepared():
    return builder
  if not is_remote(options.cache_dir):
    print(f"preparing dataset in {builder.data_dir} ...", flush=True)
    builder.download_and_prepare()
    return make_builder(options)  # re-read the written info, metadata included
  temporary = None
  if stage_root is None:
    temporary = stage_root = tempfile.mkdtemp(prefix="tide_data_")
  try:
    # The same fingerprint (cache_dir is not part of it), so the same folder names.
    staged = make_builder(dataclasses.replace(options, cache_dir=stage_root))
    if not staged.is_prepared():
      print(
          f"preparing dataset in {staged.data_dir} (to upload to {builder.data_dir}) ...",
          flush=True,
      )
      staged.download_and_prepare()
    upload(staged.data_dir, builder.data_dir)
  finally:
    if temporary is not None:
      shutil.rmtree(temporary, ignore_errors=True)
  return make_builder(options)


def require_prepared(options: DataOptions) -> TideSft:
  """The builder of a dataset that must already be prepared (a multi-host run's hosts).

  Several hosts preparing on first use would all write the same dataset at once, so a
  multi-host run reads only what the explicit step (`python -m tide_jax.data.prepare`,
  run by launch/prepare.sh on one host) prepared.
  """
  builder = make_builder(options)
  if not builder.is_prepared():
    raise ValueError(
        f"the dataset {builder.data_dir} is not prepared, and the hosts of a multi-host run "
        "do not prepare it (they would all write it at once): prepare it once, on one host, "
        "with `bash launch/prepare.sh CONFIG WORKDIR [overrides]` (or `python -m "
        "tide_jax.data.prepare --config=CONFIG --workdir=WORKDIR`) and the training run's "
        "config, overrides and input files (files over 4 MiB count with their modification times)"
    )
  return builder
