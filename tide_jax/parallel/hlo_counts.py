"""Per-device work and communication read from a compiled program's HLO text.

``compiled.cost_analysis()`` counts a while loop's body once, whatever its trip count, so it
under-counts looped work (row tiles, exchange rounds). :func:`count_hlo` walks the optimized
HLO of one device instead: matmul FLOPs and collective bytes, each loop body multiplied by
its trip count.

Trip counts: XLA's ``known_trip_count`` when it proved one. A loop with a data-dependent
count that walks a buffer in dynamic slices (the tiled MoE dispatch's loop over row tiles)
is bounded by the buffer's rows over the slice's rows, the most it can run. Any other loop
counts once and is listed in ``unbounded_loops`` (its op_name), so a caller can say what
that single trip means (one exchange round of the expert-parallel MoE).
"""

from __future__ import annotations

import dataclasses
import math
import re

_SHAPE = re.compile(r"\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|f16|bf16|f32|f64)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2}
_BYTES.update({"s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8})
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%([\w.\-]+) = (.*)$")
_CALLED = re.compile(
    r"\b(?:calls|to_apply|body|condition|true_computation|false_computation)=%([\w.\-]+)"
)
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_COLLECTIVES = (
    "all-to-all",
    "all-gather",
    "all-reduce",
    "reduce-scatter",
    "collective-permute",
    "ragged-all-to-all",
)


@dataclasses.dataclass
class _Instruction:
  name: str
  result: str  # the result type text, e.g. "f32[128,64]{1,0}" or a tuple of them
  opcode: str
  operands: list[str]
  attributes: str


@dataclasses.dataclass
class HloCounts:
  """Per-device totals of one compiled program."""

  dot_flops: float = 0.0  # 2 x multiply-adds of every dot
  collective_bytes: float = 0.0  # the larger of each collective's input and output
  collectives: dict = dataclasses.field(default_factory=dict)  # opcode -> bytes
  # (opcode, result type text, bytes moved including the loop trip counts), one per op
  collective_ops: list = dataclasses.field(default_factory=list)
  unbounded_loops: list = dataclasses.field(default_factory=list)


def _shapes(text: str) -> list[tuple[str, tuple[int, ...]]]:
  return [
      (dtype, tuple(int(d) for d in dims.split(",") if d)) for dtype, dims in _SHAPE.findall(text)
  ]


def _bytes(text: str) -> int:
  return sum(_BYTES[dtype] * math.prod(dims) for dtype, dims in _shapes(text))


def _split_result(rest: str) -> tuple[str, str]:
  """``"(f32[2], s32[]) while(...), ..."`` -> (result type, the rest after it)."""
  if rest.startswith("("):
    depth = 0
    for i, ch in enumerate(rest):
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        return rest[: i + 1], rest[i + 1 :].lstrip()
  result, _, tail = rest.partition(" ")
  return result, tail


def _parse(hlo: str) -> tuple[dict[str, list[_Instruction]], dict[str, str], str]:
  computations, types, entry, current = {}, {}, None, None
  for line in hlo.splitlines():
    head = _COMPUTATION.match(line)
    if head and not line.startswith(" "):
      current = head.group(1)
      computations[current] = []
      if line.startswith("ENTRY"):
        entry = current
      continue
    body = _INSTRUCTION.match(line)
    if body is None or current is None:
      continue
    name, rest = body.groups()
    result, tail = _split_result(rest)
    opcode, _, args = tail.partition("(")
    depth, end = 1, 0
    for end, ch in enumerate(args):
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        break
    operands = re.findall(r"%([\w.\-]+)", args[:end])
    computations[current].append(_Instruction(name, result, opcode, operands, args[end + 1 :]))
    types[name] = result
  if entry is None:
    raise ValueError("The HLO text has no ENTRY computation; pass compiled.as_text().")
  return computations, types, entry


def _slice_bound(computations, name: str, types: dict[str, str]) -> int | None:
  """Most trips a loop body can make over a buffer it reads in leading-dimension slices."""
  bound, stack, seen = None, [name], set()
  while stack:
    comp = stack.pop()
    if comp in seen or comp not in computations:
      continue
    seen.add(comp)
    for ins in computations[comp]:
      if ins.opcode == "while":
        continue  # a nested loop bounds itself
      stack += _CALLED.findall(ins.attributes)
      if ins.opcode != "dynamic-slice":
        continue
      (_, whole), (_, part) = _shapes(types[ins.operands[0]])[0], _shapes(ins.result)[0]
      if len(whole) == len(part) and part and part[0] and whole[0] > part[0]:
        bound = max(bound or 0, whole[0] // part[0])
  return bound


def count_hlo(hlo: str) -> HloCounts:
  """Matmul FLOPs and collective bytes of one device, loop bodies times their trip counts.

  Args:
    hlo: ``compiled.as_text()`` of a jitted (and partitioned) program.
  """
  computations, types, entry = _parse(hlo)
  out = HloCounts()

  def visit(comp: str, times: float):
    for ins in computations.get(comp, []):
      if ins.opcode == "dot":
        lhs = _shapes(types[ins.operands[0]])[0][1]
        contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.attributes)
        size = math.prod(lhs[int(d)] for d in contracting.group(1).split(",") if d)
        out.dot_flops += times * 2 * math.prod(_shapes(ins.result)[0][1]) * size
      base = ins.opcode.removesuffix("-start")
      if base in _COLLECTIVES and not ins.opcode.endswith("-done"):
        moved = max(_bytes(ins.result), sum(_bytes(types[o]) for o in ins.operands))
        if ins.opcode.endswith("-start"):  # the result tuple holds input and output
          moved = max(_bytes(t) for t in re.findall(r"\w+\[[\d,]*\]", ins.result))
        out.collective_bytes += times * moved
        out.collectives[base] = out.collectives.get(base, 0) + times * moved
        out.collective_ops.append((base, ins.result, times * moved))
      if ins.opcode == "while":
        body = re.search(r"\bbody=%([\w.\-]+)", ins.attributes).group(1)
        known = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', ins.attributes)
        trips = int(known.group(1)) if known else _slice_bound(computations, body, types)
        if trips is None:
          op_name = re.search(r'op_name="([^"]*)"', ins.attributes)
          out.unbounded_loops.append(op_name.group(1) if op_name else ins.name)
          trips = 1
        visit(body, times * trips)
        continue
      for called in _CALLED.findall(ins.attributes):
        visit(called, times)
      for branches in _BRANCHES.findall(ins.attributes):
        # A conditional runs one branch; every branch is counted (an upper bound).
        for called in re.findall(r"%([\w.\-]+)", branches):
          visit(called, times)

  visit(entry, 1.0)
  return out
