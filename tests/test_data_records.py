"""Record readers: every malformed input becomes a named, located Problem (no tokenizer needed)."""

import codecs
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tide_jax.data.records import ChatRecord, Problem, TextRecord, parse_messages, read_file, record_hash
from tests import data_layouts


def kinds(items):
  return [
      (i.kind, i.source.rsplit(":", 1)[-1]) if isinstance(i, Problem) else ("ok", "") for i in items
  ]


@pytest.mark.parametrize(
    "obj, kind",
    [
        ({"messages": [{"role": "user", "content": 3}]}, "bad_message"),
        ({"messages": ["hi"]}, "bad_message"),
        ({"messages": []}, "missing_messages"),
        ([1, 2], "missing_messages"),
        ({"messages": [{"role": "user", "content": "only a question"}]}, "no_response"),
        (
            {"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]},
            "unknown_role",
        ),
        ({"instruction": "q", "output": 3}, "bad_message"),
        ({"instruction": "q"}, "missing_messages"),
    ],
)
def test_parse_messages_problems(obj, kind):
  problem = parse_messages(obj, "f.jsonl:9")
  assert isinstance(problem, Problem) and problem.kind == kind and problem.source == "f.jsonl:9"
  assert str(problem.error()).startswith("f.jsonl:9: ")


def test_parse_messages_normalises_to_nfc():
  record = parse_messages(
      {
          "messages": [
              {"role": "user", "content": "cafe\u0301"},
              {"role": "assistant", "content": "ok"},
          ]
      },
      "s",
  )
  assert isinstance(record, ChatRecord) and record.messages[0] == ("user", "caf\u00e9")


def test_parquet_rows_and_missing_column(tmp_path):
  good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
  bad = {"messages": [{"role": "user", "content": "q"}, {"role": "wizard", "content": "a"}]}
  pq.write_table(pa.Table.from_pylist([good, bad, good]), str(tmp_path / "t.parquet"))
  assert kinds(read_file(str(tmp_path / "t.parquet"), "chat")) == [
      ("ok", ""),
      ("unknown_role", "row 2"),
      ("ok", ""),
  ]
  pq.write_table(pa.Table.from_pylist([{"text": "a"}, {"text": "b"}]), str(tmp_path / "u.parquet"))
  assert kinds(read_file(str(tmp_path / "u.parquet"), "chat")) == [
      ("missing_messages", "row 1"),
      ("missing_messages", "row 2"),
  ]


def test_jsonl_blank_lines_are_skipped_and_lines_counted(tmp_path):
  line = (
      b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
  )
  (tmp_path / "x.jsonl").write_bytes(line + b"\n   \n" + b"{oops\n" + line)
  assert kinds(read_file(str(tmp_path / "x.jsonl"), "chat")) == [
      ("ok", ""),
      ("malformed_json", "4"),
      ("ok", ""),
  ]


def test_text_invalid_utf8_reports_the_line(tmp_path):
  (tmp_path / "t.txt").write_bytes(b"line one\nline two\nbad \xff byte\n")
  (problem,) = read_file(str(tmp_path / "t.txt"), "text")
  assert problem.kind == "invalid_utf8" and problem.source.endswith("t.txt:3")
  (tmp_path / "ok.txt").write_text("fine text", encoding="utf-8")
  (record,) = read_file(str(tmp_path / "ok.txt"), "text")
  assert isinstance(record, TextRecord) and record.text == "fine text"


def test_record_hash_depends_on_content_only():
  a = parse_messages(
      {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, "x:1"
  )
  b = parse_messages(
      {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, "y:7"
  )
  c = parse_messages(
      {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}, "x:1"
  )
  assert record_hash(a) == record_hash(b) != record_hash(c)


def test_empty_messages_keep_the_record():
  """An empty system prompt (or any empty message) is rendered as such, not a reason to drop."""
  record = parse_messages(
      {
          "messages": [
              {"role": "system", "content": ""},
              {"role": "user", "content": "  "},
              {"role": "assistant", "content": "ok"},
          ]
      },
      "f.jsonl:1",
  )
  assert isinstance(record, ChatRecord)
  assert record.messages == (("system", ""), ("user", "  "), ("assistant", "ok"))


@pytest.mark.parametrize("layout", sorted(data_layouts.SCHEMAS))
def test_published_layouts_are_read(layout, tmp_path):
  path = data_layouts.write_layout(layout, tmp_path / f"{layout}.parquet")
  items = list(read_file(path, "chat"))
  assert all(isinstance(i, ChatRecord) for i in items), [getattr(i, "message", i) for i in items]
  assert [i.messages for i in items] == data_layouts.expected_messages(layout)
  assert [i.source.rsplit(":", 1)[-1] for i in items] == [
      f"row {n}" for n in range(1, len(items) + 1)
  ]


def test_opencoder_layout_in_json_lines(tmp_path):
  rows = data_layouts.ROWS["opc_sft_stage2"]
  (tmp_path / "x.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  (record,) = read_file(str(tmp_path / "x.jsonl"), "chat")
  assert record.messages == data_layouts.expected_messages("opc_sft_stage2")[0]


def test_byte_order_mark_does_not_drop_the_first_record(tmp_path):
  line = (
      b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
  )
  (tmp_path / "bom.jsonl").write_bytes(codecs.BOM_UTF8 + line + line)
  assert kinds(read_file(str(tmp_path / "bom.jsonl"), "chat")) == [("ok", ""), ("ok", "")]
  (tmp_path / "bom.txt").write_bytes(codecs.BOM_UTF8 + "text".encode())
  (record,) = read_file(str(tmp_path / "bom.txt"), "text")
  assert record.text == "text"
