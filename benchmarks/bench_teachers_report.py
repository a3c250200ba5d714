"""Writes one section of docs/benchmarks/teachers.md, keeping the other sections."""

from __future__ import annotations

import os
import platform
import re

import jax

DOC = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "benchmarks", "teachers.md"
)
HEADER = (
    "# Teacher benchmarks\n\nProduced by the scripts in benchmarks/; each section names "
    "its command. Re-running a script replaces only its own section.\n"
)


def write_section(title: str, command: str, body: str) -> None:
  """Replaces (or appends) ``## title`` with the command, the machine and ``body``."""
  text = open(DOC).read() if os.path.exists(DOC) else HEADER
  machine = (
      f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
      f"jax {jax.__version__} ({jax.default_backend()})"
  )
  section = f"## {title}\n\nCommand: `{command}`\nMachine: {machine}\n\n{body.strip()}\n"
  pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
  if pattern.search(text):
    text = pattern.sub(lambda _: section + "\n", text)
  else:
    text = text.rstrip() + "\n\n" + section
  os.makedirs(os.path.dirname(DOC), exist_ok=True)
  with open(DOC, "w") as f:
    f.write(text.rstrip() + "\n")
