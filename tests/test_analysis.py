"""From runs to speedup factors: hand-computed factors on synthetic records (interpolated, out of
range with a bound, the power law's extrapolation marked, device-seconds beside FLOPs), the
parameter-matched comparison, bad input named, collect on run directories the tests write with
the shipped tiny config (counts checked against moescale.accounting), and the two commands end
to end without TensorFlow, a PNG written."""

import json
import math
import pathlib
import subprocess
import sys

import pytest

from moescale import accounting, cli, gin_config
from moescale.analysis import collect, matched, records, speedup

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY_TOKENS_PER_STEP = 16 * 128  # runs/tiny.gin: BATCH_SIZE x TASK_FEATURE_LENGTHS['targets']


def _rec(run, family, flops, ppl, domain='web', **kw):
  return {'run': run, 'family': family, 'domain': domain, 'train_flops': flops,
          'perplexity': ppl, **kw}


DENSE = [_rec('d1', 'dense', 1e18, 20.0, device_seconds=100.0),
         _rec('d2', 'dense', 2e18, 16.0, device_seconds=200.0),
         _rec('d4', 'dense', 4e18, 13.0, device_seconds=400.0)]


def _by_run(analysis):
  return {(s['run'], s['domain']): s for s in analysis.speedups}


# ------------------------------------------------------------------------------ speedup factors


def test_interpolated_speedups_are_the_hand_computed_factors():
  runs = DENSE + [_rec('moe_a', 'moe', 1e18, 16.0), _rec('moe_b', 'moe', 1e18, 14.5),
                  _rec('moe_c', 'moe', 2e18, 18.0)]
  got = _by_run(speedup.analyse(runs))
  assert set(got) == {('moe_a', 'web'), ('moe_b', 'web'), ('moe_c', 'web')}  # dense: no record
  # ppl 16 is d2's: dense needs 2e18, exactly (a knot is not computed through exp(log)).
  assert got['moe_a', 'web']['speedup'] == 2.0
  assert got['moe_a', 'web']['flops']['dense'] == 2e18
  # 14.5: halfway from 16 to 13, so halfway in log compute from 2e18 to 4e18.
  assert got['moe_b', 'web']['speedup'] == pytest.approx(math.sqrt(8), rel=1e-12)
  # 18 at 2e18 FLOPs: dense reaches it at sqrt(2)e18, less than the run used.
  assert got['moe_c', 'web']['speedup'] == pytest.approx(math.sqrt(2) / 2, rel=1e-12)
  assert {s['flops']['status'] for s in got.values()} == {'interpolated'}


def test_outside_the_dense_range_is_a_bound_not_a_factor():
  # A non-monotone dense curve: the compute needed is where it *first* comes down to the
  # run's perplexity (15.5: 90% of the way from 20 to 15, not the later 16 -> 12 segment).
  dense = [_rec('d1', 'dense', 1e18, 20.0), _rec('d2', 'dense', 2e18, 15.0),
           _rec('d4', 'dense', 4e18, 16.0), _rec('d8', 'dense', 8e18, 12.0)]
  runs = dense + [_rec('good', 'moe', 1e18, 11.0), _rec('bad', 'moe', 2e18, 25.0),
                  _rec('mid', 'moe', 1e18, 15.5)]
  got = _by_run(speedup.analyse(runs))
  good, bad = got['good', 'web']['flops'], got['bad', 'web']['flops']
  assert good == {'status': 'out_of_range', 'dense': None, 'speedup': None, 'bound': 8.0,
                  'bound_kind': 'lower'}          # better than every dense run: speedup > 8
  assert bad['status'] == 'out_of_range' and bad['speedup'] is None
  assert (bad['bound'], bad['bound_kind']) == (0.5, 'upper')  # 1e18 / 2e18: speedup < 0.5
  assert got['mid', 'web']['speedup'] == pytest.approx(2 ** 0.9, rel=1e-12)


def test_power_law_fit_reads_every_factor_and_marks_extrapolation():
  law = lambda c: 1e3 * c ** -0.25
  dense = [_rec(f'd{i}', 'dense', c, law(c)) for i, c in enumerate((1e16, 1e17, 1e18))]
  runs = dense + [_rec('inside', 'moe', 1e16, law(3e17)), _rec('beyond', 'moe', 1e16, law(1e19))]
  a = speedup.analyse(runs, fit='powerlaw')
  fit = a.fits['web', 'flops']
  assert (fit.a, fit.b) == (pytest.approx(1e3, rel=1e-9), pytest.approx(0.25, rel=1e-9))
  got = _by_run(a)
  assert got['inside', 'web']['fit_flops']['status'] == 'interpolated'
  assert got['inside', 'web']['fit_flops']['speedup'] == pytest.approx(30, rel=1e-9)
  beyond = got['beyond', 'web']
  assert beyond['fit_flops']['status'] == 'extrapolated'
  assert beyond['fit_flops']['speedup'] == pytest.approx(1000, rel=1e-9)
  assert beyond['flops']['status'] == 'out_of_range' and beyond['speedup'] is None
  assert beyond['flops']['bound'] == pytest.approx(100)
  # Perplexity that rises with compute: no power law, said in a note, no fitted factor.
  rising = [_rec('d1', 'dense', 1e18, 12.0), _rec('d2', 'dense', 2e18, 10.0),
            _rec('d4', 'dense', 4e18, 14.0), _rec('m', 'moe', 1e18, 11.0)]
  a = speedup.analyse(rising, fit='powerlaw')
  assert a.speedups[0]['fit_flops']['status'] == 'no_curve'
  assert a.speedups[0]['speedup'] == pytest.approx(math.sqrt(2), rel=1e-12)
  assert any('does not fall with compute' in n for n in a.notes), a.notes


def test_device_seconds_speedup_sits_beside_the_flop_speedup():
  runs = DENSE + [_rec('moe', 'moe', 1e18, 16.0, device_seconds=150.0),
                  _rec('moe_untimed', 'moe', 1e18, 16.0)]
  got = _by_run(speedup.analyse(runs))
  moe = got['moe', 'web']
  assert moe['speedup'] == 2.0
  assert moe['speedup_seconds'] == pytest.approx(200 / 150, rel=1e-12)  # dense needs 200 s
  assert moe['seconds']['dense'] == pytest.approx(200.0, rel=1e-12)
  untimed = got['moe_untimed', 'web']
  assert untimed['speedup'] == 2.0 and untimed['seconds']['status'] == 'no_data'
  # Dense runs without seconds: no seconds curve, said per domain; FLOPs unaffected.
  untimed_dense = [{k: v for k, v in r.items() if k != 'device_seconds'} for r in DENSE[:2]]
  a = speedup.analyse(untimed_dense + [DENSE[2], _rec('moe', 'moe', 1e18, 16.0,
                                                      device_seconds=150.0)])
  assert a.speedups[0]['seconds']['status'] == 'no_curve' and a.speedups[0]['speedup'] == 2.0
  assert any("'web', device_seconds: 1 dense run" in n for n in a.notes), a.notes


def test_each_domain_has_its_own_curve_and_a_thin_domain_is_said_clearly():
  runs = DENSE + [_rec('d1', 'dense', 1e18, 40.0, domain='code'),
                  _rec('d2', 'dense', 2e18, 20.0, domain='code'),
                  _rec('moe', 'moe', 1e18, 16.0), _rec('moe', 'moe', 1e18, 30.0, domain='code'),
                  _rec('d1', 'dense', 1e18, 9.0, domain='legal'),
                  _rec('moe', 'moe', 1e18, 8.0, domain='legal')]
  a = speedup.analyse(runs)
  got = _by_run(a)
  assert got['moe', 'web']['speedup'] == 2.0
  assert got['moe', 'code']['speedup'] == pytest.approx(math.sqrt(2), rel=1e-12)
  assert got['moe', 'legal']['flops']['status'] == 'no_curve'
  assert any("domain 'legal', train_flops: 1 dense run" in n for n in a.notes), a.notes
  with pytest.raises(ValueError, match=r"no domain has a dense curve.*'legal': 1"):
    speedup.analyse([r for r in runs if r['domain'] == 'legal'])


@pytest.mark.parametrize('change, message', [
    ({'train_flops': 0}, r"run 'moe', domain 'web': train_flops=0; it must be a positive"),
    ({'train_flops': -1e18}, r'train_flops=-1e\+18'),
    ({'train_flops': 'lots'}, r"train_flops='lots' is not a number"),
    ({'train_flops': float('nan')}, r'train_flops=nan'),
    ({'train_flops': None}, r'train_flops is empty'),
    ({'perplexity': 0.0}, r'perplexity=0.0'),
    ({'device_seconds': -3.0}, r'device_seconds=-3.0'),
    ({'family': ''}, r"run 'moe', domain 'web': empty family"),
])
def test_bad_values_are_named_with_what_is_valid(change, message):
  with pytest.raises(ValueError, match=message):
    speedup.analyse(DENSE + [{**_rec('moe', 'moe', 1e18, 16.0), **change}])


def test_bad_files_are_named_with_what_is_valid():
  with pytest.raises(ValueError, match=r"missing column\(s\) \['train_flops'\].*needed"):
    speedup.analyse([{'run': 'a', 'family': 'dense', 'perplexity': 3.0}])
  with pytest.raises(ValueError, match=r"run 'd1', domain 'web': given twice"):
    speedup.analyse(DENSE + [DENSE[0]])
  with pytest.raises(ValueError, match=r"reference family 'dense'; families: \['moe'\]"):
    speedup.analyse([_rec('m', 'moe', 1e18, 3.0)])
  with pytest.raises(ValueError, match='nothing to compare'):
    speedup.analyse(DENSE)
  with pytest.raises(ValueError, match=r"fit='spline'; valid: None or \['powerlaw'\]"):
    speedup.analyse(DENSE, fit='spline')


def test_parameter_matched_pairs_report_ppl_difference_ffn_compute_and_memory():
  def rec(run, family, params, ppl, ffn_flops, read, held, domain='web'):
    return _rec(run, family, 1e18, ppl, domain, params=params, ffn_flops_per_token=ffn_flops,
                ffn_active_bytes=read, ffn_param_bytes=held)
  runs = [rec('d_small', 'dense', 1000, 20.0, 400, 4000, 4000),
          rec('d_big', 'dense', 2000, 16.0, 800, 8000, 8000),
          rec('sigma', 'sigma', 2010, 15.5, 200, 2000, 8040),    # 0.5% off d_big: matched
          rec('pkm', 'pkm', 1500, 17.0, 100, 1000, 6000)]        # 25% off both: unmatched
  pairs, notes = matched.param_matched(runs)
  assert len(pairs) == 1
  p = pairs[0]
  assert (p['run'], p['dense_run']) == ('sigma', 'd_big')
  assert p['perplexity_diff'] == pytest.approx(-0.5)
  assert p['ffn_flops_ratio'] == 0.25 and p['ffn_active_bytes_ratio'] == 0.25
  assert p['ffn_param_bytes_ratio'] == pytest.approx(1.005)
  assert notes == ['no dense run within 1% of the parameters of: pkm (web)']
  assert matched.param_matched(runs, tolerance=0.3)[0][1]['dense_run'] == 'd_big'  # nearest
  with pytest.raises(ValueError, match='tolerance=-0.1'):
    matched.param_matched(runs, tolerance=-0.1)


def test_records_files_round_trip_and_name_a_bad_cell(tmp_path):
  rows = [{**_rec('d1', 'dense', 1e18, 20.0), 'step': 400, 'device_seconds': None,
           'note': 'kept'}]
  for suffix in ('.csv', '.jsonl'):
    back = records.read_records(records.write_records(rows, str(tmp_path / f'r{suffix}')))
    assert back == rows, suffix  # numbers as numbers, None as None, other columns kept
  (tmp_path / 'bad.csv').write_text('run,family,train_flops,perplexity\nd1,dense,1e18,x\n')
  with pytest.raises(ValueError, match=r"bad.csv:2: perplexity='x' is not a number"):
    records.read_records(str(tmp_path / 'bad.csv'))
  (tmp_path / 'long.csv').write_text('run,family,train_flops,perplexity\nd1,dense,1e18,3,4\n')
  with pytest.raises(ValueError, match=r"long.csv:2: more values than columns: \['4'\]"):
    records.read_records(str(tmp_path / 'long.csv'))
  with pytest.raises(ValueError, match=r"'.txt'; valid: .csv \(CSV\), .jsonl"):
    records.write_records(rows, str(tmp_path / 'r.txt'))


# ---------------------------------------------------------------------------------- collect


def _write_run(root, name, *, dense, steps, step_times, logged_ppl=None, eval_files=(),
               extra=''):
  """A run directory as the trainer and `moescale eval` leave it, with the shipped tiny config
  (a top-2 MoE; dense: no sparse layers); logged evaluation at the last step."""
  d = root / name
  d.mkdir(parents=True)
  (d / 'config.gin').write_text(
      f"include 'moescale/gin/runs/tiny.gin'\nMODEL_DIR = '{d}'\n"
      + ('TransformerLM.sparse_ffn = None\n' if dense else '') + extra)
  lines = [{'step': (i + 1) * steps // len(step_times), 'loss': 3.0, 'step_time': t}
           for i, t in enumerate(step_times)]
  if logged_ppl is not None:
    lines.append({'step': steps, 'validation/eval_loss': math.log(logged_ppl),
                  'validation/perplexity': logged_ppl, 'validation/bits_per_token': 1.5,
                  'validation/eval_tokens': 999.0,
                  'moescale_kjv:validation/eval_loss': 3.0,
                  'moescale_kjv:validation/perplexity': math.exp(3.0)})
  (d / 'metrics.jsonl').write_text(''.join(json.dumps(x) + '\n' for x in lines))
  for step, results in eval_files:
    (d / 'eval').mkdir(exist_ok=True)
    (d / 'eval' / f'perplexity_step{step}.json').write_text(json.dumps(
        {'results': results, 'run_dir': str(d), 'step': step}))
  return str(d)


def _tiny_train_flops_per_token(dense: bool) -> float:
  gin_config.parse(['runs/tiny.gin'], ["MODEL_DIR = '/tmp/unused'"] +
                   (['TransformerLM.sparse_ffn = None'] if dense else []), finalize=False)
  return accounting.count(gin_config.query('MODEL'), 128).train_flops_per_token['standard']


@pytest.fixture(scope='module')
def study(tmp_path_factory):
  """Three runs: two dense (400 and 800 steps of the same model) and an MoE whose perplexity
  equals the 800-step dense run's, evaluated by a file at its last step."""
  root = tmp_path_factory.mktemp('study')
  file_eval = {'validation': {'eval_loss': math.log(8.0), 'perplexity': 8.0,
                              'bits_per_token': 3.0, 'bits_per_byte': 3.0,
                              'eval_tokens': 5e5}}
  earlier = {'validation': {**file_eval['validation'], 'perplexity': 12.0}}
  dirs = [_write_run(root, 'dense/s', dense=True, steps=400, step_times=[3.0, 0.5, 0.5, 0.6],
                     logged_ppl=10.0),
          _write_run(root, 'dense/m', dense=True, steps=800, step_times=[3.0, 0.5, 0.5, 0.4],
                     logged_ppl=8.0, extra='NUM_DEVICES = 2\n'),
          _write_run(root, 'moe', dense=False, steps=400, step_times=[3.0, 0.8, 0.8, 0.9, 0.8],
                     logged_ppl=9.0, eval_files=[(400, file_eval), (200, earlier)])]
  return dirs, collect.collect_runs(dirs)


def test_collect_counts_compute_and_time_from_the_run_directories(study):
  dirs, rows = study
  got = {(r['run'], r['domain']): r for r in rows}
  assert set(got) == {(run, f'moescale_{t}:validation') for run in ('dense/s', 'dense/m', 'moe')
                      for t in ('sotu', 'kjv')}  # the bare split named by the run's task
  per_token = {True: _tiny_train_flops_per_token(True), False: _tiny_train_flops_per_token(False)}
  dense_m, moe = got['dense/m', 'moescale_sotu:validation'], got['moe', 'moescale_sotu:validation']
  assert dense_m['family'] == 'dense' and moe['family'] == 'TopKMoE'
  assert dense_m['train_flops'] == 800 * TINY_TOKENS_PER_STEP * per_token[True]
  assert moe['train_flops'] == 400 * TINY_TOKENS_PER_STEP * per_token[False]
  assert moe['params'] > moe['active_params'] and moe['ffn_params'] > moe['ffn_active_params']
  assert moe['ffn_param_bytes'] == 4 * moe['ffn_params']  # float32 weights
  assert dense_m['ffn_active_params'] == dense_m['ffn_params']
  # The median window (compilation's 3 s left out) x steps, x the 2 devices NUM_DEVICES pins.
  assert dense_m['step_seconds'] == 0.5 and dense_m['devices'] == 2
  assert dense_m['device_seconds'] == 800 * 0.5 * 2
  assert moe['device_seconds'] == 400 * 0.8 and moe['devices'] == 1
  # The eval file wins at its step; the logged domain it lacks fills in.
  assert (moe['source'], moe['perplexity'], moe['bits_per_byte']) == ('eval', 8.0, 3.0)
  kjv = got['moe', 'moescale_kjv:validation']
  assert (kjv['source'], kjv['perplexity'], kjv['bits_per_byte']) == ('metrics', math.exp(3), None)


def test_collect_picks_a_step_and_reads_a_study_family(tmp_path, study):
  dirs, _ = study
  rows = collect.collect_runs([dirs[2]], step=200)  # an earlier checkpoint's file
  assert [(r['domain'], r['perplexity'], r['step'], r['source']) for r in rows] == [
      ('moescale_sotu:validation', 12.0, 200, 'eval')]
  assert rows[0]['train_flops'] == 200 * TINY_TOKENS_PER_STEP * _tiny_train_flops_per_token(False)
  # Every mesh axis given (no -1): the devices are their product.
  d = _write_run(tmp_path, 'run', dense=False, steps=100, step_times=[1.0], logged_ppl=9.0,
                 extra='DATA_PARALLELISM = 3\n')
  (tmp_path / 'run' / 'config.json').write_text(json.dumps({'meta': {'family': 'moe'}}))
  rows = collect.collect_runs([d], convention='artetxe')
  assert {r['family'] for r in rows} == {'moe'} and rows[0]['run'] == 'run'
  assert rows[0]['device_seconds'] == 100 * 1.0 * 3 and rows[0]['convention'] == 'artetxe'
  assert collect.collect_runs([d], devices=4)[0]['device_seconds'] == 100 * 1.0 * 4
  assert rows[0]['train_flops'] > 100 * TINY_TOKENS_PER_STEP * _tiny_train_flops_per_token(False)


def test_collect_errors_name_the_run_and_what_is_missing(tmp_path, capsys):
  (tmp_path / 'empty').mkdir()
  unevaluated = _write_run(tmp_path, 'uneval', dense=True, steps=10, step_times=[1.0])
  cases = [([str(tmp_path / 'empty')], 'empty has no metrics.jsonl: not a trained run'),
           ([str(tmp_path / 'nowhere')], 'nowhere: no such run directory'),
           ([unevaluated], 'uneval has no evaluation: neither eval/perplexity_step<N>.json')]
  for dirs, message in cases:
    assert cli.main(['collect', *dirs, '--out', str(tmp_path / 'r.csv')]) == 2
    assert message in capsys.readouterr().err
  assert cli.main(['collect', unevaluated, '--out', str(tmp_path / 'r.txt')]) == 2
  assert "unknown records format '.txt'" in capsys.readouterr().err
  with pytest.raises(ValueError, match=r'no evaluation at step 7; it has steps \[10\]'):
    collect.collect_runs([_write_run(tmp_path, 'ev', dense=True, steps=10, step_times=[1.0],
                                     logged_ppl=9.0)], step=7)
  assert not (tmp_path / 'r.csv').exists()


# ------------------------------------------------------------------------------ end to end


def test_collect_then_speedup_from_the_command_line_without_tensorflow(study, tmp_path):
  dirs, _ = study
  out, plots = tmp_path / 'runs.csv', tmp_path / 'plots'
  code = ('import sys, io, contextlib\nfrom moescale.cli import main\n'
          f"assert main(['collect', *{dirs!r}, '--out', {str(out)!r}]) == 0\n"
          'f = io.StringIO()\n'
          f"with contextlib.redirect_stdout(f): rc = main(['speedup', {str(out)!r}, '--json', "
          f"'--fit', 'powerlaw', '--plot', {str(plots)!r}])\n"
          "bad = [m for m in ('tensorflow', 'seqio') if m in sys.modules]\n"
          'assert rc == 0 and not bad, (rc, bad)\nprint("JSON", f.getvalue())')
  r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=REPO,
                     timeout=120)
  assert r.returncode == 0, r.stderr
  result = json.loads(r.stdout.split('JSON', 1)[1])
  got = {(s['run'], s['domain']): s for s in result['speedups']}
  assert set(got) == {('moe', 'moescale_sotu:validation'), ('moe', 'moescale_kjv:validation')}
  moe = got['moe', 'moescale_sotu:validation']
  # The MoE reaches the 800-step dense run's perplexity (8.0) with its own FLOPs.
  dense_m = 800 * TINY_TOKENS_PER_STEP * _tiny_train_flops_per_token(True)
  assert moe['speedup'] == pytest.approx(dense_m / moe['train_flops'], rel=1e-12)
  assert moe['speedup_seconds'] == pytest.approx(800 * 0.5 * 2 / (400 * 0.8), rel=1e-12)
  assert moe['fit_flops']['status'] == 'interpolated'  # a two-run fit passes through both
  assert moe['fit_flops']['speedup'] == pytest.approx(moe['speedup'], rel=1e-9)
  # Both dense runs logged the same kjv perplexity as the MoE: a flat curve, reached by the
  # smaller one already; no power law (perplexity does not fall), said in a note.
  kjv = got['moe', 'moescale_kjv:validation']
  dense_s = 400 * TINY_TOKENS_PER_STEP * _tiny_train_flops_per_token(True)
  assert kjv['speedup'] == pytest.approx(dense_s / moe['train_flops'], rel=1e-12)
  assert kjv['fit_flops']['status'] == 'no_curve'
  assert any("'moescale_kjv:validation', train_flops" in n and 'no dense fit' in n
             for n in result['notes']), result['notes']
  assert result['plots'] == [str(plots / f) for f in ('perplexity_vs_flops.png',
                                                       'perplexity_vs_seconds.png', 'speedup.png')]
  for path in result['plots']:
    assert pathlib.Path(path).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  # The table form, and a file the analysis cannot use: one line naming what is wrong.
  assert cli.main(['speedup', str(out)]) == 0
  bad = tmp_path / 'bad.csv'
  bad.write_text('run,family,perplexity\nd,dense,3\n')
  assert cli.main(['speedup', str(bad)]) == 2


def test_a_dense_curve_that_rises_is_noted():
  rows = [{'run': f'd{i}', 'family': 'dense', 'domain': 'a', 'train_flops': c, 'perplexity': p}
          for i, (c, p) in enumerate([(1e18, 20.0), (2e18, 16.0), (4e18, 17.0)])]
  rows.append({'run': 'm', 'family': 'moe', 'domain': 'a', 'train_flops': 1e18,
               'perplexity': 18.0})
  a = speedup.analyse(rows)
  assert a.curves['a', 'flops'].rises() == [(2e18, 16.0, 4e18, 17.0)]
  assert any("domain 'a': the dense perplexity does not fall with compute (16 at 2e+18 "
             'FLOPs, 17 at 4e+18)' in n for n in a.notes)
  rows[2]['perplexity'] = 15.0
  assert not any('does not fall' in n for n in speedup.analyse(rows).notes)
