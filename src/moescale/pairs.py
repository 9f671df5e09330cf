"""Experiment pairs: two models that must match in one quantity, checked from abstract counts.

A pair file is a gin file that binds only `Pair` (registered by `moescale.gin_config`):

    Pair.dense = ['models/artetxe2022/dense_125m.gin']     # gin files of each member
    Pair.sparse = ['models/artetxe2022/moe_15b.gin']
    Pair.sparse_bindings = ['EXPERT_SIZE = 1408']          # optional extra bindings
    Pair.match = 'train_flops'                             # what must match (MATCHES)
    Pair.convention = 'standard'                           # for train_flops (CONVENTIONS)
    Pair.expected_ratio = 1.0                              # sparse / dense, the target
    Pair.tolerance = 0.01                                  # |ratio / expected - 1| allowed

Member files are looked up like `--gin_file` (the pair file's folder, the working directory,
then the shipped gin/). Bindings are literal gin bindings, applied after the files.

    moescale pairs check [PAIR.gin ...]   the table below; exit 1 if a pair is off (no
                                          arguments: every shipped pair, gin/pairs/**)
    moescale pairs make --dense F.. --sparse F.. --vary SIDE:NAME --match Q [--write P.gin]
                                          the integer value of NAME (a macro or
                                          Configurable.param) on SIDE that matches Q
    moescale pairs list                   the shipped pair files

Counting is abstract (`moescale.accounting`), so even the 1.1T-parameter MoE checks in about
a second. Attention FLOPs use the members' own lengths (`context_lengths`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import pathlib
import sys
from typing import Callable, Sequence

# The pair specification and its vocabularies (re-exported: `pairs.Pair` is the public name).
from moescale.pair_spec import CONVENTIONS, MATCHES, SIDES, Pair  # noqa: F401


@dataclasses.dataclass(frozen=True)
class MemberCount:
  """What a pair compares, for one member."""
  total_params: int
  active_params: int
  forward_flops: float                  # per token
  train_flops: dict[str, float]         # per token, by convention
  context_length: int

  def quantity(self, match: str, convention: str = 'standard') -> float:
    if match == 'train_flops':
      return self.train_flops[convention]
    if match == 'forward_flops':
      return self.forward_flops
    if match in ('total_params', 'active_params'):
      return float(getattr(self, match))
    raise ValueError(f'match={match!r}; valid: {list(MATCHES)}')


@dataclasses.dataclass(frozen=True)
class PairResult:
  pair: Pair
  dense: MemberCount
  sparse: MemberCount
  ratio: float
  ok: bool

  @property
  def error(self) -> float:
    """Relative distance from the target ratio."""
    return self.ratio / self.pair.expected_ratio - 1.0


# ------------------------------------------------------------------------------- counting


def context_lengths() -> tuple[int, int | None]:
  """(keys per query, queries per segment) for attention FLOPs, from the parsed gin config.

  Segment length: TASK_FEATURE_LENGTHS['targets'] when a run file binds it, else the model's
  SEGMENT_LENGTH (Transformer-XL settings); keys = segment + MEM_LEN. Without either,
  MAX_LENGTH (the Artetxe models: 2048).
  """
  from moescale import gin_config
  lengths = gin_config.query('TASK_FEATURE_LENGTHS') or {}
  segment = lengths.get('targets') or gin_config.query('SEGMENT_LENGTH')
  if segment:
    return int(segment) + int(gin_config.query('MEM_LEN') or 0), int(segment)
  max_length = gin_config.query('MAX_LENGTH')
  if not max_length:
    raise ValueError('no context length: bind TASK_FEATURE_LENGTHS, SEGMENT_LENGTH or '
                     'MAX_LENGTH in the member gin files')
  return int(max_length), None


@functools.lru_cache(maxsize=256)
def count_member(files: tuple[str, ...], bindings: tuple[str, ...] = (),
                 search_paths: tuple[str, ...] = ()) -> MemberCount:
  """Parses one member's gin files + bindings and counts its model abstractly (cached)."""
  from moescale import accounting, gin_config
  gin_config.parse(list(files), list(bindings), list(search_paths), finalize=False)
  model_fn = gin_config.query('MODEL')
  if model_fn is None:
    raise ValueError(f'{list(files)} bind no MODEL (include a models/*.gin file)')
  context, query = context_lengths()
  c = accounting.count(model_fn, context, query)
  return MemberCount(total_params=c.total_params, active_params=c.active_params,
                     forward_flops=c.flops_per_token,
                     train_flops=dict(c.train_flops_per_token), context_length=context)


def _search_paths(pair_path: str | None) -> tuple[str, ...]:
  return (str(pathlib.Path(pair_path).resolve().parent),) if pair_path else ()


def check(pair: Pair, pair_path: str | None = None) -> PairResult:
  """Counts both members and compares the matched quantity."""
  paths = _search_paths(pair_path)
  counts = {side: count_member(*pair.member(side), paths) for side in SIDES}
  qd = counts['dense'].quantity(pair.match, pair.convention)
  qs = counts['sparse'].quantity(pair.match, pair.convention)
  if qd <= 0:
    raise ValueError(f'{pair.name}: the dense member has {pair.match} = {qd}')
  ratio = qs / qd
  ok = abs(ratio / pair.expected_ratio - 1.0) <= pair.tolerance * (1 + 1e-12)
  return PairResult(pair, counts['dense'], counts['sparse'], ratio, ok)


# -------------------------------------------------------------------------------- pair files


def load(path: str) -> Pair:
  """Reads a pair file (a gin file binding `Pair`)."""
  import gin
  from moescale import gin_config
  gin_config.parse([path], [], _search_paths(path), finalize=False)
  try:
    bindings = dict(gin.get_bindings('moescale.pairs.Pair'))
  finally:
    gin.clear_config()
  if not bindings:
    raise ValueError(f'{path} binds no Pair parameters (Pair.dense, Pair.sparse, Pair.match)')
  for key in ('dense', 'sparse'):
    if key not in bindings:
      raise ValueError(f'{path}: Pair.{key} is not bound')
  bindings.setdefault('name', pathlib.Path(path).stem)
  return Pair(**bindings)


def shipped_pair_files() -> list[str]:
  """Every gin/pairs/**/*.gin of the installed package, sorted."""
  from moescale import gin_config
  root = gin_config.shipped_gin_dir()
  if root is None or not (root / 'pairs').is_dir():
    return []
  return sorted(str(p) for p in (root / 'pairs').rglob('*.gin'))


def to_gin(pair: Pair) -> str:
  """The pair as a pair file's text."""
  lines = []
  if pair.description:
    lines += [f'# {line}'.rstrip() for line in pair.description.splitlines()]
  lines.append(f'Pair.name = {pair.name!r}')
  for side in SIDES:
    files, bindings = pair.member(side)
    lines.append(f'Pair.{side} = {list(files)!r}')
    if bindings:
      lines.append(f'Pair.{side}_bindings = {list(bindings)!r}')
  lines += [f'Pair.match = {pair.match!r}', f'Pair.convention = {pair.convention!r}',
            f'Pair.expected_ratio = {pair.expected_ratio!r}',
            f'Pair.tolerance = {pair.tolerance!r}']
  return '\n'.join(lines) + '\n'


# ------------------------------------------------------------------------------ derivation


def solve_integer(evaluate: Callable[[int], float], target: float, start: int,
                  multiple_of: int = 1, minimum: int = 1, max_steps: int = 64
                  ) -> tuple[int, float]:
  """The integer x (a multiple of `multiple_of`, >= minimum) with evaluate(x) nearest target.

  Assumes evaluate is monotone and roughly affine (parameters and FLOPs are affine in d_ff,
  expert_size and top_k): a secant step from two evaluations, then a walk to the best
  neighbour. A value for which evaluate raises ValueError (an impossible model, e.g. top_k
  above num_experts) is skipped. Returns (x, evaluate(x)).
  """
  if multiple_of < 1 or minimum < 1:
    raise ValueError(f'multiple_of={multiple_of} and minimum={minimum} must be >= 1')
  cache: dict[int, float | None] = {}

  def f(x: int) -> float | None:
    if x not in cache:
      try:
        cache[x] = float(evaluate(x))
      except ValueError:
        cache[x] = None
    return cache[x]

  def snap(x: float) -> int:
    return max(minimum, multiple_of * max(1, round(x / multiple_of)))

  x0 = snap(start)
  if f(x0) is None:
    evaluate(x0)  # raise the model's own error: the starting point must be valid
  x1 = next((x for x in (snap(2 * x0), x0 + multiple_of, x0 - multiple_of)
             if x != x0 and x >= minimum and f(x) is not None), None)
  if x1 is None:
    raise ValueError(f'no valid value next to {x0} to vary')
  slope = (f(x1) - f(x0)) / (x1 - x0)
  if slope == 0:
    raise ValueError('the matched quantity does not change with the varied value; vary '
                     'something the model uses')
  best = snap(x0 + (target - f(x0)) / slope)
  if f(best) is None:
    best = x0 if abs(f(x0) - target) <= abs(f(x1) - target) else x1
  for _ in range(max_steps):
    cands = [c for c in (best - multiple_of, best, best + multiple_of)
             if c >= minimum and f(c) is not None]
    nxt = min(cands, key=lambda c: (abs(f(c) - target), c))
    if nxt == best:
      break
    best = nxt
  return best, f(best)


def _current_value(name: str) -> int | None:
  """The value NAME (a macro, or Configurable.param) has in the parsed gin config."""
  import gin
  from moescale import gin_config
  if '.' in name:
    configurable, param = name.rsplit('.', 1)
    try:
      value = gin.get_bindings(configurable).get(param)
    except ValueError:
      return None
  else:
    value = gin_config.query(name)
  return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclasses.dataclass(frozen=True)
class Derivation:
  side: str
  name: str
  value: int
  pair: Pair
  result: PairResult


def derive(dense: Sequence[str], sparse: Sequence[str], vary: str, match: str,
           convention: str = 'standard', dense_bindings: Sequence[str] = (),
           sparse_bindings: Sequence[str] = (), multiple_of: int = 1,
           start: int | None = None, expected_ratio: float = 1.0,
           tolerance: float = 0.01, name: str = '') -> Derivation:
  """Finds the integer value of `vary` ('dense:D_FF', 'sparse:EXPERT_SIZE', ...) that makes
  quantity(sparse) / quantity(dense) closest to expected_ratio."""
  if ':' not in vary:
    raise ValueError(f"vary={vary!r}: expected SIDE:NAME, e.g. 'dense:D_FF' or "
                     "'sparse:EXPERT_SIZE'")
  side, var = vary.split(':', 1)
  if side not in SIDES:
    raise ValueError(f'vary side {side!r}; valid: {list(SIDES)}')
  if match not in MATCHES:
    raise ValueError(f'match={match!r}; valid: {list(MATCHES)}')
  members = {'dense': (tuple(dense), tuple(dense_bindings)),
             'sparse': (tuple(sparse), tuple(sparse_bindings))}
  other = 'sparse' if side == 'dense' else 'dense'
  ref = count_member(*members[other]).quantity(match, convention)
  # The varied side must reach ref * r (sparse side) or ref / r (dense side).
  target = ref * expected_ratio if side == 'sparse' else ref / expected_ratio
  files, bindings = members[side]
  if start is None:
    from moescale import gin_config
    gin_config.parse(list(files), list(bindings), finalize=False)
    start = _current_value(var)
    if start is None:
      raise ValueError(f'{var} is not bound to an int in {list(files)}; pass --start')

  def evaluate(x: int) -> float:
    return count_member(files, bindings + (f'{var} = {x}',)).quantity(match, convention)

  value, _ = solve_integer(evaluate, target, start, multiple_of)
  kw = {f'{side}_bindings': bindings + (f'{var} = {value}',),
        f'{other}_bindings': members[other][1]}
  pair = Pair(dense=tuple(dense), sparse=tuple(sparse), match=match, convention=convention,
              expected_ratio=expected_ratio, tolerance=tolerance,
              name=name or f'{side} {var} = {value}', **kw)
  return Derivation(side, var, value, pair, check(pair))


# ----------------------------------------------------------------------------------- output


def human(x: float, billion: str = 'B') -> str:
  """1234567 -> '1.23M' (3 significant digits); billions as 'B' (parameters) or 'G' (FLOPs)."""
  for div, unit in ((1e12, 'T'), (1e9, billion), (1e6, 'M'), (1e3, 'k')):
    if abs(x) >= div:
      return f'{x / div:.3g}{unit}'
  return f'{x:.3g}'


def format_table(results: Sequence[PairResult]) -> str:
  head = ('pair', 'match', 'params d/s', 'active d/s', 'train FLOPs/token d/s', 'ratio',
          'target', 'verdict')
  rows = []
  for r in results:
    p = r.pair
    what = p.match + (f' ({p.convention})' if p.match == 'train_flops' else '')
    flops = (r.dense.train_flops[p.convention], r.sparse.train_flops[p.convention])
    rows.append((p.name, what,
                 f'{human(r.dense.total_params)} / {human(r.sparse.total_params)}',
                 f'{human(r.dense.active_params)} / {human(r.sparse.active_params)}',
                 f"{human(flops[0], 'G')} / {human(flops[1], 'G')}",
                 f'{r.ratio:.5f}',
                 f'{p.expected_ratio:g} ± {100 * p.tolerance:g}%',
                 'ok' if r.ok else f'OFF ({100 * r.error:+.2f}%)'))
  widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
  fmt = '  '.join(f'{{:<{w}}}' for w in widths)
  lines = [fmt.format(*head), fmt.format(*('-' * w for w in widths))]
  lines += [fmt.format(*row) for row in rows]
  lines.append("d/s: dense / sparse member. train FLOPs/token: under the pair's convention "
               "('standard' = 3 x forward unless the pair names another); ratio: sparse / "
               'dense of the matched quantity.')
  return '\n'.join(lines)


# -------------------------------------------------------------------------------------- CLI


def _check_main(argv: Sequence[str]) -> int:
  p = argparse.ArgumentParser(prog='moescale pairs check',
                              description='check pair files (default: every shipped pair)')
  p.add_argument('files', nargs='*', help='pair files (gin); none: all of gin/pairs/')
  p.add_argument('--json', action='store_true', help='one JSON object per pair')
  args = p.parse_args(argv)
  files = args.files or shipped_pair_files()
  if not files:
    p.error('no pair files given and none shipped')
  results = []
  for f in files:
    path = _resolve_pair_file(f)
    results.append(check(load(path), path))
  if args.json:
    import json
    for r in results:
      print(json.dumps({'pair': r.pair.name, 'match': r.pair.match,
                        'convention': r.pair.convention, 'ratio': r.ratio,
                        'expected_ratio': r.pair.expected_ratio,
                        'tolerance': r.pair.tolerance, 'ok': r.ok,
                        'dense': dataclasses.asdict(r.dense),
                        'sparse': dataclasses.asdict(r.sparse)}))
  else:
    print(format_table(results))
  off = [r.pair.name for r in results if not r.ok]
  if off:
    print(f'{len(off)} of {len(results)} pairs off: {", ".join(off)}', file=sys.stderr)
    return 1
  return 0


def _resolve_pair_file(f: str) -> str:
  if os.path.isfile(f):
    return f
  from moescale import gin_config
  root = gin_config.shipped_gin_dir()
  for cand in ([root / f, root / 'pairs' / f] if root else []):
    if cand.is_file():
      return str(cand)
  raise FileNotFoundError(f'pair file {f!r} not found (shipped pairs: moescale pairs list)')


def _make_main(argv: Sequence[str]) -> int:
  p = argparse.ArgumentParser(
      prog='moescale pairs make',
      description='derive the partner value that matches a pair, e.g. the dense d_ff with '
                  'the parameters of a sparse model (--vary dense:D_FF --match total_params) '
                  'or the expert size with the FLOPs of a dense model (--vary '
                  'sparse:EXPERT_SIZE --match train_flops)')
  p.add_argument('--dense', nargs='+', required=True, help='gin files of the dense member')
  p.add_argument('--sparse', nargs='+', required=True, help='gin files of the sparse member')
  p.add_argument('--dense_binding', action='append', default=[], help='extra binding')
  p.add_argument('--sparse_binding', action='append', default=[], help='extra binding')
  p.add_argument('--vary', required=True,
                 help='SIDE:NAME, NAME a macro (D_FF) or Configurable.param (TopKMoE.top_k)')
  p.add_argument('--match', default='train_flops', choices=MATCHES)
  p.add_argument('--convention', default='standard', choices=CONVENTIONS)
  p.add_argument('--expected_ratio', type=float, default=1.0,
                 help='target sparse/dense ratio (default 1)')
  p.add_argument('--tolerance', type=float, default=0.01, help='for the written pair file')
  p.add_argument('--multiple_of', type=int, default=1, help='round the value to a multiple')
  p.add_argument('--start', type=int, default=None,
                 help='starting value (default: its value in the gin files)')
  p.add_argument('--name', default='', help='Pair.name for --write')
  p.add_argument('--write', default=None, help='write the matched pair file here')
  args = p.parse_args(argv)
  d = derive(args.dense, args.sparse, args.vary, args.match, args.convention,
             args.dense_binding, args.sparse_binding, args.multiple_of, args.start,
             args.expected_ratio, args.tolerance, args.name)
  r = d.result
  what = args.match + (f' ({args.convention})' if args.match == 'train_flops' else '')
  qd = r.dense.quantity(args.match, args.convention)
  qs = r.sparse.quantity(args.match, args.convention)
  print(f'{what}: dense {qd:,.0f}  sparse {qs:,.0f}  ratio {r.ratio:.6f} '
        f'(target {args.expected_ratio:g}, {100 * r.error:+.4f}%)')
  print(f'binding:    {d.name} = {d.value}')
  print(f'flag:       --gin.{d.name}={d.value}' if '.' not in d.name else
        f"flag:       --gin_bindings='{d.name} = {d.value}'")
  print(f"pair file:  Pair.{d.side}_bindings = {list(getattr(d.pair, d.side + '_bindings'))!r}")
  if args.write:
    os.makedirs(os.path.dirname(os.path.abspath(args.write)), exist_ok=True)
    with open(args.write, 'w') as f:
      f.write(to_gin(d.pair))
    print(f'wrote {args.write}')
  return 0


def _list_main(argv: Sequence[str]) -> int:
  argparse.ArgumentParser(prog='moescale pairs list').parse_args(argv)
  from moescale import gin_config
  root = gin_config.shipped_gin_dir()
  for f in shipped_pair_files():
    print(os.path.relpath(f, root) if root else f)
  return 0


_SUBCOMMANDS = {'check': _check_main, 'make': _make_main, 'list': _list_main}


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ('-h', '--help', 'help'):
    print(__doc__)
    return 0
  sub, rest = argv[0], argv[1:]
  if sub not in _SUBCOMMANDS:
    print(f"moescale pairs: unknown subcommand {sub!r}; valid: {', '.join(_SUBCOMMANDS)}",
          file=sys.stderr)
    return 2
  return _SUBCOMMANDS[sub](rest)
