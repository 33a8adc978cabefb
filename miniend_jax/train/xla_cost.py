"""What XLA says one chip's step costs, with every loop counted as often as it runs,
and the roofline step time that follows.

`compiled.cost_analysis()` (libtpu's, for a step compiled for a TPU topology)
counts the body of every while loop once: a step whose layers are a `lax.scan`
reports the FLOPs and memory traffic of one layer where it runs them all
(measured in tests/train/test_plan.py). `step_cost` corrects that: it reads each
loop's trip count from the optimized HLO (its counter's start, its condition's
limit, its body's increment), costs one iteration of the body with XLA's generic
HLO cost analysis (the analysis libtpu extends: the same FLOPs, bytes within a
few percent), and adds the iterations left out. A loop whose trip count the HLO
does not show stays counted once and is named in `StepCost.uncounted_loops`.

`Roofline` is the step time those counts imply on one chip:
max(FLOPs / peak FLOP/s, bytes accessed / HBM bandwidth).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any

import jax

_COMPUTATION = re.compile(r"^(ENTRY )?%([\w.\-]+) ")
_INSTRUCTION = re.compile(r"^\s+(ROOT )?%([\w.\-]+) = (.*)$")
_OPCODE = re.compile(r"\s([a-z][a-z0-9\-]*)\(")
_NAME = re.compile(r"%([\w.\-]+)")
_STACK_FRAME = re.compile(r" stack_frame_id=\d+")
_PASS_THROUGH = ("copy", "bitcast", "convert", "reshape")


@dataclasses.dataclass(frozen=True)
class _Instruction:
  name: str
  opcode: str
  operands: tuple[str, ...]  # instruction names, or a constant's literal
  attributes: str  # the text after the operands
  root: bool


def _parse_instruction(line: str) -> _Instruction | None:
  match = _INSTRUCTION.match(line)
  opcode = _OPCODE.search(match.group(3)) if match else None
  if not opcode:
    return None
  rest, start = match.group(3), opcode.end()
  depth, end = 1, start
  while end < len(rest) and depth:
    depth += {"(": 1, ")": -1}.get(rest[end], 0)
    end += 1
  inside = rest[start:end - 1]
  operands = tuple(_NAME.findall(inside)) if "%" in inside else (inside.strip(),)
  return _Instruction(match.group(2), opcode.group(1), operands, rest[end:],
                      bool(match.group(1)))


@dataclasses.dataclass
class _Computation:
  name: str
  lines: list[str]  # its text, header first

  @functools.cached_property
  def instructions(self) -> dict[str, _Instruction]:
    parsed = (_parse_instruction(line) for line in self.lines[1:])
    return {inst.name: inst for inst in parsed if inst is not None}

  @property
  def root(self) -> _Instruction | None:
    return next((i for i in self.instructions.values() if i.root), None)

  def whiles(self) -> list[_Instruction]:
    return [i for i in self.instructions.values() if i.opcode == "while"]


def _computations(hlo_text: str) -> tuple[dict[str, _Computation], str]:
  """{name: computation} of an HLO module's text, and the entry computation's name."""
  computations, entry, current = {}, "", None
  for line in hlo_text.splitlines():
    match = _COMPUTATION.match(line)
    if match and line.rstrip().endswith("{"):
      current = computations[match.group(2)] = _Computation(match.group(2), [line])
      entry = match.group(2) if match.group(1) else entry
    elif current is not None:
      current.lines.append(line)
      if line == "}":
        current = None
  return computations, entry


def _attribute(inst: _Instruction, key: str) -> str | None:
  match = re.search(rf"\b{key}=%?([\w.\-]+)", inst.attributes)
  return match.group(1) if match else None


def _constant(comp: _Computation, name: str) -> int | None:
  """The integer `name` holds in `comp` when it is a constant (through copies), else None."""
  inst = comp.instructions.get(name)
  while inst is not None and inst.opcode in _PASS_THROUGH:
    inst = comp.instructions.get(inst.operands[0])
  if inst is None or inst.opcode != "constant":
    return None
  try:
    return int(inst.operands[0])
  except ValueError:
    return None


def _tuple_index(comp: _Computation, name: str) -> int | None:
  """k when `name` is get-tuple-element(parameter, index=k) in `comp` (through
  copies), else None."""
  inst = comp.instructions.get(name)
  while inst is not None and inst.opcode in _PASS_THROUGH:
    inst = comp.instructions.get(inst.operands[0])
  if inst is None or inst.opcode != "get-tuple-element":
    return None
  source = comp.instructions.get(inst.operands[0])
  index = re.search(r"index=(\d+)", inst.attributes)
  return int(index.group(1)) if source and source.opcode == "parameter" and index else None


def _trip_count(computations: dict[str, _Computation], parent: _Computation,
                loop: _Instruction) -> int | None:
  """How often `loop` (a while in `parent`) runs its body, when its HLO shows it: a
  counter in tuple element k starting at a constant, compared with a constant in
  the condition, raised by a constant in the body. None otherwise."""
  condition = computations.get(_attribute(loop, "condition") or "")
  body = computations.get(_attribute(loop, "body") or "")
  compare = condition.root if condition else None
  if body is None or compare is None or compare.opcode != "compare" or len(compare.operands) != 2:
    return None
  direction = _attribute(compare, "direction")
  left, right = compare.operands
  index, limit = _tuple_index(condition, left), _constant(condition, right)
  if index is None:  # constant OP counter: flip it
    index, limit = _tuple_index(condition, right), _constant(condition, left)
    direction = {"GT": "LT", "GE": "LE"}.get(direction or "")
  if index is None or limit is None or direction not in ("LT", "LE"):
    return None
  limit += direction == "LE"
  init_tuple = parent.instructions.get(loop.operands[0])
  if init_tuple is None or init_tuple.opcode != "tuple" or index >= len(init_tuple.operands):
    return None
  start = _constant(parent, init_tuple.operands[index])
  body_root = body.root
  if start is None or body_root is None or body_root.opcode != "tuple":
    return None
  increment = body.instructions.get(body_root.operands[index])
  if increment is None or increment.opcode != "add":
    return None
  a, b = increment.operands
  step = _constant(body, b) if _tuple_index(body, a) == index else (
      _constant(body, a) if _tuple_index(body, b) == index else None)
  if not step or step < 0:
    return None
  return max(0, math.ceil((limit - start) / step))


def _module_text(computations: dict[str, _Computation], entry: str) -> str:
  """An HLO module of `entry` (as its entry computation) and what it calls."""
  names = set(computations)
  reached, todo = [], [entry]
  while todo:
    name = todo.pop()
    if name in reached:
      continue
    reached.append(name)
    for line in computations[name].lines[1:]:
      todo.extend(n for n in _NAME.findall(line) if n in names and n not in reached)
  parts = ["HloModule loop_body"]
  for name in reversed(reached):  # callees before callers
    lines = computations[name].lines
    header = re.sub(r"^ENTRY ", "", lines[0])
    parts.append("\n".join([("ENTRY " if name == entry else "") + header] + lines[1:]))
  return _STACK_FRAME.sub("", "\n\n".join(parts))


def _generic_cost(computations: dict[str, _Computation], name: str) -> tuple[float, float]:
  """(flops, bytes accessed) of computation `name` by XLA's generic HLO cost analysis
  (loops in it counted once)."""
  from jax._src.lib import xla_client  # pylint: disable=import-outside-toplevel
  module = xla_client.hlo.hlo_module_from_text(_module_text(computations, name))
  cost = xla_client._xla.hlo_module_cost_analysis(  # pylint: disable=protected-access
      jax.local_devices(backend="cpu")[0].client, module)
  return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


@dataclasses.dataclass(frozen=True)
class Loop:
  """A while loop of the step: its body computation, how often it runs (None: the
  HLO does not show it) and what one iteration costs (generic cost analysis)."""

  body: str
  trip_count: int | None
  flops: float
  bytes_accessed: float


@dataclasses.dataclass(frozen=True)
class StepCost:
  """One chip's step per XLA, loops counted as often as they run where known.

  Attributes:
    flops, bytes_accessed: per chip, per step.
    counted_once_flops, counted_once_bytes: XLA's own figures (each loop body once).
    optimal_seconds: libtpu's own step-time estimate as it reports it (it counts
      loops once too, and has been seen negative); None when absent.
    loops: the while loops of the entry computation and of loop bodies (outer
      before inner); a loop inside a conditional branch is not looked into.
  """

  flops: float
  bytes_accessed: float
  counted_once_flops: float
  counted_once_bytes: float
  optimal_seconds: float | None
  loops: tuple[Loop, ...] = ()

  @property
  def uncounted_loops(self) -> tuple[Loop, ...]:
    """Loops whose trip count is unknown: counted once, so the totals are lower bounds."""
    return tuple(loop for loop in self.loops if loop.trip_count is None)


def _loop_extra(computations, parent: _Computation, loops: list[Loop]) -> tuple[float, float]:
  """FLOPs and bytes that counting each loop of `parent` once leaves out; appends the
  loops (and those nested in them) to `loops`."""
  extra_flops = extra_bytes = 0.0
  for inst in parent.whiles():
    body = computations.get(_attribute(inst, "body") or "")
    if body is None:
      continue
    trips = _trip_count(computations, parent, inst)
    try:
      flops, nbytes = _generic_cost(computations, body.name)
    except RuntimeError:  # XLA cannot re-read this body (or no CPU backend): count it once
      trips, flops, nbytes = None, 0.0, 0.0
    loops.append(Loop(body.name, trips, flops, nbytes))
    inner_flops, inner_bytes = _loop_extra(computations, body, loops)
    # The body runs `trips` times (once where unknown); the analysis counted it once.
    runs = 1 if trips is None else trips
    extra_flops += runs * (flops + inner_flops) - flops
    extra_bytes += runs * (nbytes + inner_bytes) - nbytes
  return extra_flops, extra_bytes


def step_cost(compiled: jax.stages.Compiled) -> StepCost:
  """XLA's cost of one chip's step with loops counted by their trip counts."""
  cost: Any = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  flops, nbytes = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
  optimal = cost.get("optimal_seconds")
  computations, entry = _computations(compiled.as_text())
  loops: list[Loop] = []
  extra_flops, extra_bytes = (_loop_extra(computations, computations[entry], loops)
                              if entry else (0.0, 0.0))
  return StepCost(flops=flops + extra_flops, bytes_accessed=nbytes + extra_bytes,
                  counted_once_flops=flops, counted_once_bytes=nbytes,
                  optimal_seconds=None if optimal is None else float(optimal),
                  loops=tuple(loops))


@dataclasses.dataclass(frozen=True)
class Roofline:
  """One chip's step time if it ran at its peak FLOP/s or its HBM bandwidth,
  whichever binds: max(flops / peak_flops, bytes_accessed / hbm_bandwidth)."""

  flops: float  # per chip, per step
  bytes_accessed: float  # per chip, per step
  peak_flops: float  # per chip, FLOP/s
  hbm_bandwidth: float  # per chip, bytes/s

  @property
  def compute_s(self) -> float:
    return self.flops / self.peak_flops

  @property
  def memory_s(self) -> float:
    return self.bytes_accessed / self.hbm_bandwidth

  @property
  def step_s(self) -> float:
    return max(self.compute_s, self.memory_s)

  @property
  def bound(self) -> str:
    """"compute" or "memory": which side sets the step time."""
    return "compute" if self.compute_s >= self.memory_s else "memory"

  def mfu(self, model_flops: float) -> float:
    """The MFU a step of `model_flops` per chip has at the roofline step time."""
    return model_flops / (self.step_s * self.peak_flops)
