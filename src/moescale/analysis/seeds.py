"""Runs of one configuration trained with different seeds, as one entry with a mean and a
spread: what a study with `ScalingStudy(seeds=...)` reports beside each run's own figures.

A record's `config` column names its configuration (a study's '<size>/<family>', else the run
itself) and `seed` its seed. Per (configuration, domain):

  speedups(analysis)   the speedup of the configuration's mean perplexity at its mean compute
                       against the dense curve (whose points are already means over seeds at
                       equal compute), and the range of its seeds' own factors
  matched(pairs)       the relative perplexity difference to the parameter-equal dense model,
                       (sparse / dense - 1), mean and range over the seed pairs
  noise(rows)          each configuration's perplexity spread: the seed noise a difference
                       between configurations has to stand out of

Spread: `Spread(n, mean, lo, hi, std)`, lo..hi the least and greatest value, std the sample
standard deviation (0 for one value). Worked example: perplexities 8.0, 8.2, 8.6 give mean 8.267,
range 8.0..8.6, std 0.306.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Iterable, Sequence

from moescale.analysis import speedup as speedup_lib


@dataclasses.dataclass(frozen=True)
class Spread:
  n: int
  mean: float
  lo: float
  hi: float
  std: float

  @classmethod
  def of(cls, values: Iterable[float]) -> Spread | None:
    """The spread of the finite values (None when there are none)."""
    xs = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    if not xs:
      return None
    return cls(len(xs), statistics.fmean(xs), min(xs), max(xs),
               statistics.stdev(xs) if len(xs) > 1 else 0.0)

  def text(self, spec: str = '.3f') -> str:
    """'8.267 (8.000..8.600, 3 seeds)', or the value alone for one seed."""
    if self.n == 1:
      return format(self.mean, spec)
    return f'{self.mean:{spec}} ({self.lo:{spec}}..{self.hi:{spec}}, {self.n} seeds)'


def config_of(row: dict) -> str:
  """A record's configuration: its `config` column, else its run."""
  return str(row.get('config') or row['run'])


def group(rows: Sequence[dict]) -> dict[tuple[str, str], list[dict]]:
  """{(configuration, domain): its rows}, in the order first seen."""
  out: dict[tuple[str, str], list[dict]] = {}
  for r in rows:
    out.setdefault((config_of(r), r['domain']), []).append(r)
  return out


def has_seeds(rows: Sequence[dict]) -> bool:
  """Whether some configuration has more than one run."""
  return any(len(g) > 1 for g in group(rows).values())


def noise(rows: Sequence[dict]) -> list[dict]:
  """Per (configuration, domain): family and the perplexity's Spread over its seeds."""
  return [{'config': c, 'domain': d, 'family': g[0]['family'],
           'perplexity': Spread.of(r['perplexity'] for r in g)}
          for (c, d), g in group(rows).items()]


def _factor_values(factors: Sequence[dict]) -> tuple[Spread | None, list[str]]:
  """(Spread of the seeds' factors that have a value, the bounds of those that have none)."""
  values = [f['speedup'] for f in factors if f.get('speedup') is not None]
  bounds = [f"{'>' if f['bound_kind'] == 'lower' else '<'}{f['bound']:.2f}" for f in factors
            if f.get('speedup') is None and f.get('bound') is not None]
  return Spread.of(values), bounds


def speedups(analysis: speedup_lib.Analysis) -> list[dict]:
  """Per non-reference (configuration, domain): family, seeds, perplexity Spread, and for
  each measure ('flops', 'seconds') the factor of the mean perplexity at the mean compute
  ('<measure>': a Factor as a dict) with the seeds' own factors ('<measure>_seeds': Spread of
  those with a value; '<measure>_bounds': the bounds of those outside the dense range)."""
  out = []
  for (config, domain), group_ in group(analysis.speedups).items():
    p = Spread.of(s['perplexity'] for s in group_)
    entry = {'config': config, 'domain': domain, 'family': group_[0]['family'],
             'train_task': group_[0].get('train_task'),
             'seeds': [s.get('seed') for s in group_], 'perplexity': p}
    for measure, column in speedup_lib.MEASURES.items():
      compute = Spread.of(s.get(column) for s in group_)
      entry[measure] = dataclasses.asdict(speedup_lib.factor(
          analysis.curves.get((domain, measure)), compute and compute.mean, p.mean))
      entry[f'{measure}_seeds'], entry[f'{measure}_bounds'] = _factor_values(
          [s[measure] for s in group_])
    out.append(entry)
  return out


def matched(pairs: Sequence[dict]) -> list[dict]:
  """Per (sparse configuration, domain) of the parameter-matched pairs: family, the dense
  configuration, sparse and dense perplexity Spreads, and 'relative': the Spread of
  sparse / dense - 1 over the pairs (each seed against its dense pair)."""
  out = []
  for (config, domain), g in group(pairs).items():
    out.append({'config': config, 'domain': domain, 'family': g[0]['family'],
                'train_task': g[0].get('train_task'),
                'dense_config': g[0].get('dense_config') or g[0]['dense_run'],
                'perplexity': Spread.of(p['perplexity'] for p in g),
                'dense_perplexity': Spread.of(p['dense_perplexity'] for p in g),
                'relative': Spread.of(p['perplexity'] / p['dense_perplexity'] - 1 for p in g)})
  return out
