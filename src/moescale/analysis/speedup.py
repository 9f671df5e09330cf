"""Speedup factors (Artetxe et al. 2022): how much less training compute a sparse run needs than
dense runs for the same perplexity, per evaluation domain, in FLOPs and in measured
device-seconds.

For one domain and one measure of compute C (a record's `train_flops`, or `device_seconds`)
the dense runs make the reference curve: perplexity linear in log C between neighbouring dense
runs (`DenseCurve`; dense runs at the same C are averaged). A run with compute C_s and
perplexity p has

    speedup = C_d(p) / C_s,   C_d(p) = the least compute at which the dense curve reaches p.

The factor is 'interpolated' when the curve reaches p within the dense runs. Otherwise it is
'out_of_range', with no factor but a bound: a run better than every dense run has
speedup > C_max / C_s (bound_kind 'lower'); one worse than the least-compute dense run has
speedup < C_min / C_s ('upper'). 'no_curve': the domain has fewer than 2 dense runs at distinct
compute in that measure; 'no_data': the run has no value of that measure.

Worked example (one domain, FLOPs):
    dense    1e18 FLOPs -> ppl 20,   2e18 -> 16,   4e18 -> 13
    moe_a    1e18, ppl 16     C_d = 2e18                                   speedup 2.0
    moe_b    1e18, ppl 14.5   halfway from 16 to 13, so halfway from log 2e18 to log 4e18:
                              C_d = 2e18 * sqrt(2) = 2.83e18              speedup 2.83
    moe_c    1e18, ppl 12     better than every dense run: 'out_of_range', speedup > 4.0
  The power law fitted to the dense runs is ppl = 7.82e6 * C^-0.3107; it gives moe_a
  speedup 2.03 ('interpolated': C_d = 2.03e18 lies within 1e18..4e18) and moe_c 5.13
  ('extrapolated': C_d = 5.13e18 lies past the largest dense run).
  In device-seconds, with the dense runs at 100, 200, 400 s and moe_a at 150 s: the dense
  curve needs 200 s for ppl 16, so moe_a's speedup is 200 / 150 = 1.33 there: the 2x in FLOPs
  shrinks to 1.33x on the hardware that measured it.

The fit (`PowerLaw`, `fit='powerlaw'`): ppl = a * C^-b, a straight line in log-log space fitted
by least squares to the domain's dense runs. Chosen over the saturating a * C^-b + c because
two runs (the fewest any curve has) define it, it fits in closed form, and it inverts for every
perplexity, so each factor gets a value: 'interpolated' where C_d lies within the dense runs'
compute, 'extrapolated' (marked so) outside it. The irreducible term c takes more and more
widely spread runs to pin down than a study's handful of dense models.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Sequence

import numpy as np

REQUIRED = ('run', 'family', 'train_flops', 'perplexity')
OPTIONAL = ('domain', 'device_seconds', 'params')
MEASURES = {'flops': 'train_flops', 'seconds': 'device_seconds'}  # measure -> column
FITS = ('powerlaw',)
DEFAULT_DOMAIN = 'all'


@dataclasses.dataclass(frozen=True)
class Factor:
  """One run's speedup in one measure. status: 'interpolated' | 'extrapolated' (a fit only) |
  'out_of_range' | 'no_curve' | 'no_data' (see the module docstring). dense: the dense compute
  needed for the run's perplexity (FLOPs or device-seconds). bound: for 'out_of_range', the
  limit of the speedup, 'lower' (speedup > bound) or 'upper' (speedup < bound) by bound_kind."""
  status: str
  dense: float | None = None
  speedup: float | None = None
  bound: float | None = None
  bound_kind: str | None = None


@dataclasses.dataclass(frozen=True)
class DenseCurve:
  """Perplexity piecewise linear in log compute through the dense runs (ascending compute)."""
  compute: tuple[float, ...]
  perplexity: tuple[float, ...]

  @classmethod
  def from_points(cls, points: Iterable[tuple[float, float]]) -> DenseCurve:
    """From (compute, perplexity) pairs; those at equal compute (seeds) are averaged. A
    ValueError when fewer than 2 distinct compute values remain."""
    by_c: dict[float, list[float]] = {}
    for c, p in points:
      by_c.setdefault(float(c), []).append(float(p))
    if len(by_c) < 2:
      raise ValueError(f'{len(by_c)} distinct compute value(s) where a curve needs 2')
    xs = sorted(by_c)
    return cls(tuple(xs), tuple(float(np.mean(by_c[x])) for x in xs))

  def rises(self) -> list[tuple[float, float, float, float]]:
    """(c0, p0, c1, p1) for each step up the curve, where more compute gave a worse perplexity
    (p1 > p0): a curve like that reads a perplexity at the first compute that reaches it, and
    a sparse run past the rise may get a bound instead of a factor."""
    pts = list(zip(self.compute, self.perplexity))
    return [(c0, p0, c1, p1) for (c0, p0), (c1, p1) in zip(pts, pts[1:]) if p1 > p0]

  def perplexity_at(self, c: float) -> float:
    """The curve at compute c (within the dense runs' range; plotting)."""
    return float(np.interp(math.log(c), np.log(self.compute), self.perplexity))

  def needed(self, p: float) -> Factor:
    """The least compute at which the curve reaches perplexity p (Factor without speedup)."""
    cs, ps = self.compute, self.perplexity
    if ps[0] <= p:
      # The smallest dense run already reaches p: exact only when it is p itself.
      if ps[0] == p:
        return Factor('interpolated', dense=cs[0])
      return Factor('out_of_range', dense=None, bound=cs[0], bound_kind='upper')
    for (c0, p0), (c1, p1) in zip(zip(cs, ps), zip(cs[1:], ps[1:])):
      if p1 == p:  # a dense run's own perplexity: its compute exactly, not via exp(log c)
        return Factor('interpolated', dense=c1)
      if p1 < p:  # the first segment that comes down to p (p0 > p here): linear in log C
        return Factor('interpolated', dense=c0 * (c1 / c0) ** ((p0 - p) / (p0 - p1)))
    return Factor('out_of_range', dense=None, bound=cs[-1], bound_kind='lower')


@dataclasses.dataclass(frozen=True)
class PowerLaw:
  """ppl = a * C^-b, fitted in log-log space; lo..hi: the dense runs' compute range."""
  a: float
  b: float
  lo: float
  hi: float

  @classmethod
  def fit(cls, points: Sequence[tuple[float, float]]) -> PowerLaw:
    """Least squares of log ppl on log C. A ValueError when fewer than 2 distinct compute
    values are given or when perplexity does not fall with compute (b <= 0)."""
    c = np.array([p[0] for p in points], float)
    p = np.array([p[1] for p in points], float)
    if len(set(c.tolist())) < 2:
      raise ValueError(f'{len(set(c.tolist()))} distinct compute value(s) where a fit needs 2')
    slope, intercept = np.polyfit(np.log(c), np.log(p), 1)
    # Falling by more than rounding over the runs' range: equal perplexities fit a slope of
    # +-1e-17, whose inverse would put every run at an absurd compute.
    if not -slope * math.log(c.max() / c.min()) > 1e-9:
      raise ValueError(f'dense perplexity does not fall with compute (fitted exponent '
                       f'b = {-slope:.4g}); no power law to read speedups from')
    return cls(a=float(math.exp(intercept)), b=float(-slope), lo=float(c.min()),
               hi=float(c.max()))

  def perplexity_at(self, c: float) -> float:
    return self.a * c ** -self.b

  def needed(self, p: float) -> Factor:
    c = (self.a / p) ** (1.0 / self.b)
    # Relative slack: C_d computed back from a dense run's own fitted value lands on its edge.
    inside = self.lo * (1 - 1e-9) <= c <= self.hi * (1 + 1e-9)
    return Factor('interpolated' if inside else 'extrapolated', dense=c)


def factor(reference: DenseCurve | PowerLaw | None, compute: float | None, p: float) -> Factor:
  """The speedup of a run with `compute` and perplexity p against a dense reference."""
  if reference is None:
    return Factor('no_curve')
  if compute is None:
    return Factor('no_data')
  f = reference.needed(p)
  if f.dense is not None:
    return dataclasses.replace(f, speedup=f.dense / compute)
  return dataclasses.replace(f, bound=f.bound / compute)


@dataclasses.dataclass
class Analysis:
  """What `analyse` returns. rows: the validated records; curves / fits: by (domain, measure);
  speedups: one JSON-able dict per (non-reference run, domain); notes: what could not be
  computed and why, one line each."""
  rows: list[dict]
  reference: str
  fit: str | None
  curves: dict[tuple[str, str], DenseCurve]
  fits: dict[tuple[str, str], PowerLaw]
  speedups: list[dict]
  notes: list[str]

  @property
  def domains(self) -> list[str]:
    return list(dict.fromkeys(r['domain'] for r in self.rows))


def analyse(records: Sequence[dict], reference: str = 'dense', fit: str | None = None,
            source: str = 'records') -> Analysis:
  """Speedup of every run not of the `reference` family, per domain (module docstring).
  fit: None or 'powerlaw' (each record also gets fit_flops / fit_seconds). source names the
  input in errors."""
  if fit is not None and fit not in FITS:
    raise ValueError(f'fit={fit!r}; valid: None or {list(FITS)}')
  rows = validate(records, reference, source)
  curves, fits, notes = {}, {}, []
  for domain in dict.fromkeys(r['domain'] for r in rows):
    dense = [r for r in rows if r['domain'] == domain and r['family'] == reference]
    for measure, column in MEASURES.items():
      points = [(r[column], r['perplexity']) for r in dense if r.get(column) is not None]
      if measure == 'seconds' and not points:
        continue  # no device-seconds in this file: nothing to say per domain
      try:
        curves[domain, measure] = DenseCurve.from_points(points)
        rises = curves[domain, measure].rises() if measure == 'flops' else []
        if rises:
          notes.append(f'domain {domain!r}: the {reference} perplexity does not fall with '
                       'compute (' + '; '.join(f'{p0:.4g} at {c0:.3g} FLOPs, {p1:.4g} at '
                                               f'{c1:.3g}' for c0, p0, c1, p1 in rises)
                       + '): speedups read off this curve are less reliable there')
        if fit:
          fits[domain, measure] = PowerLaw.fit(points)
      except ValueError as e:
        what = 'fit' if (domain, measure) in curves else 'curve'
        notes.append(f'domain {domain!r}, {column}: {len(points)} {reference} run(s), {e}: '
                     f'no {reference} {what}, so no {"fitted " * (what == "fit")}speedup in '
                     f'{column} there')
  if not any(m == 'flops' for _, m in curves):
    counts = {d: sum(r['family'] == reference for r in rows if r['domain'] == d)
              for d in dict.fromkeys(r['domain'] for r in rows)}
    raise ValueError(f'{source}: no domain has a dense curve (it needs 2 {reference!r} runs at '
                     f'distinct train_flops); {reference} runs per domain: {counts}')
  speedups = [_speedup_record(r, curves, fits, fit) for r in rows if r['family'] != reference]
  return Analysis(rows, reference, fit, curves, fits, speedups, notes)


def _speedup_record(r: dict, curves: dict, fits: dict, fit: str | None) -> dict:
  out = {k: r.get(k) for k in ('run', 'family', 'config', 'seed', 'train_task', 'domain',
                               'perplexity', 'train_flops', 'device_seconds')}
  for measure, column in MEASURES.items():
    key = (r['domain'], measure)
    out[measure] = dataclasses.asdict(factor(curves.get(key), r.get(column), r['perplexity']))
    if fit:
      out[f'fit_{measure}'] = dataclasses.asdict(
          factor(fits.get(key), r.get(column), r['perplexity']))
  out['speedup'] = out['flops']['speedup']
  out['speedup_seconds'] = out['seconds']['speedup']
  return out


def validate(records: Sequence[dict], reference: str = 'dense', source: str = 'records'
             ) -> list[dict]:
  """Copies of the records with every required column present and valid: run and family
  named, train_flops and perplexity positive finite numbers, device_seconds and params such
  numbers or empty, domain defaulting to 'all', no (run, domain) twice, and both the reference
  family and another present. A ValueError naming the bad value and what is valid otherwise."""
  if not records:
    raise ValueError(f'{source}: no records')
  columns = list(dict.fromkeys(k for r in records for k in r))
  missing = [c for c in REQUIRED if c not in columns]
  if missing:
    raise ValueError(f'{source}: missing column(s) {missing}; it has {columns}; needed: '
                     f'{list(REQUIRED)} (optional: {list(OPTIONAL)})')
  rows, seen = [], set()
  for r in records:
    row = dict(r, domain=str(r.get('domain') or DEFAULT_DOMAIN))
    where = f'{source}: run {row.get("run")!r}, domain {row["domain"]!r}'
    for key in ('run', 'family'):
      if row.get(key) in (None, ''):
        raise ValueError(f'{where}: empty {key}; every record names its run and family')
      row[key] = str(row[key])
    for key, required in (('train_flops', True), ('perplexity', True),
                          ('device_seconds', False), ('params', False)):
      row[key] = _positive(row.get(key), key, where, required)
    if (row['run'], row['domain']) in seen:
      raise ValueError(f'{where}: given twice; one record per (run, domain)')
    seen.add((row['run'], row['domain']))
    rows.append(row)
  families = sorted({r['family'] for r in rows})
  if reference not in families:
    raise ValueError(f'{source}: no run of the reference family {reference!r}; families: '
                     f'{families} (choose the reference with --reference)')
  if families == [reference]:
    raise ValueError(f'{source}: every run is of the reference family {reference!r}: nothing '
                     'to compare')
  return rows


def _positive(value, key: str, where: str, required: bool) -> float | None:
  if value is None or value == '':
    if required:
      raise ValueError(f'{where}: {key} is empty; it must be a positive number')
    return None
  try:
    x = float(value)
  except (TypeError, ValueError):
    raise ValueError(f'{where}: {key}={value!r} is not a number; it must be a positive '
                     'number') from None
  if isinstance(value, bool) or not (math.isfinite(x) and x > 0):
    raise ValueError(f'{where}: {key}={value!r}; it must be a positive finite number')
  return x
