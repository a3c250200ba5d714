"""Deterministic, resumable, host-sharded batches over the prepared dataset.

Order: epoch e visits every record once in the permutation drawn from (seed, e), followed
by fill rows (all invalid, no loss) up to a multiple of the global batch (batch_size x
process_count); host p of P takes the rows at positions p, p + P, p + 2P, ... of it, so
hosts are disjoint, together cover the epoch, and each reads the same number of rows per
epoch. An epoch's length, and so the global sequence of rows, does not depend on how many
hosts share it: with the global batch order of `host_data.make_global_batch_fn` every host
count sees the single reader's batches, epochs start on a batch boundary, and a checkpoint's
position converts to another host count in any epoch (`host_data.local_iterator_state`).
The fill rows (`fill_rows` per epoch, fewer than a global batch) are reported when the
iterator is made, never added silently.

The iterator's position is (epoch, offset into this host's share), which `get_state`
returns as a JSON-serialisable dict and `set_state` restores exactly.

With `data_config.sources` the training epoch is a weighted mixture of the sources instead
(`mixture.MixtureOrder`), padded and sharded across hosts the same way. Every row carries the
index of its source (`source`, -1 for a fill row); `source_names` names them.
"""

from __future__ import annotations

import numpy as np

from tide_jax.data import builder as builder_lib, features, mixture
from tide_jax.data.encode import tokenizer_info
from tide_jax.data.options import parse_options

STATE_VERSION = 1
FILL = -1  # a fill slot of an epoch's order: an all-invalid row


class BatchIterator:
  """Yields dicts of numpy arrays with fixed shapes [batch, L] (see features.py for keys).

  Attributes:
    seq_len: L, the student row length.
    teacher_seq_len: Lt (0 without a teacher).
    num_records: rows per epoch (all hosts): the split's examples, or the mixture's rows.
    epoch_rows: num_records plus the fill rows: a multiple of the global batch.
    fill_rows: the fill rows that end every epoch (fewer than a global batch).
    summary: the dataset's preprocessing summary (from its metadata).
    source_names: the name of each source id of the `source` batch key.
  """

  def __init__(
      self,
      source,
      shapes: features.Shapes,
      *,
      batch_size: int,
      seed: int,
      process_index: int,
      process_count: int,
      pad_ids: tuple[int, int],
      repeat: bool = True,
      summary: dict | None = None,
      epoch_order=None,
      source_names: tuple[str, ...] = (),
  ):
    if not 0 <= process_index < process_count:
      raise ValueError(
          f"process_index {process_index} must be in [0, process_count={process_count})"
      )
    if batch_size <= 0:
      raise ValueError(f"batch_size must be positive, not {batch_size}")
    self._source = source
    self._shapes = shapes
    self.batch_size = batch_size
    self.seed = int(seed)
    self.process_index, self.process_count = process_index, process_count
    self._pad_ids = pad_ids
    self._repeat = repeat
    self.seq_len = shapes.max_len
    self.teacher_seq_len = shapes.teacher_max_len
    # epoch_order(epoch) -> the epoch's record indices (a mixture); None: a permutation of all.
    self._epoch_order = epoch_order
    self.num_records = len(epoch_order) if epoch_order is not None else len(source)
    self.summary = summary or {}
    self.source_names = tuple(source_names)
    if self.num_records < process_count:
      raise ValueError(
          f"the split has {self.num_records} examples, fewer than process_count={process_count}; add data or lower eval_fraction"
      )
    global_batch = batch_size * process_count
    self.epoch_rows = -(-self.num_records // global_batch) * global_batch
    self.fill_rows = self.epoch_rows - self.num_records
    self._epoch, self._offset = 0, 0
    self._order = None  # this host's share of the current epoch's order

  def _share(self, epoch: int) -> np.ndarray:
    """This host's rows of `epoch`: record indices, FILL for a fill row."""
    if self._epoch_order is not None:
      order = self._epoch_order(epoch)
    else:
      order = np.random.default_rng([self.seed, epoch]).permutation(self.num_records)
    order = np.concatenate([order, np.full(self.fill_rows, FILL, np.int64)])
    return order[self.process_index :: self.process_count]

  def describe_fill(self, split: str) -> str:
    """One line on the epoch's fill rows, for the run's log."""
    return (
        f"[data] {split}: {self.num_records} rows per epoch + {self.fill_rows} fill row(s) "
        f"(no loss) = {self.epoch_rows}, a multiple of the global batch "
        f"{self.batch_size * self.process_count}: each of the {self.process_count} host(s) "
        f"reads {self.epoch_rows // self.process_count} per epoch"
    )

  def _next_index(self) -> int | None:
    if self._order is None:
      self._order = self._share(self._epoch)
    if self._offset >= len(self._order):
      if not self._repeat:
        return None
      self._epoch, self._offset = self._epoch + 1, 0
      self._order = self._share(self._epoch)
    index = int(self._order[self._offset])
    self._offset += 1
    return index

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    indices = []
    while len(indices) < self.batch_size:
      index = self._next_index()
      if index is None:
        break
      indices.append(index)
    if not indices:
      raise StopIteration
    # A host's share is a whole number of batches, so a single pass ends on a full batch.
    records = [index for index in indices if index != FILL]
    stored = iter(self._source.__getitems__(records) if records else [])
    empty = features.empty_row(self._shapes, *self._pad_ids)
    rows = [
        empty if index == FILL else features.to_row(next(stored), self._shapes, *self._pad_ids)
        for index in indices
    ]
    return {key: np.stack([row[key] for row in rows]) for key in rows[0]}

  def source_counts(self, batch: dict) -> dict[str, int]:
    """Rows of `batch` per source name (fill rows not counted): what a run logs per step."""
    counts = np.bincount(batch["source"][batch["source"] >= 0], minlength=len(self.source_names))
    return {name: int(count) for name, count in zip(self.source_names, counts)}

  def _mixture(self) -> list | None:
    if not isinstance(self._epoch_order, mixture.MixtureOrder):
      return None
    order = self._epoch_order
    return [[n, w, r] for n, w, r in zip(order.sizes, order.weights, order.rows)]

  def get_state(self) -> dict:
    state = {
        "version": STATE_VERSION,
        "epoch": self._epoch,
        "offset": self._offset,
        "seed": self.seed,
        "process_index": self.process_index,
        "process_count": self.process_count,
        "num_records": self.num_records,
    }
    if self._mixture() is not None:
      state["mixture"] = self._mixture()  # [examples, weight, rows per epoch] per source
    return state

  def set_state(self, state: dict) -> None:
    expected = {
        "seed": self.seed,
        "process_index": self.process_index,
        "process_count": self.process_count,
        "num_records": self.num_records,
    }
    if self._mixture() is not None:
      expected["mixture"] = self._mixture()
    for key, value in expected.items():
      if state.get(key) != value:
        raise ValueError(
            f"data iterator state has {key}={state.get(key)!r} but this iterator has {value!r}; "
            "restore with the same data, seed and process layout it was saved with"
        )
    self._epoch, self._offset = int(state["epoch"]), int(state["offset"])
    self._order = None


def make_iterator(
    data_config,
    *,
    split: str,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    workdir_cache: str | None = None,
    repeat: bool = True,
) -> BatchIterator:
  """Returns a batch iterator over `split` ("train"/"eval") of the prepared dataset.

  A single process prepares a missing dataset on first use, and so does every host with
  `prepare_on="every_host"` (host-local cache_dir); the hosts of a multi-host run otherwise
  refuse to start without the dataset the explicit step prepared (`builder.require_prepared`).

  Args:
    data_config: the data section of the config (fields in options.py).
    batch_size: rows per batch on this host.
    seed: shuffling seed (same seed, same batches).
    process_index, process_count: this host's place among the hosts sharing the data.
    workdir_cache: the run's workdir; the dataset goes under it when cache_dir is unset.
    repeat: False for one pass (the last batch is filled with invalid rows).
  """
  if split not in ("train", "eval"):
    raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
  options = parse_options(data_config, workdir_cache)
  if split not in builder_lib.splits_of(options):
    raise ValueError(
        "there is no 'eval' split: set data_config.eval_files or a positive data_config.eval_fraction"
    )
  if process_count > 1 and options.prepare_on == "first_host":
    builder = builder_lib.require_prepared(options)  # prepared by the explicit step
  else:
    builder = builder_lib.prepare(options)
  if split == "train":
    source = mixture.ConcatSource(
        builder.as_data_source(split=name) for name in builder_lib.train_splits(options)
    )
  else:
    source = builder.as_data_source(split=split)
  if len(source) == 0:
    raise ValueError(
        f"the {split!r} split has no examples; see the preprocessing summary and "
        "check train_files/eval_files/eval_fraction"
    )
  s_pad = tokenizer_info(options.tokenizer, options.chat_template).pad_id
  t_pad = (
      tokenizer_info(options.teacher_tokenizer, options.teacher_chat_template).pad_id
      if options.teacher_tokenizer
      else 0
  )
  summary = dict(builder.info.metadata).get("summary", {})
  order = None
  if split == "train" and options.mixture:
    order = mixture.MixtureOrder(source.sizes, [s.weight for s in options.sources], seed)
  iterator = BatchIterator(
      source,
      options.shapes,
      batch_size=batch_size,
      seed=seed,
      process_index=process_index,
      process_count=process_count,
      pad_ids=(s_pad, t_pad),
      repeat=repeat,
      summary=summary,
      epoch_order=order,
      source_names=tuple(s.name for s in options.sources),
  )
  if iterator.fill_rows:
    print(iterator.describe_fill(split), flush=True)
  return iterator
