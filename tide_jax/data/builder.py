"""The TFDS dataset (array_record files, no TensorFlow needed) holding preprocessed examples.

One builder config per data fingerprint, so changing the tokenizer, lengths or input files
prepares a new dataset next to the old one instead of reading stale data. Each training
source is its own split (`train_0`, `train_1`, ...: the mixture reads them side by side);
held-out records of all sources form the `eval` split. The summaries (kept, truncated,
dropped by reason; for "train" in total and per source) are written into the dataset's
metadata.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import tensorflow_datasets as tfds

from tide_jax.data import preprocess, records
from tide_jax.data.options import DataOptions

HASH_BUCKETS = 1_000_000


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
    yield from preprocess.examples(split_items(options, split), options, tally)
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


def prepare(options: DataOptions) -> TideSft:
  """Prepares the dataset if it is not there yet (idempotent) and returns its builder."""
  builder = make_builder(options)
  if not builder.is_prepared():
    print(f"preparing dataset in {builder.data_dir} ...", flush=True)
    builder.download_and_prepare()
    builder = make_builder(options)  # re-read the written info, metadata included
  return builder


def wait_until_prepared(options: DataOptions, poll_s: float = 10.0) -> TideSft:
  """For hosts other than the first: waits for the first host to prepare the shared dataset."""
  deadline = time.time() + options.prepare_timeout_s
  while True:
    builder = make_builder(options)
    if builder.is_prepared():
      return builder
    if time.time() > deadline:
      raise ValueError(
          f"the dataset in {options.cache_dir} was not prepared by the first host within "
          f"{options.prepare_timeout_s:.0f}s; give all hosts a shared data_config.cache_dir, run "
          "`python -m tide_jax.data.prepare` before the job, or set data_config.prepare_on='every_host'"
      )
    time.sleep(poll_s)
