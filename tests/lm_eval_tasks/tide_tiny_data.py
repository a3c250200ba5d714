"""Documents of the tide_tiny tasks, read from tide_tiny.json next to this file.

The harness calls these through ``custom_dataset`` instead of ``datasets.load_dataset``,
so the tasks never look anything up on a dataset hub and work from any working directory.
"""

import json
import os

import datasets

_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tide_tiny.json")


def _split(kind: str) -> datasets.DatasetDict:
  with open(_FILE) as f:
    items = json.load(f)[kind]
  return datasets.DatasetDict({"test": datasets.Dataset.from_list(items)})


def generation(**unused_metadata) -> datasets.DatasetDict:
  return _split("generation")


def multiple_choice(**unused_metadata) -> datasets.DatasetDict:
  return _split("multiple_choice")
