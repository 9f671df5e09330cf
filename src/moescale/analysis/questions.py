"""The two papers' questions, answered from a report's runs, whatever the answers are.

Artetxe et al. 2022 (compute-matched):
  1. Does the top-k MoE reach the dense models' perplexity with less training compute
     (speedup above 1)? Their 1.1T MoE has a speedup of about 4-16x in-domain (Sec. 3.1).
  2. Is the speedup larger in-domain than out of domain? In their Fig. 2 / Table 3 it is
     (in-domain up to 16x, out-of-domain smaller).
Csordás et al. 2023 (parameter-matched):
  3. Is the σ-MoE within a few percent (FEW_PERCENT) of the perplexity of the dense model with
     the same parameters, or better? (Table 2: it matches or beats dense.)
  4. Does the product-key memory with ReLU scores beat the same memory with softmax scores
     (Lample et al.'s)? (Table 3 / Sec. 5: ReLU is better.)

Each answer reads every seed: 'yes' when the claim holds for every seed (every pair of seeds:
an MoE seed's in-domain factor against its own out-of-domain ones; a σ-MoE seed against its
dense seed; a ReLU PKM seed against the softmax PKM of the same seed), 'no' when it fails for
every one, 'not separated' when the seeds disagree (the difference is inside the seed noise),
'not measured' when the runs lack the families or domains. One seed gives a yes or a no with
no spread, and says so. Families are found by name (`ROLES`: a study's family names and the
FFN class names `collect` derives for runs without one).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

from moescale.analysis import seeds as seeds_lib
from moescale.analysis.tables import factor_text, percent

FEW_PERCENT = 0.03
ROLES = {'moe': ('moe', 'TopKMoE'), 'sigma_moe': ('sigma_moe', 'SigmaMoE'),
         'pkm_relu': ('pkm',), 'pkm_softmax': ('pkm_softmax',)}


@dataclasses.dataclass(frozen=True)
class Answer:
  paper: str
  question: str
  answer: str              # 'yes' | 'no' | 'not separated' | 'not measured'
  evidence: tuple[str, ...]
  seeds: int = 0           # comparisons the verdict rests on


def in_domain(row: Mapping) -> bool:
  """Whether a record's domain is a split of the task its run trained on."""
  task = row.get('train_task')
  return bool(task) and str(row['domain']).split(':')[0] == task


def verdict(checks: Sequence[bool | None]) -> str:
  """'yes' if every check holds, 'no' if none does, else 'not separated'; None checks (a
  comparison of two bounds that overlap) count as disagreeing."""
  if not checks:
    return 'not measured'
  if all(c is True for c in checks):
    return 'yes'
  if all(c is False for c in checks):
    return 'no'
  return 'not separated'


def _interval(f: Mapping) -> tuple[float, float] | None:
  """A factor as the interval it pins the speedup to: a value, or a bound's open side."""
  if f.get('speedup') is not None:
    return f['speedup'], f['speedup']
  if f.get('bound') is None:
    return None
  # A bound is strict (a run past every dense run has speedup > C_max / C_s, not >=): moved
  # off by a hair, '<1.00' reads as below 1.
  b = f['bound']
  return (b * (1 + 1e-12), math.inf) if f['bound_kind'] == 'lower' else (0.0, b * (1 - 1e-12))


def greater(a: Mapping, b: Mapping | float) -> bool | None:
  """Whether factor a is above factor (or number) b: None where their intervals overlap."""
  ia = _interval(a)
  ib = (b, b) if isinstance(b, (int, float)) else _interval(b)
  if ia is None or ib is None:
    return None
  if ia[0] > ib[1]:
    return True
  if ia[1] < ib[0]:
    return False
  return None


def _one_seed(answer: str, runs: int) -> str:
  return answer + (' (one seed: no spread)' if runs == 1 and answer in ('yes', 'no') else '')


def speedup_questions(report, roles=ROLES) -> list[Answer]:
  """Questions 1 and 2 from the report's speedup analysis."""
  q1 = 'Does the top-k MoE need less training compute than dense for its perplexity (speedup > 1)?'
  q2 = 'Is the MoE speedup larger in-domain than out of domain?'
  a = report.analysis
  moe = [] if a is None else [s for s in a.speedups if s['family'] in roles['moe']]
  if not moe:
    return [Answer('Artetxe et al. 2022', q, 'not measured', ('no top-k MoE run with a dense '
                                                             'curve',)) for q in (q1, q2)]
  entries = [e for e in seeds_lib.speedups(a) if e['family'] in roles['moe']]
  inside = [e for e in entries if in_domain(e)]
  c1 = [greater(s['flops'], 1.0) for s in moe if in_domain(s)]
  ev1 = [f"{e['config']}, {e['domain']}: {factor_text(e, 'flops')} in FLOPs, "
         f"{factor_text(e, 'seconds')} in device-seconds; perplexity {e['perplexity'].text()}"
         for e in inside]
  by_seed = {(seeds_lib.config_of(s), s.get('seed'), s['domain']): s for s in moe}
  c2, ev2 = [], []
  for e in inside:
    for o in (o for o in entries if o['config'] == e['config'] and not in_domain(o)):
      checks = [greater(by_seed[e['config'], seed, e['domain']]['flops'],
                        by_seed[e['config'], seed, o['domain']]['flops'])
                for seed in e['seeds'] if (e['config'], seed, o['domain']) in by_seed]
      c2 += checks
      ev2.append(f"{e['config']}: in-domain {factor_text(e, 'flops')} vs {o['domain']} "
                 f"{factor_text(o, 'flops')} (FLOPs): {verdict(checks)}, in-domain larger "
                 f"for {sum(c is True for c in checks)} of {len(checks)} seeds")
  runs = max((len(e['seeds']) for e in inside), default=0)
  return [Answer('Artetxe et al. 2022', q1, _one_seed(verdict(c1), runs),
                 tuple(ev1) or ('no in-domain evaluation (a domain of the training task)',),
                 len(c1)),
          Answer('Artetxe et al. 2022', q2, _one_seed(verdict(c2), runs),
                 tuple(ev2) or ('no in-domain and out-of-domain evaluation of the same run',),
                 len(c2))]


def sigma_question(report, roles=ROLES, few_percent=FEW_PERCENT) -> Answer:
  """Question 3 from the parameter-matched pairs, in-domain."""
  q = (f'Is the σ-MoE within {100 * few_percent:g}% of the parameter-equal dense model\'s '
       'perplexity, or better?')
  pairs = [p for p in report.pairs if p['family'] in roles['sigma_moe']]
  groups = [g for g in seeds_lib.matched(pairs) if in_domain(g)]
  inside = [p for p in pairs if in_domain(p)]
  checks = [p['perplexity'] / p['dense_perplexity'] - 1 <= few_percent for p in inside]
  evidence = tuple(
      f"{g['config']} vs {g['dense_config']}, {g['domain']}: perplexity "
      f"{g['perplexity'].text()} vs {g['dense_perplexity'].text()}; sparse / dense - 1 = "
      f"{percent(g['relative'])}" for g in groups)
  runs = max((g['perplexity'].n for g in groups), default=0)
  return Answer('Csordás et al. 2023', q, _one_seed(verdict(checks), runs),
                evidence or ('no σ-MoE run with a parameter-equal dense run in-domain',),
                len(checks))


def pkm_question(report, roles=ROLES) -> Answer:
  """Question 4: ReLU against softmax PKM runs of the same parameters and seed, in-domain."""
  q = 'Does the PKM with ReLU scores beat the same PKM with softmax scores?'
  rows = [] if report.analysis is None else [r for r in report.analysis.rows if in_domain(r)]
  relu = [r for r in rows if r['family'] in roles['pkm_relu']]
  soft = {(r.get('seed'), r.get('params'), r['domain']): r for r in rows
          if r['family'] in roles['pkm_softmax']}
  paired = [(r, soft[key]) for r in relu
            if (key := (r.get('seed'), r.get('params'), r['domain'])) in soft]
  checks = [r['perplexity'] < s['perplexity'] for r, s in paired]
  evidence = []
  for (config, domain), g in seeds_lib.group([r for r, _ in paired]).items():
    other = [s for r, s in paired if seeds_lib.config_of(r) == config and r['domain'] == domain]
    evidence.append(
        f"{config} vs {seeds_lib.config_of(other[0])}, {domain}: perplexity "
        f"{seeds_lib.Spread.of(r['perplexity'] for r in g).text()} vs "
        f"{seeds_lib.Spread.of(s['perplexity'] for s in other).text()}")
  runs = max((len(g) for g in seeds_lib.group([r for r, _ in paired]).values()), default=0)
  return Answer('Csordás et al. 2023', q, _one_seed(verdict(checks), runs),
                tuple(evidence) or ('no ReLU and softmax PKM runs of the same size and seed',),
                len(checks))


def answer(report, roles: Mapping[str, Sequence[str]] = ROLES,
           few_percent: float = FEW_PERCENT) -> list[Answer]:
  """The four answers (module docstring) from a `report.Report`."""
  return [*speedup_questions(report, roles), sigma_question(report, roles, few_percent),
          pkm_question(report, roles)]


def render_md(answers: Sequence[Answer]) -> list[str]:
  lines = ["## The papers' questions, as measured here", '',
           'Each answer holds for every seed ("yes"), for none ("no"), or the seeds disagree '
           '("not separated": the difference is within the seed noise).', '']
  for a in answers:
    lines += [f'- **{a.paper}: {a.question}** {a.answer}.']
    lines += [f'  - {e}' for e in a.evidence]
  return lines + ['']


def render_text(answers: Sequence[Answer]) -> str:
  lines = ["The papers' questions, as measured (yes / no: for every seed; not separated: the "
           'seeds disagree):']
  for a in answers:
    lines += [f'- {a.paper}: {a.question} {a.answer.upper()}']
    lines += [f'    {e}' for e in a.evidence]
  return '\n'.join(lines)
