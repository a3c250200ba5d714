"""Chat records end to end: labels, bad input, teacher keys for both alignments, the prepare CLI."""

import json
import subprocess
import sys

import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tide_jax.data import corpora
from tide_jax.data.pipeline import make_iterator
from tide_jax.data.records import DataError
from tide_jax.data.tokenizers import get_tokenizer, token_bytes

L, LT, BLOCK = 256, 192, 32


@pytest.fixture(scope="module")
def chats():
  return corpora.humaneval_chats()[:24] + corpora.stdlib_chats(16)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, chats):
  root = tmp_path_factory.mktemp("chat")
  corpora.write_jsonl(str(root / "a.jsonl"), chats[:20])
  pq.write_table(pa.Table.from_pylist(chats[20:]), str(root / "b.parquet"))
  return root


def config(root, cache, **overrides):
  values = dict(
      format="chat",
      train_files=[str(root / "*.jsonl"), str(root / "*.parquet")],
      tokenizer="qwen3",
      max_len=L,
      block_size=BLOCK,
      cache_dir=str(cache),
  )
  values.update(overrides)
  return ml_collections.ConfigDict(values)


@pytest.fixture(scope="module")
def toks():
  return {"qwen3": get_tokenizer("qwen3"), "llama3": get_tokenizer("llama3")}


def rows(iterator):
  """All rows of a single pass, as dicts of arrays (invalid fill rows removed)."""
  out = []
  for batch in iterator:
    for i in range(len(batch["input_ids"])):
      if batch["valid"][i].any():
        out.append({k: v[i] for k, v in batch.items()})
  return out


def test_prompt_is_not_trained_and_response_is(corpus, tmp_path, toks, chats):
  it = make_iterator(config(corpus, tmp_path), split="train", batch_size=4, seed=0, repeat=False)
  assert it.summary["train"]["records"] == len(chats)
  qwen = toks["qwen3"]
  # The last answer follows the empty think block; it and the end of its turn are trained.
  responses = {
      qwen.apply_chat_template(c["messages"], tokenize=False).split(
          "<|im_start|>assistant\n<think>\n\n</think>\n\n"
      )[-1]
      for c in chats
  }
  seen = 0
  for row in rows(it):
    ids, maskable, valid = row["input_ids"], row["maskable"], row["valid"]
    n = int(valid.sum())
    assert n % BLOCK == 0 and not maskable[n:].any() and (maskable <= valid).all()
    assert not maskable[0]  # the prompt starts with <|im_start|>user, never trained
    text = qwen.decode(ids[maskable])
    # Untruncated rows: the trained text is the assistant turn (content + "<|im_end|>\n")
    # followed only by the EOS block padding (<|im_end|> is Qwen3's EOS).
    head = text.split("<|im_end|>\n")[0] + "<|im_end|>\n"
    if head in responses:
      seen += 1
      assert set(text[len(head) :].split("<|im_end|>")) <= {""}
    prompt = qwen.decode(ids[:n][~maskable[:n]])
    assert prompt.startswith("<|im_start|>")
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
  assert seen >= len(chats) // 2


def test_prompt_too_long_is_dropped_and_counted(corpus, tmp_path, chats):
  long_prompt = {
      "messages": [
          {"role": "user", "content": "word " * 400},
          {"role": "assistant", "content": "ok"},
      ]
  }
  root = tmp_path / "long"
  root.mkdir()
  corpora.write_jsonl(str(root / "c.jsonl"), chats[:6] + [long_prompt])
  it = make_iterator(
      config(root, tmp_path / "cache", train_files=[str(root / "*.jsonl")]),
      split="train",
      batch_size=2,
      seed=0,
  )
  summary = it.summary["train"]
  assert summary["dropped"] == {"prompt_too_long": 1}
  assert summary["dropped_examples"]["prompt_too_long"] == [f"{root / 'c.jsonl'}:7"]
  assert summary["examples"] == 6 and it.num_records == 6


BAD_LINES = {
    "malformed_json": b'{"messages": [}\n',
    "missing_messages": b'{"conversation": []}\n',
    "unknown_role": b'{"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}\n',
    "invalid_utf8": b'{"messages": [{"role": "user", "content": "caf\xe9"}, {"role": "assistant", "content": "x"}]}\n',
}


def _bad_corpus(root, chats):
  good = [json.dumps(c).encode() + b"\n" for c in chats[:4]]
  (root / "bad.jsonl").write_bytes(
      good[0] + good[1] + b"".join(BAD_LINES.values()) + good[2] + good[3]
  )
  (root / "empty.jsonl").write_bytes(b"")


def test_bad_records_are_counted_and_named(tmp_path, chats):
  _bad_corpus(tmp_path, chats)
  it = make_iterator(
      config(tmp_path, tmp_path / "cache", train_files=[str(tmp_path / "*.jsonl")]),
      split="train",
      batch_size=2,
      seed=0,
  )
  summary = it.summary["train"]
  assert summary["dropped"] == {**{kind: 1 for kind in BAD_LINES}, "empty_file": 1}
  for line, kind in enumerate(BAD_LINES, start=3):
    assert summary["dropped_examples"][kind] == [f"{tmp_path / 'bad.jsonl'}:{line}"]
  assert summary["examples"] == 4


@pytest.mark.parametrize("kind", sorted(BAD_LINES) + ["empty_file"])
def test_strict_mode_raises_naming_file_and_line(tmp_path, chats, kind):
  if kind == "empty_file":
    (tmp_path / "x.jsonl").write_bytes(b"")
    where = "x.jsonl:1"
  else:
    good = json.dumps(chats[0]).encode() + b"\n"
    (tmp_path / "x.jsonl").write_bytes(good + BAD_LINES[kind])
    where = "x.jsonl:2"
  cfg = config(tmp_path, tmp_path / "cache", train_files=[str(tmp_path / "x.jsonl")], strict=True)
  with pytest.raises(DataError, match=rf"x\.jsonl:{where.split(':')[1]}: "):
    make_iterator(cfg, split="train", batch_size=2, seed=0)


def test_cross_tokenizer_chunk_keys(corpus, tmp_path, toks):
  cfg = config(corpus, tmp_path, teacher_tokenizer="llama3", teacher_max_len=LT, alignment="chunks")
  it = make_iterator(cfg, split="train", batch_size=4, seed=0, repeat=False)
  s_table, t_table = token_bytes(toks["qwen3"]), token_bytes(toks["llama3"])
  batch = next(make_iterator(cfg, split="train", batch_size=4, seed=0))
  assert batch["teacher_input_ids"].shape == (4, LT) and batch["student_chunk"].shape == (4, L)
  assert batch["teacher_chunk"].shape == (4, LT) and batch["num_chunks"].shape == (4,)
  assert batch["teacher_valid"].dtype == bool and batch["teacher_maskable"].dtype == bool
  total = 0
  for row in rows(it):
    n = int(row["num_chunks"])
    total += n
    for side in ("student_chunk", "teacher_chunk"):
      used = row[side][row[side] >= 0]
      assert set(used.tolist()) == set(range(n)) and (np.diff(used) >= 0).all()
    assert (row["teacher_chunk"][~row["teacher_valid"]] == -1).all()
    for c in range(n):
      s_bytes = b"".join(s_table[i] for i in row["input_ids"][row["student_chunk"] == c])
      t_bytes = b"".join(t_table[i] for i in row["teacher_input_ids"][row["teacher_chunk"] == c])
      assert s_bytes == t_bytes
    # A chunk is either all trained or all prompt, on both sides.
    for c in range(n):
      assert len(set(row["maskable"][row["student_chunk"] == c].tolist())) == 1
  assert total > 0 and it.summary["train"]["aligned_units"] == total


def test_shared_vocabulary_position_keys(corpus, tmp_path, toks):
  template = (
      "{% for m in messages %}<|im_start|>{{ m['role'] }}: {{ m['content'] }}<|im_end|>\n{% endfor %}"
      "{% if add_generation_prompt %}<|im_start|>assistant: {% endif %}"
  )
  cfg = config(
      corpus,
      tmp_path,
      teacher_tokenizer="qwen3",
      teacher_chat_template=template,
      alignment="positions",
      max_pairs=200,
  )
  it = make_iterator(cfg, split="train", batch_size=3, seed=0, repeat=False)
  for row in rows(it):
    count = int(row["pair_count"])
    assert row["pair_student"].shape == (200,) and 0 < count <= 200
    ps, pt = row["pair_student"][:count], row["pair_teacher"][:count]
    assert (row["pair_student"][count:] == -1).all() and (row["pair_teacher"][count:] == -1).all()
    assert (row["input_ids"][ps] == row["teacher_input_ids"][pt]).all()
    assert row["valid"][ps].all() and row["teacher_valid"][pt].all()
    assert (np.diff(ps) > 0).all() and (np.diff(pt) > 0).all()


def test_plain_text_with_teacher_chunks(tmp_path, toks):
  cfg = ml_collections.ConfigDict(
      dict(
          format="text",
          train_files=["pystdlib://json/*.py"],
          tokenizer="qwen3",
          teacher_tokenizer="llama3",
          alignment="chunks",
          max_len=128,
          teacher_max_len=128,
          block_size=32,
          cache_dir=str(tmp_path),
      )
  )
  batch = next(make_iterator(cfg, split="train", batch_size=4, seed=0))
  s_table, t_table = token_bytes(toks["qwen3"]), token_bytes(toks["llama3"])
  for i in range(4):
    n = int(batch["num_chunks"][i])
    assert n > 10
    # Plain text is aligned directly: the chunks cover the student content from its first token.
    assert batch["student_chunk"][i][0] == 0
    for c in (0, n // 2, n - 1):
      s_bytes = b"".join(s_table[t] for t in batch["input_ids"][i][batch["student_chunk"][i] == c])
      t_bytes = b"".join(
          t_table[t] for t in batch["teacher_input_ids"][i][batch["teacher_chunk"][i] == c]
      )
      assert s_bytes == t_bytes


def test_prepare_command(corpus, tmp_path):
  config_file = tmp_path / "data_config.py"
  config_file.write_text(
      "import ml_collections\n"
      "def get_config():\n"
      f"    return ml_collections.ConfigDict(dict(data=dict(format='chat', train_files=[{str(corpus / '*.jsonl')!r}],"
      f" tokenizer='qwen3', max_len=256, block_size=32, cache_dir={str(tmp_path / 'cache')!r}, eval_fraction=0.2)))\n"
  )
  done = subprocess.run(
      [sys.executable, "-m", "tide_jax.data.prepare", f"--config={config_file}"],
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert done.returncode == 0, done.stderr[-2000:]
  summary = json.loads(done.stdout[done.stdout.index("{") :])
  assert summary["train"]["records"] + summary["eval"]["records"] == 20
  bad = subprocess.run(
      [
          sys.executable,
          "-m",
          "tide_jax.data.prepare",
          f"--config={config_file}",
          "--config.data.max_len=100",
      ],
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert bad.returncode == 1 and "must be a positive multiple of block_size" in bad.stderr
  assert "Traceback" not in bad.stderr


def test_process_pool_gives_the_same_dataset(corpus, tmp_path):
  """num_workers=2 (spawned pool) stores exactly what one process stores."""

  def stored(workers):
    cfg = config(
        corpus,
        tmp_path / f"w{workers}",
        teacher_tokenizer="llama3",
        teacher_max_len=LT,
        alignment="chunks",
        num_workers=workers,
    )
    it = make_iterator(cfg, split="train", batch_size=8, seed=0, repeat=False)
    return list(it), it.summary["train"]

  (one, summary_one), (two, summary_two) = stored(1), stored(2)
  assert len(one) == len(two)
  for a, b in zip(one, two):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])

  def counts(summary):
    out = {k: v for k, v in summary.items() if k not in ("seconds", "sources")}
    return out, {name: counts(s)[0] for name, s in summary.get("sources", {}).items()}

  assert counts(summary_one) == counts(summary_two)


def test_huge_records_are_cut_to_the_byte_budget(tmp_path, toks, chats):
  """A 2 MB answer or prompt costs a row's worth of work: the rendering is cut before it is
  tokenized (counted as byte_truncated), and the kept row is exactly the row the whole
  rendering would give."""
  stdlib_text = "".join(c["messages"][-1]["content"] for c in corpora.stdlib_chats(200))
  huge = (stdlib_text * (2_000_000 // len(stdlib_text) + 1))[:2_000_000]
  long_answer = {
      "messages": [
          {"role": "user", "content": "Show code."},
          {"role": "assistant", "content": huge},
      ]
  }
  long_prompt = {
      "messages": [{"role": "user", "content": huge}, {"role": "assistant", "content": "ok"}]
  }
  root = tmp_path / "huge"
  root.mkdir()
  corpora.write_jsonl(str(root / "h.jsonl"), chats[:3] + [long_answer, long_prompt])
  cfg = config(
      root,
      tmp_path / "cache",
      train_files=[str(root / "*.jsonl")],
      teacher_tokenizer="llama3",
      teacher_max_len=LT,
      alignment="chunks",
  )
  it = make_iterator(cfg, split="train", batch_size=4, seed=0, repeat=False)
  summary = it.summary["train"]
  assert summary["byte_truncated"] == 2 and summary["dropped"] == {"prompt_too_long": 1}
  assert summary["examples"] == 4 and summary["truncated"] >= 1
  qwen, llama = toks["qwen3"], toks["llama3"]
  whole_s = qwen.apply_chat_template(long_answer["messages"], tokenize=False)
  whole_t = llama.apply_chat_template(long_answer["messages"], tokenize=False)
  want_s = qwen.encode(whole_s, add_special_tokens=False)[:L]
  want_t = llama.encode(whole_t, add_special_tokens=False)[:LT]
  head = qwen.encode("<|im_start|>user\nShow code.", add_special_tokens=False)
  (row,) = [r for r in rows(it) if r["input_ids"][: len(head)].tolist() == head]
  assert row["input_ids"].tolist() == want_s and row["teacher_input_ids"].tolist() == want_t
  assert int(row["num_chunks"]) > 0
