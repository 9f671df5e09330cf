"""The matching arithmetic of pairs: counted quantities, ratios, integer solving, the table.

Pure Python on numbers that `members` has counted: no gin, no model, so every rule here
(which quantity a match compares, when a ratio is within tolerance, how an integer knob is
solved for, how results print) can be read and tested without parsing a gin file.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from moescale.pairs.spec import MATCHES, Pair


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


def compare(pair: Pair, dense: MemberCount, sparse: MemberCount) -> PairResult:
  """The pair's verdict on two counted members: the ratio of the matched quantity."""
  qd = dense.quantity(pair.match, pair.convention)
  qs = sparse.quantity(pair.match, pair.convention)
  if qd <= 0:
    raise ValueError(f'{pair.name}: the dense member has {pair.match} = {qd}')
  ratio = qs / qd
  ok = abs(ratio / pair.expected_ratio - 1.0) <= pair.tolerance * (1 + 1e-12)
  return PairResult(pair, dense, sparse, ratio, ok)


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
