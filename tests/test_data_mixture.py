"""A weighted mixture of sources in their own layouts: composition, counts, resume, hosts."""

import collections
import json

import ml_collections
import numpy as np
import pytest

from tide_jax.data import corpora
from tide_jax.data.pipeline import make_iterator
from tide_jax.parallel import host_data
from tests import data_layouts

L, BLOCK = 1024, 32
WEIGHTS = {"code": 1.0, "prose": 0.5, "opencoder": 2.0}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("mixture")
  corpora.write_jsonl(str(root / "code.jsonl"), corpora.humaneval_chats()[:12])
  corpora.write_jsonl(str(root / "prose.jsonl"), corpora.stdlib_chats(10))
  data_layouts.write_layout("opc_sft_stage1", root / "opc1.parquet")
  data_layouts.write_layout("opc_sft_stage2", root / "opc2.parquet")
  return root


def config(root, cache, weights=WEIGHTS, **overrides):
  files = {
      "code": [str(root / "code.jsonl")],
      "prose": [str(root / "prose.jsonl")],
      "opencoder": [str(root / "opc1.parquet"), str(root / "opc2.parquet")],
  }
  values = dict(
      format="chat",
      sources=[{"name": n, "files": files[n], "weight": w} for n, w in weights.items()],
      tokenizer="qwen3",
      max_len=L,
      block_size=BLOCK,
      cache_dir=str(cache),
  )
  values.update(overrides)
  return ml_collections.ConfigDict(values)


@pytest.fixture(scope="module")
def cfg(corpus, tmp_path_factory):
  return config(corpus, tmp_path_factory.mktemp("cache"))


def epoch_rows(it, epochs=1):
  """[(source name, row bytes)] of the next `epochs` epochs."""
  out = []
  while len(out) < epochs * it.num_records:
    batch = next(it)
    out += [(it.source_names[s], r.tobytes()) for s, r in zip(batch["source"], batch["input_ids"])]
  return out[: epochs * it.num_records]


def test_epoch_composition_follows_the_weights(cfg):
  it = make_iterator(cfg, split="train", batch_size=4, seed=0)
  assert it.source_names == ("code", "prose", "opencoder")
  assert it.num_records == 12 + 5 + 6  # round(weight * examples) per source
  first, second = epoch_rows(it), epoch_rows(it)
  for rows in (first, second):
    counts = collections.Counter(name for name, _ in rows)
    assert counts == {"code": 12, "prose": 5, "opencoder": 6}
    per_row = collections.Counter(rows)
    # Weight 1: every example once; weight 2: every example twice.
    assert sorted(c for (n, _), c in per_row.items() if n == "code") == [1] * 12
    assert sorted(c for (n, _), c in per_row.items() if n == "opencoder") == [2] * 3
  # Weight 0.5: half of the source per epoch, every example once before any repeats.
  prose = [{r for n, r in rows if n == "prose"} for rows in (first, second)]
  assert len(prose[0]) == len(prose[1]) == 5 and not prose[0] & prose[1]


def test_summary_counts_per_source(cfg):
  summary = make_iterator(cfg, split="train", batch_size=2, seed=0).summary["train"]
  sources = summary["sources"]
  assert list(sources) == ["code", "prose", "opencoder"]
  assert [sources[n]["records"] for n in sources] == [12, 10, 3]
  assert [sources[n]["examples"] for n in sources] == [12, 10, 3]
  assert summary["records"] == 25 and summary["examples"] == 25


def test_batches_name_their_sources(cfg):
  it = make_iterator(cfg, split="train", batch_size=5, seed=1)
  batch = next(it)
  assert batch["source"].shape == (5,) and batch["source"].dtype == np.int32
  counts = it.source_counts(batch)
  assert sum(counts.values()) == 5 and set(counts) == set(WEIGHTS)
  single = make_iterator(cfg, split="train", batch_size=3, seed=1, repeat=False)
  last = list(single)[-1]  # a single pass ends with fill rows: source -1, not counted
  assert (last["source"][~last["valid"].any(axis=1)] == -1).all()
  assert sum(single.source_counts(last).values()) == int(last["valid"].any(axis=1).sum())


def test_mixture_resumes_exactly_and_refuses_other_weights(cfg, corpus, tmp_path):
  it = make_iterator(cfg, split="train", batch_size=4, seed=3)
  for _ in range(9):  # into the second epoch (23 rows each)
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(8)]
  fresh = make_iterator(cfg, split="train", batch_size=4, seed=3)
  fresh.set_state(state)
  for want, got in zip(expected, [next(fresh) for _ in range(8)]):
    for key in want:
      np.testing.assert_array_equal(want[key], got[key])
  other = make_iterator(
      config(corpus, cfg.cache_dir, weights={**WEIGHTS, "prose": 0.8}),
      split="train",
      batch_size=4,
      seed=3,
  )
  with pytest.raises(ValueError, match="restore with the same data"):
    other.set_state(state)


def test_two_hosts_share_the_mixture(cfg):
  single = make_iterator(cfg, split="train", batch_size=1, seed=5)
  everything = epoch_rows(single)
  hosts = [
      make_iterator(cfg, split="train", batch_size=1, seed=5, process_index=p, process_count=2)
      for p in (0, 1)
  ]
  host0 = [next(hosts[0]) for _ in range(12)]
  host1 = [next(hosts[1]) for _ in range(11)]
  # Host p reads rows p, p + 2, ... of the single reader's epoch.
  interleaved = [None] * 23
  interleaved[0::2] = [
      (hosts[0].source_names[b["source"][0]], b["input_ids"][0].tobytes()) for b in host0
  ]
  interleaved[1::2] = [
      (hosts[1].source_names[b["source"][0]], b["input_ids"][0].tobytes()) for b in host1
  ]
  assert interleaved == everything


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"train_files": ["x.jsonl"]}, "sources and data_config.train_files are both set"),
        ({"sources": [{"files": ["a.jsonl"], "weight": 0}]}, "weight must be a positive number"),
        ({"sources": [{"files": ["a.jsonl"], "ratio": 1}]}, "unknown keys \\['ratio'\\]"),
        ({"sources": [{"weight": 1}]}, "must be a mapping with 'files'"),
        (
            {"sources": [{"files": ["a"], "name": "x"}, {"files": ["b"], "name": "x"}]},
            "two sources named 'x'",
        ),
        ({"train_turns": "first"}, "train_turns must be 'last'"),
        ({"template_args": {"enable_thinking": [1]}}, "must be a bool, number or string"),
    ],
)
def test_bad_mixture_settings_are_one_sentence(corpus, tmp_path, overrides, message):
  with pytest.raises(ValueError, match=message):
    make_iterator(config(corpus, tmp_path, **overrides), split="train", batch_size=2, seed=0)


GLOBAL_BATCH = 4


def run_hosts(cfg, hosts, steps, saved=None):
  """`steps` global batches read by `hosts` hosts (resumed from the checkpoint record
  `saved` when given): the global rows as (source, row bytes) in the order the step sees
  them (global row p + P * j is host p's row j, host_data.make_global_batch_fn), and the
  checkpoint record of every host's position after them (host_data.gather_iterator_states)."""
  iterators = [
      make_iterator(
          cfg,
          split="train",
          batch_size=GLOBAL_BATCH // hosts,
          seed=2,
          process_index=p,
          process_count=hosts,
      )
      for p in range(hosts)
  ]
  if saved is not None:
    for p, it in enumerate(iterators):
      it.set_state(host_data.local_iterator_state(saved, p, hosts))
  rows = []
  for _ in range(steps):
    batches = [next(it) for it in iterators]
    for j in range(GLOBAL_BATCH // hosts):
      rows += [(int(b["source"][j]), b["input_ids"][j].tobytes()) for b in batches]
  record = json.loads(json.dumps({"hosts": [it.get_state() for it in iterators]}))
  return rows, record


@pytest.mark.parametrize("order", ["mixture", "plain"])
@pytest.mark.parametrize("before, after", [(2, 4), (4, 2)])
def test_a_resume_on_another_host_count_continues_the_global_sequence_in_any_epoch(
    cfg, corpus, order, before, after, capsys
):
  if order == "plain":  # the plain (seed, epoch) permutation of one source of 25 records
    files = ["code.jsonl", "prose.jsonl", "opc1.parquet", "opc2.parquet"]
    cfg = config(corpus, cfg.cache_dir, weights={}, train_files=[str(corpus / f) for f in files])
  records = make_iterator(cfg, split="train", batch_size=1, seed=2).num_records
  assert records in (23, 25)  # the mixture's 12 + 5 + 6 rows, the plain 12 + 10 + 3: odd
  epoch = -(-records // GLOBAL_BATCH) * GLOBAL_BATCH  # rows per epoch, fill rows included
  steps = epoch // GLOBAL_BATCH  # global batches per epoch
  capsys.readouterr()
  whole, _ = run_hosts(cfg, before, 3 * steps)
  assert f"{records} rows per epoch + {epoch - records} fill row" in capsys.readouterr().out
  # The global sequence does not depend on the host count.
  assert whole == run_hosts(cfg, 1, 3 * steps)[0] == run_hosts(cfg, after, 3 * steps)[0]
  # Each epoch: its rows, then the fill rows (no loss), counted.
  for e in range(3):
    sources = [s for s, _ in whole[e * epoch : (e + 1) * epoch]]
    assert min(sources[:records]) >= 0 and sources[records:] == [-1] * (epoch - records)
  # Interrupted at the end of the first epoch or inside the second, resumed on the other
  # host count, on across the next epoch boundary.
  for done, position in (
      (steps, (0, epoch // before)),
      (steps + 2, (1, 2 * GLOBAL_BATCH // before)),
  ):
    first, saved = run_hosts(cfg, before, done)
    assert {(h["epoch"], h["offset"]) for h in saved["hosts"]} == {position}
    rest, _ = run_hosts(cfg, after, 3 * steps - done, saved)
    assert first + rest == whole
