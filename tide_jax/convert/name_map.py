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


def _check_rows(x: np.ndarray, axis: int, num_heads: int, head_dim: int, what: str) -> None:
  """Checks, before any reshape, that ``x`` has ``num_heads * head_dim`` entries on ``axis``."""
  if x.shape[axis] != num_heads * head_dim:
    raise ValueError(
        f"shape {tuple(x.shape)} has {x.shape[axis]} {what}, expected {num_heads * head_dim} "
        f"= {num_heads} heads x head_dim {head_dim}"
    )


def linear_to_heads(num_heads: int, head_dim: int) -> Transform:
  """HF ``[heads*D, E]`` -> Flax ``[E, heads, D]``."""

  def convert(x: np.ndarray) -> np.ndarray:
    _check_rows(x, 0, num_heads, head_dim, "rows")
    return np.ascontiguousarray(x.T.reshape(x.shape[1], num_heads, head_dim))

  return convert


def heads_to_linear(x: np.ndarray) -> np.ndarray:
  """Flax ``[E, heads, D]`` -> HF ``[heads*D, E]``."""
  return np.ascontiguousarray(x.reshape(x.shape[0], -1).T)


def out_linear_to_heads(num_heads: int, head_dim: int) -> Transform:
  """HF output projection ``[E, heads*D]`` -> Flax ``[heads, D, E]``."""

  def convert(x: np.ndarray) -> np.ndarray:
    _check_rows(x, 1, num_heads, head_dim, "columns")
    return np.ascontiguousarray(x.T.reshape(num_heads, head_dim, x.shape[0]))

  return convert


def heads_to_out_linear(x: np.ndarray) -> np.ndarray:
  """Flax ``[heads, D, E]`` -> HF ``[E, heads*D]``."""
  return np.ascontiguousarray(x.reshape(-1, x.shape[-1]).T)


def bias_to_heads(num_heads: int, head_dim: int) -> Transform:
  """HF bias ``[heads*D]`` -> Flax ``[heads, D]``."""

  def convert(x: np.ndarray) -> np.ndarray:
    _check_rows(x, 0, num_heads, head_dim, "entries")
    return x.reshape(num_heads, head_dim)

  return convert


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


# ---------------------------------------------------------------------------------------
# One-to-many and many-to-one rules (fused projections, stacked experts) and the
# per-tensor view of a rule set that streaming conversion works from.


@dataclasses.dataclass(frozen=True)
class SplitRule:
  """One HF tensor <-> several Flax parameters (for example a fused QKV projection).

  ``to_flax(x)`` returns one array per entry of ``flax`` in that order; ``to_hf(*parts)``
  fuses them back.
  """

  hf: str
  flax: tuple[str, ...]
  to_flax: Callable[[np.ndarray], tuple[np.ndarray, ...]]
  to_hf: Callable[..., np.ndarray]


@dataclasses.dataclass(frozen=True)
class StackedRule:
  """Many HF tensors (one per value of the ``stack`` placeholder) <-> one Flax parameter.

  The HF pattern contains ``{stack}`` (for example ``...experts.{e}.gate_proj.weight``);
  the Flax pattern does not. Slice ``e`` of the Flax parameter's leading axis is
  ``to_flax(hf_tensor_e)``.
  """

  hf: str
  flax: str
  stack: str
  to_flax: Transform = identity
  to_hf: Transform = identity


@dataclasses.dataclass(frozen=True)
class Source:
  """What one HF tensor becomes.

  ``convert(x)`` returns one array per path in ``paths``. ``index`` is the slot along the
  leading axis of a stacked parameter (``None`` when the tensor fills whole parameters).
  """

  hf: str
  paths: tuple[tuple, ...]
  index: int | None
  convert: Callable[[np.ndarray], tuple[np.ndarray, ...]]


AnyRule = Rule | SplitRule | StackedRule


def _values(spec: int | Sequence[int]) -> Sequence[int]:
  """A placeholder range given as a count (``range(n)``) or as explicit values."""
  return range(spec) if isinstance(spec, int) else spec


def _bindings(
    patterns: Sequence[str], ranges: Mapping[str, int | Sequence[int]], what: str
) -> Iterator[dict]:
  names = sorted({n for p in patterns for n in _placeholders(p)})
  unknown = [n for n in names if n not in ranges]
  if unknown:
    raise ValueError(f"Rule {what!r} uses placeholders without a range: {unknown}.")
  for values in itertools.product(*(_values(ranges[n]) for n in names)):
    yield dict(zip(names, values))


def expand_sources(
    rules: Sequence[AnyRule], ranges: Mapping[str, int | Sequence[int]]
) -> tuple[dict[str, Source], dict[tuple, int]]:
  """Expands a rule set into per-HF-tensor sources.

  ``ranges`` maps each placeholder to a count ``n`` (values ``0..n-1``) or to explicit
  values (for example the MoE layers ``range(1, 20)``); a stack placeholder must be a count
  or ``range(n)``, since its values are slots ``0..n-1``.

  Returns:
    ``(sources, stack_sizes)``: HF name -> :class:`Source`, and for every stacked Flax
    parameter the number of HF tensors that fill it.
  """
  sources: dict[str, Source] = {}
  stack_sizes: dict[tuple, int] = {}

  def add(source: Source) -> None:
    if source.hf in sources:
      raise ValueError(f"Two rules claim the HF tensor {source.hf}.")
    sources[source.hf] = source

  for rule in rules:
    if isinstance(rule, Rule):
      for env in _bindings([rule.hf, rule.flax], ranges, rule.hf):
        fn = rule.to_flax
        add(
            Source(
                rule.hf.format(**env),
                (parse_path(rule.flax.format(**env)),),
                None,
                lambda x, fn=fn: (fn(x),),
            )
        )
    elif isinstance(rule, SplitRule):
      for env in _bindings([rule.hf, *rule.flax], ranges, rule.hf):
        paths = tuple(parse_path(p.format(**env)) for p in rule.flax)
        add(Source(rule.hf.format(**env), paths, None, rule.to_flax))
    elif isinstance(rule, StackedRule):
      if rule.stack not in _placeholders(rule.hf) or rule.stack in _placeholders(rule.flax):
        raise ValueError(
            f"StackedRule {rule.hf!r}: the HF pattern must contain "
            f"{{{rule.stack}}} and the Flax pattern {rule.flax!r} must not."
        )
      slots = _values(ranges[rule.stack])
      if list(slots) != list(range(len(slots))):
        raise ValueError(f"The stack placeholder {rule.stack!r} must range over 0..n-1.")
      for env in _bindings([rule.hf, rule.flax], ranges, rule.hf):
        path = parse_path(rule.flax.format(**env))
        stack_sizes[path] = len(slots)
        fn = rule.to_flax
        add(Source(rule.hf.format(**env), (path,), env[rule.stack], lambda x, fn=fn: (fn(x),)))
    else:
      raise TypeError(f"Unknown rule type {type(rule).__name__}.")
  return sources, stack_sizes


def split_fused_heads(
    sizes: Sequence[int], head_dim: int
) -> Callable[[np.ndarray], tuple[np.ndarray, ...]]:
  """Fused HF projection ``[(n1 + n2 + ...) * D, E]`` -> Flax kernels ``[E, n_j, D]``.

  The fused rows are the heads of each part in order (for LLaDA2: q, then k, then v).
  """
  bounds = np.cumsum([0, *sizes]) * head_dim

  def split(x: np.ndarray) -> tuple[np.ndarray, ...]:
    if x.shape[0] != bounds[-1]:
      raise ValueError(
          f"fused projection has {x.shape[0]} rows, expected {bounds[-1]} "
          f"= {'+'.join(map(str, sizes))} heads x {head_dim}."
      )
    return tuple(
        np.ascontiguousarray(x[a:b].T.reshape(x.shape[1], n, head_dim))
        for a, b, n in zip(bounds[:-1], bounds[1:], sizes)
    )

  return split


def fuse_heads(*parts: np.ndarray) -> np.ndarray:
  """Inverse of :func:`split_fused_heads`: Flax ``[E, n_j, D]`` kernels -> ``[(sum n_j) D, E]``."""
  return np.concatenate([heads_to_linear(p) for p in parts], axis=0)


def split_fused_bias(
    sizes: Sequence[int], head_dim: int
) -> Callable[[np.ndarray], tuple[np.ndarray, ...]]:
  """Fused HF bias ``[(n1 + n2 + ...) * D]`` -> Flax biases ``[n_j, D]``."""
  bounds = np.cumsum([0, *sizes]) * head_dim

  def split(x: np.ndarray) -> tuple[np.ndarray, ...]:
    if x.shape[0] != bounds[-1]:
      raise ValueError(
          f"fused bias has {x.shape[0]} entries, expected {bounds[-1]} "
          f"= {'+'.join(map(str, sizes))} heads x {head_dim}."
      )
    return tuple(x[a:b].reshape(n, head_dim) for a, b, n in zip(bounds[:-1], bounds[1:], sizes))

  return split


def fuse_bias(*parts: np.ndarray) -> np.ndarray:
  return np.concatenate([p.reshape(-1) for p in parts])
