"""Parquet files in the published layouts of the paper's SFT sources, a few records each.

Schemas as the datasets publish them on the HuggingFace hub (column names and Arrow types):

- allenai/tulu-3-sft-mixture: `id` string, `messages` list<struct<content: string,
  role: string>>, `source` string.
- HuggingFaceTB/smoltalk: `messages` list<struct<content: string, role: string>>,
  `source` string.
- OpenCoder-LLM/opc-sft-stage1 (filtered_infinity_instruct, largescale_diverse_instruct,
  realuser_instruct): `instruction` string, `output` string, `tag` string.
- OpenCoder-LLM/opc-sft-stage2 educational_instruct: `instruction` string, `output`
  string, `code` string, `entry_point` string, `testcase` list<string> (the other stage-2
  subsets carry `instruction` and `output` only).

The contents are written for these tests: single and multi-turn, with and without a system
prompt (one empty), code and non-Latin text.
"""

import pyarrow as pa
import pyarrow.parquet as pq

MESSAGES = pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))

SCHEMAS = {
    "tulu3_sft_mixture": pa.schema(
        [("id", pa.string()), ("messages", MESSAGES), ("source", pa.string())]
    ),
    "smoltalk": pa.schema([("messages", MESSAGES), ("source", pa.string())]),
    "opc_sft_stage1": pa.schema(
        [("instruction", pa.string()), ("output", pa.string()), ("tag", pa.string())]
    ),
    "opc_sft_stage2": pa.schema(
        [
            ("instruction", pa.string()),
            ("output", pa.string()),
            ("code", pa.string()),
            ("entry_point", pa.string()),
            ("testcase", pa.list_(pa.string())),
        ]
    ),
}


def _turns(*pairs):
  return [{"content": content, "role": role} for role, content in pairs]


ROWS = {
    "tulu3_sft_mixture": [
        {
            "id": "oasst1_1",
            "messages": _turns(
                ("user", "What is the capital of France?"),
                ("assistant", "The capital of France is Paris."),
            ),
            "source": "ai2-adapt-dev/oasst1_converted",
        },
        {
            "id": "flan_2",
            "messages": _turns(
                ("system", ""),
                ("user", "Translate to German: good morning"),
                ("assistant", "Guten Morgen"),
            ),
            "source": "ai2-adapt-dev/flan_v2_converted",
        },
        {
            "id": "code_3",
            "messages": _turns(
                ("system", "You are a careful programmer."),
                ("user", "Write a function that doubles x."),
                ("assistant", "def double(x):\n    return 2 * x\n"),
                ("user", "Now make it triple."),
                ("assistant", "def triple(x):\n    return 3 * x\n"),
            ),
            "source": "ai2-adapt-dev/personahub_code_v2_34999",
        },
    ],
    "smoltalk": [
        {
            "messages": _turns(
                ("user", "Hi! ¿Cómo estás?"),
                ("assistant", "¡Muy bien, gracias! How can I help you today?"),
                ("user", "Name a prime number."),
                ("assistant", "7 is a prime number."),
            ),
            "source": "smol-magpie-ultra",
        },
        {
            "messages": _turns(
                ("system", "Answer briefly."),
                ("user", "日本の首都はどこですか？"),
                ("assistant", "東京です。"),
            ),
            "source": "smol-constraints",
        },
    ],
    "opc_sft_stage1": [
        {
            "instruction": "Write a Python function that reverses a string.",
            "output": "```python\ndef reverse(s):\n    return s[::-1]\n```",
            "tag": "largescale_diverse_instruct",
        },
        {
            "instruction": "Explain what a linked list is in one sentence.",
            "output": "A linked list is a sequence of nodes, each pointing to the next.",
            "tag": "realuser_instruct",
        },
    ],
    "opc_sft_stage2": [
        {
            "instruction": "Write a function to find the maximum of three numbers.",
            "output": "```python\ndef max_of_three(a, b, c):\n    return max(a, b, c)\n```",
            "code": "def max_of_three(a, b, c):\n    return max(a, b, c)",
            "entry_point": "max_of_three",
            "testcase": ["assert max_of_three(1, 2, 3) == 3", "assert max_of_three(3, 2, 1) == 3"],
        },
    ],
}


def write_layout(name: str, path) -> str:
  """Writes the records of layout `name` as one Parquet file with its published schema."""
  pq.write_table(pa.Table.from_pylist(ROWS[name], schema=SCHEMAS[name]), str(path))
  return str(path)


def expected_messages(name: str) -> list[tuple[tuple[str, str], ...]]:
  """The conversations the reader should make of layout `name`'s rows."""
  out = []
  for row in ROWS[name]:
    if "messages" in row:
      out.append(tuple((m["role"], m["content"]) for m in row["messages"]))
    else:
      out.append((("user", row["instruction"]), ("assistant", row["output"])))
  return out
