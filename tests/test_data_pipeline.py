"""Plain-text pipeline with the real Qwen3 tokenizer: shapes, masks, determinism, resume, host sharding."""

import json
import os
import re
import sysconfig

import ml_collections
import numpy as np
import pytest

from tide_jax.data.pipeline import make_iterator
from tide_jax.data.records import DataError, expand_files
from tide_jax.data.tokenizers import get_tokenizer

L, BLOCK = 64, 16
STDLIB_FILES = [
    "json/encoder.py",
    "json/decoder.py",
    "json/scanner.py",
    "json/tool.py",
    "textwrap.py",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """Real text files plus an empty one and one that is not UTF-8."""
  root = tmp_path_factory.mktemp("corpus")
  stdlib = sysconfig.get_paths()["stdlib"]
  for name in STDLIB_FILES:
    with open(os.path.join(stdlib, name), encoding="utf-8") as f:
      text = f.read()[:3000]
    (root / name.replace("/", "_")).write_text(text, encoding="utf-8")
  (root / "empty.txt").write_bytes(b"")
  (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
  return root


def config(corpus_dir, cache_dir, **overrides):
  values = dict(
      format="text",
      train_files=[str(corpus_dir / "*")],
      tokenizer="qwen3",
      max_len=L,
      block_size=BLOCK,
      cache_dir=str(cache_dir),
      eval_fraction=0.0,
      strict=False,
  )
  values.update(overrides)
  return ml_collections.ConfigDict(values)


@pytest.fixture(scope="module")
def cfg(corpus, tmp_path_factory):
  return config(corpus, tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def qwen3():
  return get_tokenizer("qwen3")


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_batch_shapes_and_masks(cfg, qwen3):
  it = make_iterator(cfg, split="train", batch_size=3, seed=0)
  assert it.seq_len == L
  for batch in take(it, 6):
    assert set(batch) == {"input_ids", "maskable", "valid", "source"}
    assert batch["source"].shape == (3,) and (batch["source"] == 0).all()  # the one source
    assert batch["input_ids"].shape == (3, L) and batch["input_ids"].dtype == np.int32
    assert batch["maskable"].dtype == bool and batch["valid"].dtype == bool
    for ids, maskable, valid in zip(batch["input_ids"], batch["maskable"], batch["valid"]):
      n = int(valid.sum())
      assert valid[:n].all() and n % BLOCK == 0 and n > 0  # a prefix, a block multiple
      assert (maskable == valid).all()  # plain text: everything up to the EOS padding is trained
      assert (ids[n:] == qwen3.pad_token_id).all()
      content = ids[:n]
      # EOS only appears as padding at the end of the content.
      eos = np.flatnonzero(content == qwen3.eos_token_id)
      assert eos.size == 0 or (eos == np.arange(n - eos.size, n)).all()


def test_every_token_of_every_file_is_kept(cfg, corpus, qwen3):
  it = make_iterator(cfg, split="train", batch_size=4, seed=1, repeat=False)
  pieces = []
  for batch in it:
    for ids, valid in zip(batch["input_ids"], batch["valid"]):
      content = ids[valid]
      pieces.append(content[content != qwen3.eos_token_id])
  assert len(pieces) >= it.num_records  # the last batch is filled with invalid rows
  decoded = [qwen3.decode(p) for p in pieces if p.size]
  assert len(decoded) == it.num_records
  texts = [open(p, encoding="utf-8").read() for p in expand_files([str(corpus / "*.py")])]
  assert sum(len(qwen3.encode(t, add_special_tokens=False)) for t in texts) == sum(
      p.size for p in pieces
  )
  for piece in decoded:
    assert any(piece in text for text in texts)


def test_bad_files_are_counted_and_named(cfg):
  it = make_iterator(cfg, split="train", batch_size=2, seed=0)
  summary = it.summary["train"]
  assert summary["dropped"] == {"empty_file": 1, "invalid_utf8": 1}
  assert summary["dropped_examples"]["empty_file"][0].endswith("empty.txt:1")
  assert summary["dropped_examples"]["invalid_utf8"][0].endswith("latin1.txt:1")
  assert summary["records"] == len(STDLIB_FILES)


def test_strict_mode_names_file_and_line(corpus, tmp_path):
  with pytest.raises(DataError, match=r"empty\.txt:1: the file is empty"):
    make_iterator(config(corpus, tmp_path, strict=True), split="train", batch_size=2, seed=0)


def test_same_seed_same_batches_and_other_seed_differs(cfg):
  a = take(make_iterator(cfg, split="train", batch_size=4, seed=7), 5)
  b = take(make_iterator(cfg, split="train", batch_size=4, seed=7), 5)
  c = take(make_iterator(cfg, split="train", batch_size=4, seed=8), 5)
  for x, y in zip(a, b):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  assert any((x["input_ids"] != z["input_ids"]).any() for x, z in zip(a, c))


def test_restore_continues_exactly_across_epochs(cfg):
  it = make_iterator(cfg, split="train", batch_size=5, seed=3)
  epoch_batches = -(-it.num_records // 5)
  take(it, epoch_batches + 1)  # into the second epoch
  state = json.loads(json.dumps(it.get_state()))
  expected = take(it, epoch_batches + 2)
  fresh = make_iterator(cfg, split="train", batch_size=5, seed=3)
  fresh.set_state(state)
  for want, got in zip(expected, take(fresh, epoch_batches + 2)):
    for key in want:
      np.testing.assert_array_equal(want[key], got[key])
  with pytest.raises(ValueError, match="seed"):
    make_iterator(cfg, split="train", batch_size=5, seed=4).set_state(state)


def _rows(iterator, count):
  rows = []
  while len(rows) < count:
    batch = next(iterator)
    rows.extend(r.tobytes() for r in batch["input_ids"])
  return rows[:count]


def test_two_hosts_are_disjoint_and_cover_an_epoch(cfg):
  single = make_iterator(cfg, split="train", batch_size=3, seed=5)
  n = single.num_records
  everything = _rows(single, n)
  assert len(set(everything)) == n  # real text: no two pieces are identical
  host0 = _rows(
      make_iterator(cfg, split="train", batch_size=3, seed=5, process_index=0, process_count=2),
      (n + 1) // 2,
  )
  host1 = _rows(
      make_iterator(cfg, split="train", batch_size=3, seed=5, process_index=1, process_count=2),
      n // 2,
  )
  assert not set(host0) & set(host1)
  assert set(host0) | set(host1) == set(everything)


def test_eval_fraction_holds_out_whole_files(corpus, tmp_path):
  c = config(corpus, tmp_path, eval_fraction=0.4)
  train = make_iterator(c, split="train", batch_size=2, seed=0)
  evaluation = make_iterator(c, split="eval", batch_size=2, seed=0, repeat=False)
  summary = train.summary
  assert summary["train"]["records"] + summary["eval"]["records"] == len(STDLIB_FILES)
  assert summary["eval"]["records"] >= 1 and summary["train"]["records"] >= 1
  train_rows = set(_rows(train, train.num_records))
  eval_rows = {
      r.tobytes() for b in evaluation for r, v in zip(b["input_ids"], b["valid"]) if v.any()
  }
  assert len(eval_rows) == evaluation.num_records and not train_rows & eval_rows


def test_pystdlib_prefix_and_bad_config(tmp_path):
  files = expand_files(["pystdlib://json/__init__.py"])
  assert files == [os.path.join(sysconfig.get_paths()["stdlib"], "json", "__init__.py")]
  with pytest.raises(ValueError, match="matches no file"):
    expand_files(["pystdlib://no_such_module/*.py"])
  bad = ml_collections.ConfigDict(
      dict(
          format="text",
          train_files=["pystdlib://json/*.py"],
          max_len=100,
          block_size=32,
          cache_dir=str(tmp_path),
      )
  )
  with pytest.raises(ValueError, match="multiple of block_size"):
    make_iterator(bad, split="train", batch_size=2, seed=0)


def _first_rows(cfg, tmp):
  it = make_iterator(cfg, split="train", batch_size=1, seed=0, repeat=False)
  return sorted(r.tobytes() for b in it for r, v in zip(b["input_ids"], b["valid"]) if v.any())


def test_same_size_edit_prepares_a_new_dataset(tmp_path):
  """The cache is keyed by the files' content, not only their names and sizes."""
  data = tmp_path / "data"
  data.mkdir()
  doc = data / "doc.txt"
  doc.write_text("alpha beta gamma delta\n" * 20, encoding="utf-8")
  cfg = config(data, tmp_path / "cache")
  before = _first_rows(cfg, tmp_path)
  stat = os.stat(doc)
  doc.write_text("omega beta gamma delta\n" * 20, encoding="utf-8")  # same size
  os.utime(doc, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the same modification time
  assert os.path.getsize(doc) == stat.st_size
  after = _first_rows(cfg, tmp_path)
  assert after != before
  qwen = get_tokenizer("qwen3")
  assert qwen.decode(np.frombuffer(after[0], np.int32)).startswith("omega")


def test_large_files_are_keyed_by_modification_time_and_edges(tmp_path, monkeypatch):
  from tide_jax.data import options

  monkeypatch.setattr(options, "HASH_WHOLE_BYTES", 100)
  monkeypatch.setattr(options, "HASH_EDGE_BYTES", 10)
  path = tmp_path / "big.txt"
  path.write_bytes(b"x" * 50 + b"middle" + b"y" * 50)
  first = options.file_identity(str(path))
  stat = os.stat(path)
  path.write_bytes(b"x" * 50 + b"MIDDLE" + b"y" * 50)  # an edit between the hashed edges
  os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
  assert options.file_identity(str(path)) != first
  os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
  assert options.file_identity(str(path)) == first  # mtime and edges are what identify it
  path.write_bytes(b"X" * 50 + b"MIDDLE" + b"y" * 50)  # an edit inside the first edge
  os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
  assert options.file_identity(str(path)) != first


def test_long_documents_are_tokenized_in_windows_with_the_same_tokens(qwen3, monkeypatch):
  """The tokenizer sees at most a window of a long document at a time (bounded memory), and
  the tokens are exactly those of the whole document."""
  from tide_jax.data import encode

  info = encode.tokenizer_info("qwen3")
  stdlib = sysconfig.get_paths()["stdlib"]
  text = "".join(open(os.path.join(stdlib, n), encoding="utf-8").read() for n in STDLIB_FILES)
  monkeypatch.setattr(encode, "TEXT_WINDOW_CHARS", 4000)
  windows = encode.text_windows(text, window_chars=4000)
  assert len(windows) > 10 and "".join(windows) == text
  for window, after in zip(windows, windows[1:]):
    # Cut after a newline, before a printable ASCII character; within the window's size
    # unless the window held no such line start.
    assert window.endswith("\n") and "!" <= after[0] <= "~"
    assert len(window) <= 4000 or re.search(r"\n(?=[!-~])", window[:4001]) is None
  calls = []
  original = encode.tokenize_with_offsets
  monkeypatch.setattr(
      encode, "tokenize_with_offsets", lambda i, t: calls.append(len(t)) or original(i, t)
  )
  pieces = encode.split_text(info, text, max_tokens=64)
  assert len(calls) == len(windows)
  whole = qwen3.encode(text, add_special_tokens=False)
  assert np.concatenate([side.ids for _, side in pieces]).tolist() == whole
  assert "".join(piece for piece, _ in pieces) == text
