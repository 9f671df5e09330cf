"""What a compiled program communicates and holds, read from its optimized HLO text.

`collectives(text)`: every all-gather, reduce-scatter, all-reduce, all-to-all and
collective-permute one device runs in a step (their async '-start' forms included), with the
bytes of its result, the size of its device group, and how many times it runs: a collective
inside a while loop (a scan over layers, gradient accumulation) runs the loop's trip count
times, read from the loop's `known_trip_count` or from its condition's `i < N`.

Bytes a device sends per execution, for a result of B bytes over a group of n devices (the
bandwidth-optimal ring algorithms):
  all-gather          B (n-1)/n        (B: the gathered result)
  reduce-scatter      B (n-1)          (B: the scattered result, 1/n of the input)
  all-reduce          2 B (n-1)/n      (a reduce-scatter, then an all-gather)
  all-to-all          B (n-1)/n
  collective-permute  B
Worked example: an all-gather of f32[1024, 1024] (4 MiB) over 8 devices sends 3.5 MiB a
device; the same array all-reduced sends 7 MiB.

`largest_arrays(text)`: the biggest arrays the program materialises (instructions outside
fusion bodies), per device.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Iterable

KINDS = ('all-gather', 'reduce-scatter', 'all-reduce', 'all-to-all', 'ragged-all-to-all',
         'collective-permute')
DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2,
               's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8,
               'c128': 16, 'f8e4m3fn': 1, 'f8e5m2': 1, 's4': 0.5, 'u4': 0.5}

_COMPUTATION = re.compile(r'^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([\w\-]+)\((.*)$')
_ARRAY = re.compile(r'\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]')


@dataclasses.dataclass(frozen=True)
class Collective:
  kind: str
  name: str
  result_bytes: float
  group: int
  count: int          # executions per step

  @property
  def sent_bytes(self) -> float:
    """Bytes one device sends per execution (module docstring)."""
    n, b = self.group, self.result_bytes
    if n <= 1:
      return 0.0
    return {'all-gather': b * (n - 1) / n, 'reduce-scatter': b * (n - 1),
            'all-reduce': 2 * b * (n - 1) / n, 'all-to-all': b * (n - 1) / n,
            'ragged-all-to-all': b * (n - 1) / n, 'collective-permute': b}[self.kind]


def array_bytes(shape_text: str) -> list[float]:
  """Bytes of each array in an HLO shape ('f32[8,128]{1,0}', or a tuple of them)."""
  out = []
  for dtype, dims in _ARRAY.findall(shape_text):
    if dtype in DTYPE_BYTES:
      out.append(DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(',') if d))
  return out


@functools.lru_cache(maxsize=2)
def parsed(text: str) -> tuple[dict, dict]:
  """(computations, multipliers) of a program's text, read once however many summaries ask
  (a 1.1T model's program is ~10 MB of text)."""
  comps = computations(text)
  return comps, multipliers(comps)


def computations(text: str) -> dict[str, list[tuple[str, str, str, str]]]:
  """{computation: [(name, result shape, opcode, rest of the line)]}, plus 'ENTRY' naming the
  entry computation as its only instruction."""
  out: dict[str, list] = {}
  current = None
  for line in text.splitlines():
    m = _COMPUTATION.match(line)
    if m:
      current = m.group(2)
      out[current] = []
      if m.group(1):
        out['ENTRY'] = [(current, '', '', '')]
      continue
    if line.strip() == '}':
      current = None
      continue
    i = _INSTRUCTION.match(line) if current else None
    if i:
      out[current].append(i.groups())
  return out


def _trip_count(rest: str, comps: dict) -> int:
  m = re.search(r'known_trip_count[^0-9]*(\d+)', rest)
  if m:
    return int(m.group(1))
  cond = re.search(r'condition=%?([\w.\-]+)', rest)
  for _, _, op, args in comps.get(cond.group(1) if cond else '', []):
    if op == 'constant':
      c = re.match(r'\s*(-?\d+)\s*\)', args)
      if c and int(c.group(1)) > 1:
        return int(c.group(1))
  return 1


def multipliers(comps: dict) -> dict[str, int]:
  """How many times each computation runs per execution of the entry computation."""
  entry = comps['ENTRY'][0][0] if 'ENTRY' in comps else None
  times = {entry: 1} if entry else {}
  order = [entry] if entry else []
  for comp in order:
    for _, _, op, rest in comps.get(comp, []):
      trips = _trip_count(rest, comps) if op == 'while' else 1
      for key, callee in re.findall(r'\b(body|condition|calls|to_apply|branch_computations)='
                                    r'\{?%?([\w.\-]+)', rest):
        n = trips if key in ('body', 'condition') else 1
        if op == 'fusion' or callee not in comps:
          continue   # a fusion body holds no collective
        times[callee] = times.get(callee, 0) + times[comp] * n
        if callee not in order:
          order.append(callee)
  return times


def _group_size(rest: str, devices: int) -> int:
  m = re.search(r'replica_groups=\{\{([\d,]*)\}', rest)
  if m:
    return len([x for x in m.group(1).split(',') if x])
  m = re.search(r'replica_groups=\[(\d+),(\d+)\]<=', rest)
  if m:
    return int(m.group(2))
  m = re.search(r"replica_groups=mesh\[([^\]]*)\](?:\s*\{([^}]*)\})?", rest)
  if m:
    sizes = {k: int(v) for k, v in re.findall(r"'(\w+)'=(\d+)", m.group(1))}
    axes = re.findall(r"'(\w+)'", m.group(2)) if m.group(2) else list(sizes)
    return math.prod(sizes.get(a, 1) for a in axes)
  if re.search(r'source_target_pairs=', rest):
    return 2
  return devices   # no groups: every device


def collectives(text: str, devices: int) -> list[Collective]:
  """The collectives of one device's program (module docstring)."""
  comps, times = parsed(text)
  out = []
  for comp, count in times.items():
    for name, shape, op, rest in comps.get(comp, []):
      kind = op[:-len('-start')] if op.endswith('-start') else op
      if kind not in KINDS:
        continue
      sizes = array_bytes(shape)
      # An async start's result is a tuple (operands, results, context): its largest array is
      # the result (an all-gather's output, or the same size for the others).
      result = max(sizes) if sizes else 0.0
      if kind == 'reduce-scatter' and op.endswith('-start'):
        result = min(s for s in sizes if s > 0) if sizes else 0.0
      out.append(Collective(kind, name, result, _group_size(rest, devices), count))
  return out


def summary(items: Iterable[Collective]) -> dict[str, dict]:
  """{kind: {'ops', 'executions', 'result_bytes', 'sent_bytes'}} per step, every kind listed."""
  out = {k: {'ops': 0, 'executions': 0, 'result_bytes': 0.0, 'sent_bytes': 0.0}
         for k in KINDS}
  for c in items:
    s = out[c.kind]
    s['ops'] += 1
    s['executions'] += c.count
    s['result_bytes'] += c.result_bytes * c.count
    s['sent_bytes'] += c.sent_bytes * c.count
  return out


def largest_arrays(text: str, n: int = 8) -> list[dict]:
  """The n largest arrays outside fusion bodies: {'name', 'shape', 'bytes', 'op'}."""
  comps, times = parsed(text)
  seen = []
  for comp in times:
    for name, shape, op, _ in comps.get(comp, []):
      # Tuples (loop state, async pairs) and views name arrays counted where they are made.
      if shape.lstrip().startswith('(') or op in ('parameter', 'get-tuple-element', 'bitcast',
                                                 'constant', 'copy-done'):
        continue
      sizes = array_bytes(shape)
      if sizes:
        seen.append({'name': name, 'shape': re.sub(r'\{[^}]*\}', '', shape)[:80],
                     'bytes': max(sizes), 'op': op})
  return sorted(seen, key=lambda a: -a['bytes'])[:n]
