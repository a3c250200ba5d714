"""Command-line parsing shared by the entry points (`tide_jax.main`, `tide_jax.data.prepare`,
`tide_jax.convert`): importing this module lets `--config.<list field>=...` take lists.
"""

from __future__ import annotations

import ast

from absl import flags
from ml_collections import config_flags


class ListParser(flags.ArgumentParser):
  """List fields on the command line: a Python literal or comma-separated strings.

  ``--config.data.train_files=a.jsonl,b.jsonl`` and
  ``--config.eval.humaneval_tasks="['HumanEval/0', 'HumanEval/1']"`` both give lists;
  an empty value gives an empty list.
  """

  def parse(self, argument):
    if isinstance(argument, list):
      return argument
    text = str(argument).strip()
    if text.startswith("["):
      try:
        value = ast.literal_eval(text)
      except (SyntaxError, ValueError):
        raise ValueError(f"{text!r} is not a Python list literal") from None
      if not isinstance(value, list):
        raise ValueError(f"{text!r} is not a list")
      return value
    return [item.strip() for item in text.split(",") if item.strip()]

  def flag_type(self):
    return "list"


config_flags.register_flag_parser_for_type(list, ListParser())
