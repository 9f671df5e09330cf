"""Seeds grouped into configurations (moescale.analysis.seeds) and the papers' questions answered
from them (moescale.analysis.questions), on hand-made records whose answers are worked out
here."""

import math
import types

import pytest

from moescale.analysis import matched, questions, seeds, speedup, tables

SOTU, KJV = 'sotu:validation', 'kjv:validation'


def _row(run, family, domain, flops, ppl, seed, params=1000.0, config=None):
  return {'run': run, 'family': family, 'config': config or run.rsplit('/', 1)[0], 'seed': seed,
          'train_task': 'sotu', 'domain': domain, 'train_flops': flops, 'perplexity': ppl,
          'params': params}


def _dense():
  """Dense at 1e18 and 4e18 FLOPs, two seeds each: mean ppl 21 and 14 in-domain, 30 and 20
  out of domain; the small one has 1000 parameters, the large one 4000."""
  out = []
  for seed, (a, b, c, d) in enumerate([(20, 13, 29, 19), (22, 15, 31, 21)]):
    out += [_row(f's/dense/seed{seed}', 'dense', SOTU, 1e18, a, seed),
            _row(f's/dense/seed{seed}', 'dense', KJV, 1e18, c, seed),
            _row(f'l/dense/seed{seed}', 'dense', SOTU, 4e18, b, seed, params=4000.0),
            _row(f'l/dense/seed{seed}', 'dense', KJV, 4e18, d, seed, params=4000.0)]
  return out


def _report(rows, tolerance=0.01):
  analysis = speedup.analyse(rows)
  flops_matched = {r['run'] for r in rows if r['family'] == 'moe'}
  candidates = [r for r in rows if r['run'] not in flops_matched]
  pairs = []
  if any(r['family'] != 'dense' for r in candidates):   # as report.build_report does
    pairs, _ = matched.param_matched(candidates, tolerance=tolerance)
  return types.SimpleNamespace(analysis=analysis, pairs=pairs, rows=analysis.rows)


def test_spread_worked_example():
  s = seeds.Spread.of([8.0, 8.2, 8.6])
  assert (s.n, s.lo, s.hi) == (3, 8.0, 8.6)
  assert s.mean == pytest.approx(8.26667, abs=1e-5) and s.std == pytest.approx(0.30551, abs=1e-5)
  assert s.text() == '8.267 (8.000..8.600, 3 seeds)'
  assert seeds.Spread.of([2.5]).std == 0.0 and seeds.Spread.of([2.5]).text() == '2.500'
  assert seeds.Spread.of([None, float('nan')]) is None


def test_speedup_of_a_configuration_is_its_mean_against_the_mean_dense_curve():
  rows = _dense() + [_row('s/moe/seed0', 'moe', SOTU, 1e18, 16, 0),
                     _row('s/moe/seed1', 'moe', SOTU, 1e18, 18, 1)]
  entry, = seeds.speedups(speedup.analyse(rows))
  # Dense means: 21 at 1e18, 14 at 4e18. Mean MoE ppl 17 lies 4/7 of the way down in log C.
  assert entry['config'] == 's/moe' and entry['seeds'] == [0, 1]
  assert entry['flops']['speedup'] == pytest.approx(4 ** (4 / 7))
  assert entry['flops_seeds'].lo == pytest.approx(4 ** (3 / 7))    # ppl 18
  assert entry['flops_seeds'].hi == pytest.approx(4 ** (5 / 7))    # ppl 16
  assert entry['perplexity'].mean == 17 and entry['flops_bounds'] == []
  assert seeds.has_seeds(rows) and not seeds.has_seeds(rows[:1])


def test_bounds_are_kept_beside_the_seed_range():
  rows = _dense() + [_row('s/moe/seed0', 'moe', SOTU, 1e18, 12, 0),    # past every dense run
                     _row('s/moe/seed1', 'moe', SOTU, 1e18, 16, 1)]
  entry, = seeds.speedups(speedup.analyse(rows))
  assert entry['flops_bounds'] == ['>4.00'] and entry['flops_seeds'].n == 1
  # The mean, 14, is the large dense run's own: 4.00 exactly; one seed a value, one a bound.
  assert tables.factor_text(entry, 'flops') == '4.00 (seed 2.69; bounds >4.00)'


@pytest.mark.parametrize('checks, want', [
    ([True, True], 'yes'), ([False, False], 'no'), ([True, False], 'not separated'),
    ([True, None], 'not separated'), ([], 'not measured')])
def test_verdict(checks, want):
  assert questions.verdict(checks) == want


def test_greater_reads_bounds_as_strict_intervals():
  value = lambda x: {'speedup': x}
  lower = lambda b: {'speedup': None, 'bound': b, 'bound_kind': 'lower'}
  upper = lambda b: {'speedup': None, 'bound': b, 'bound_kind': 'upper'}
  assert questions.greater(value(1.5), 1.0) is True
  assert questions.greater(value(0.9), 1.0) is False
  assert questions.greater(lower(1.0), 1.0) is True       # speedup > 1.00
  assert questions.greater(upper(1.0), 1.0) is False      # speedup < 1.00
  assert questions.greater(value(1.5), lower(2.0)) is False
  assert questions.greater(lower(2.0), lower(3.0)) is None  # both unbounded above
  assert questions.greater({'speedup': None}, 1.0) is None


def _moe(in_domain, out_domain):
  """MoE seeds at 1e18 FLOPs with these in-domain / out-of-domain perplexities."""
  return [r for seed, (a, b) in enumerate(zip(in_domain, out_domain))
          for r in (_row(f's/moe/seed{seed}', 'moe', SOTU, 1e18, a, seed),
                    _row(f's/moe/seed{seed}', 'moe', KJV, 1e18, b, seed))]


def test_artetxe_questions():
  # In-domain 16 / 17 (speedups 4^(5/7) = 2.69 / 4^(4/7) = 2.21); KJV 27 / 26 (dense 30 -> 20:
  # 4^0.3 = 1.52 / 4^0.4 = 1.74): both seeds faster than dense, both faster in-domain.
  q1, q2 = questions.speedup_questions(_report(_dense() + _moe([16, 17], [27, 26])))
  assert (q1.answer, q2.answer) == ('yes', 'yes') and (q1.seeds, q2.seeds) == (2, 2)
  assert 's/moe, sotu:validation' in q1.evidence[0]
  assert q2.evidence[0].endswith('(FLOPs): yes, in-domain larger for 2 of 2 seeds')
  # Seed 1 out of domain at 21 (4^0.9 = 3.48 > its in-domain 2.21): the seeds disagree.
  q1, q2 = questions.speedup_questions(_report(_dense() + _moe([16, 17], [27, 21])))
  assert (q1.answer, q2.answer) == ('yes', 'not separated')
  assert q2.evidence[0].endswith('not separated, in-domain larger for 1 of 2 seeds')
  # Both seeds worse than the smallest dense run in-domain: speedup < 1, a no.
  q1, _ = questions.speedup_questions(_report(_dense() + _moe([23, 24], [27, 26])))
  assert q1.answer == 'no'
  # One seed: an answer with no spread, and it says so.
  q1, _ = questions.speedup_questions(_report(_dense() + _moe([16], [27])))
  assert q1.answer == 'yes (one seed: no spread)'


def _sparse(family, ppls, params=1000.0):
  return [_row(f's/{family}/seed{seed}', family, SOTU, 9e17, p, seed, params=params)
          for seed, p in enumerate(ppls)]


def test_csordas_questions():
  # Dense small in-domain: 20 (seed 0), 22 (seed 1). σ-MoE +2% and +1%: within 3%.
  report = _report(_dense() + _sparse('sigma_moe', [20.4, 22.22]) + _sparse('pkm', [19, 21])
                   + _sparse('pkm_softmax', [19.5, 21.5]))
  sigma, pkm = questions.sigma_question(report), questions.pkm_question(report)
  assert sigma.answer == 'yes' and sigma.seeds == 2
  assert '+1.5% (+1.0..+2.0%, 2 seeds)' in sigma.evidence[0]
  assert pkm.answer == 'yes' and pkm.seeds == 2
  # Each σ seed is compared with its own dense seed: +2% on 20 is 20.4, but 20.4 against seed
  # 1's 22 would be -7%; seed 1 at 22.9 is +4.1%: not within 3% for every seed.
  report = _report(_dense() + _sparse('sigma_moe', [20.4, 22.9]) + _sparse('pkm', [19, 22])
                   + _sparse('pkm_softmax', [19.5, 21.5]))
  assert questions.sigma_question(report).answer == 'not separated'
  assert questions.pkm_question(report).answer == 'not separated'
  # ReLU worse for both seeds: a no.
  report = _report(_dense() + _sparse('pkm', [20, 22]) + _sparse('pkm_softmax', [19, 21]))
  assert questions.pkm_question(report).answer == 'no'
  assert questions.sigma_question(report).answer == 'not measured'


def test_pkm_pairs_need_the_same_seed_and_parameters():
  rows = (_dense() + _sparse('pkm', [19, 21]) + _sparse('pkm_softmax', [19.5], params=1500.0))
  report = _report(rows, tolerance=1.0)
  assert questions.pkm_question(report).answer == 'not measured'


def test_out_of_domain_is_not_read_as_in_domain():
  rows = [dict(r, train_task='kjv') for r in _dense() + _moe([16, 17], [27, 26])]
  q1, _ = questions.speedup_questions(_report(rows))
  # Now KJV is in-domain: its speedups 1.52 / 1.74 are the evidence.
  assert 'kjv:validation' in q1.evidence[0] and q1.answer == 'yes'
  assert not questions.in_domain({'domain': 'sotu:validation', 'train_task': None})
  assert math.isclose(seeds.Spread.of([1.0, 3.0]).mean, 2.0)


def test_answers_render():
  report = _report(_dense() + _moe([16, 17], [27, 26]) + _sparse('sigma_moe', [20.4, 22.22]))
  answers = questions.answer(report)
  assert [a.answer for a in answers] == ['yes', 'yes', 'yes', 'not measured']
  md = '\n'.join(questions.render_md(answers))
  assert md.count('- **') == 4 and '**Artetxe et al. 2022: Does the top-k MoE' in md
  assert 'NOT MEASURED' in questions.render_text(answers)
