"""Pair members from gin: reading pair files, counting each member, deriving a partner.

Everything here parses gin (through `moescale.gin_config`, which registers `Pair` for pair
files when this module loads) and hands the counts to `matching`. Counting is abstract
(`moescale.accounting`) and cached per member, so checking every shipped pair, or solving
for a partner's integer knob, takes seconds.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Sequence

from moescale import gin_config
from moescale.pairs.matching import MemberCount, PairResult, compare, solve_integer
from moescale.pairs.spec import MATCHES, SIDES, Pair

gin_config.register_configurable(Pair, module='moescale.pairs')

# ------------------------------------------------------------------------------- counting


def context_lengths() -> tuple[int, int | None]:
  """(keys per query, queries per segment) for attention FLOPs, from the parsed gin config.

  Segment length: TASK_FEATURE_LENGTHS['targets'] when a run file binds it, else the model's
  SEGMENT_LENGTH (Transformer-XL settings); keys = segment + MEM_LEN. Without either,
  MAX_LENGTH (the Artetxe models: 2048).
  """
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
  from moescale import accounting
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
  return compare(pair, counts['dense'], counts['sparse'])


# -------------------------------------------------------------------------------- pair files


def load(path: str) -> Pair:
  """Reads a pair file (a gin file binding `Pair`)."""
  import gin
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
  root = gin_config.shipped_gin_dir()
  if root is None or not (root / 'pairs').is_dir():
    return []
  return sorted(str(p) for p in (root / 'pairs').rglob('*.gin'))


# ------------------------------------------------------------------------------ derivation


def _current_value(name: str) -> int | None:
  """The value NAME (a macro, or Configurable.param) has in the parsed gin config."""
  import gin
  if '.' in name:
    configurable, param = name.rsplit('.', 1)
    try:
      value = gin.get_bindings(configurable).get(param)
    except ValueError:
      return None
  else:
    value = gin_config.query(name)
  return value if isinstance(value, int) and not isinstance(value, bool) else None


def _start_value(files: Sequence[str], bindings: Sequence[str], name: str) -> int:
  """Where the search for NAME starts: its value in the member's own gin files."""
  gin_config.parse(list(files), list(bindings), finalize=False)
  start = _current_value(name)
  if start is None:
    raise ValueError(f'{name} is not bound to an int in {list(files)}; pass --start')
  return start


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
    start = _start_value(files, bindings, var)

  def evaluate(x: int) -> float:
    return count_member(files, bindings + (f'{var} = {x}',)).quantity(match, convention)

  value, _ = solve_integer(evaluate, target, start, multiple_of)
  kw = {f'{side}_bindings': bindings + (f'{var} = {value}',),
        f'{other}_bindings': members[other][1]}
  pair = Pair(dense=tuple(dense), sparse=tuple(sparse), match=match, convention=convention,
              expected_ratio=expected_ratio, tolerance=tolerance,
              name=name or f'{side} {var} = {value}', **kw)
  return Derivation(side, var, value, pair, check(pair))
