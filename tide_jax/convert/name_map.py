"""Declarative HF <-> Flax tensor name maps.

A :class:`Rule` pairs one HF tensor name pattern with one Flax state path pattern and two
small transforms (HF -> Flax and back). Patterns use ``{i}`` style placeholders; the
placeholders are expanded over ranges supplied by the model family (``{"i": num_layers}``).
A model family is then a list of rules, not a function per tensor.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import string
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

Transform = Callable[[np.ndarray], np.ndarray]


def identity(x: np.ndarray) -> np.ndarray:
  return x


def transpose(x: np.ndarray) -> np.ndarray:
  """PyTorch linear ``[out, in]`` <-> Flax kernel ``[in, out]``."""
  return np.ascontiguousarray(x.T)


def linear_to_heads(num_heads: int, head_dim: int) -> Transform:
  """HF ``[heads*D, E]`` -> Flax ``[E, heads, D]``."""
  return lambda x: np.ascontiguousarray(x.T.reshape(x.shape[1], num_heads, head_dim))


def heads_to_linear(x: np.ndarray) -> np.ndarray:
  """Flax ``[E, heads, D]`` -> HF ``[heads*D, E]``."""
  return np.ascontiguousarray(x.reshape(x.shape[0], -1).T)


def out_linear_to_heads(num_heads: int, head_dim: int) -> Transform:
  """HF output projection ``[E, heads*D]`` -> Flax ``[heads, D, E]``."""
  return lambda x: np.ascontiguousarray(x.T.reshape(num_heads, head_dim, x.shape[0]))


def heads_to_out_linear(x: np.ndarray) -> np.ndarray:
  """Flax ``[heads, D, E]`` -> HF ``[E, heads*D]``."""
  return np.ascontiguousarray(x.reshape(-1, x.shape[-1]).T)


def bias_to_heads(num_heads: int, head_dim: int) -> Transform:
  """HF bias ``[heads*D]`` -> Flax ``[heads, D]``."""
  return lambda x: x.reshape(num_heads, head_dim)


def heads_to_bias(x: np.ndarray) -> np.ndarray:
  return x.reshape(-1)


@dataclasses.dataclass(frozen=True)
class Rule:
  """One HF tensor pattern <-> one Flax parameter path pattern (dot separated)."""

  hf: str
  flax: str
  to_flax: Transform = identity
  to_hf: Transform = identity


def _placeholders(pattern: str) -> list[str]:
  return [name for _, name, _, _ in string.Formatter().parse(pattern) if name]


def expand(rules: Sequence[Rule], ranges: Mapping[str, int]) -> Iterator[tuple[str, tuple, Rule]]:
  """Yields ``(hf_name, flax_path_tuple, rule)`` for every placeholder value."""
  for rule in rules:
    names = sorted(set(_placeholders(rule.hf)) | set(_placeholders(rule.flax)))
    unknown = [n for n in names if n not in ranges]
    if unknown:
      raise ValueError(f"Rule {rule.hf!r} uses placeholders without a range: {unknown}.")
    for values in itertools.product(*(range(ranges[n]) for n in names)):
      env = dict(zip(names, values))
      yield rule.hf.format(**env), parse_path(rule.flax.format(**env)), rule


def parse_path(dotted: str) -> tuple:
  """``"layers.3.attn.q"`` -> ``("layers", 3, "attn", "q")``."""
  return tuple(int(p) if re.fullmatch(r"\d+", p) else p for p in dotted.split("."))


def format_path(path: Sequence) -> str:
  return ".".join(str(p) for p in path)
