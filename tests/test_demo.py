"""`make demo`'s study (experiments/demo.py) end to end at its --quick size: the pairs pass the
pair checker before training, every run is evaluated by domain and on the priming task, the
report holds the speedup table, and a second call reuses everything and overwrites nothing.
`make study` (experiments/study.py) the same way with two seeds per configuration."""

import json
import pathlib

import experiment_scripts
from moescale import pairs
from moescale.study import session

DEMO = experiment_scripts.load('demo')
STUDY = experiment_scripts.load('study')      # `make study`: the demo's models with seeds

# Two of the four sizes: a dense curve (d8, d24), one compute-matched MoE (d8) and the three
# parameter-matched families (d24): every family and both matchings, 6 runs instead of 9.
ARGS = ['--quick', '--no_progress', '--only', 'd8', 'd24']
RUNS = ['d8/dense', 'd8/moe', 'd24/dense', 'd24/sigma_moe', 'd24/pkm', 'd24/topk_activation']


def _files(root: pathlib.Path) -> dict[str, float]:
  """Every file under the runs with its modification time (the report is rewritten)."""
  return {str(p): p.stat().st_mtime_ns for name in RUNS for p in (root / name).rglob('*')
          if p.is_file() and p.name != '.moescale.lock'}


def test_quick_demo_end_to_end_then_reused(tmp_path, capsys):
  root = tmp_path / 'demo'
  assert DEMO.main([*ARGS, '--root', str(root)]) == 0
  out, err = capsys.readouterr()
  listed = [r['name'] for r in json.loads((root / 'study.json').read_text())['runs']]
  assert listed == RUNS
  # Each matched pair was written as a pair file and passes the checker, as the study said.
  files = sorted((root / 'pairs').glob('*.gin'))
  assert [f.stem for f in files] == ['d24_pkm', 'd24_sigma_moe', 'd24_topk_activation',
                                     'd8_moe']
  assert all(pairs.check(pairs.load(str(f))).ok for f in files)
  assert '4 matched pairs pass the pair checker' in err
  for name in RUNS:
    saved = json.loads((root / name / 'eval' / 'perplexity_step2.json').read_text())['results']
    assert set(saved) == set(DEMO.DOMAINS) and all(r['eval_tokens'] > 0 for r in saved.values())
    primed = json.loads((root / name / 'eval' / 'priming_step2.json').read_text())['results']
    assert primed['sotu_next_sentence/0shot']['examples'] == 8
  report = (root / 'report' / 'report.md').read_text()
  assert 'd8/moe' in report and 'sigma_moe' in report
  assert 'Speedup over the dense runs' in out and 'speedup device-s' in out
  assert 'Parameter-matched' in out and 'd24/sigma_moe' in out
  assert str(root / 'report' / 'report.md') in out

  before = _files(root)
  assert DEMO.main([*ARGS, '--root', str(root)]) == 0
  out, err = (' '.join(text.split()) for text in capsys.readouterr())  # lines are wrapped
  assert f'reusing 6 finished run(s) in {root}' in err
  assert 'reusing the saved evaluations of 6 run(s)' in err
  assert 'trained 0 run(s)' in out
  assert _files(root) == before               # nothing rewritten, let alone overwritten


def test_a_different_grid_goes_to_a_new_study_directory(tmp_path):
  root = tmp_path / 'demo'
  study = DEMO.make_study(2, quick=True)
  study.write(str(root), study.expand(['d8']))
  same = study.expand(['d8'])
  assert session.choose_root(str(root), same) == (str(root), True)
  longer = DEMO.make_study(3, quick=True).expand(['d8'])       # another TRAIN_STEPS
  assert session.choose_root(str(root), longer) == (f'{root}-2', False)
  assert session.choose_root(str(root), study.expand()) == (f'{root}-2', False)  # more runs
  (tmp_path / 'other').mkdir()
  (tmp_path / 'other' / 'notes.txt').write_text('not a study')
  assert session.choose_root(str(tmp_path / 'other'), same) == (f'{tmp_path}/other-2', False)


def test_quick_study_trains_every_configuration_with_each_seed(tmp_path, capsys):
  from moescale.analysis import build_report, questions
  root = tmp_path / 'study'
  args = ['--quick', '--no_progress', '--only', 'd8', 'd24', '--families', 'dense', 'moe',
          'pkm', 'pkm_softmax', '--root', str(root)]
  assert STUDY.main(args) == 0
  out, err = capsys.readouterr()
  configs = ['d8/dense', 'd8/moe', 'd24/dense', 'd24/pkm', 'd24/pkm_softmax']
  runs = [f'{c}/seed{s}' for s in (0, 1) for c in configs]
  assert [r['name'] for r in json.loads((root / 'study.json').read_text())['runs']] == runs
  for name in runs:
    meta = json.loads((root / name / 'config.json').read_text())['meta']
    assert meta['config'] == name.rsplit('/', 1)[0] and f"seed{meta['seed']}" in name
    assert f"seed = {meta['seed']}" in (root / name / 'config.gin').read_text()
  # One pair file per configuration, not per seed; the seeds differ (init and data order).
  assert sorted(f.stem for f in (root / 'pairs').glob('*.gin')) == [
      'd24_pkm', 'd24_pkm_softmax', 'd8_moe']
  ppl = lambda name: json.loads((root / name / 'eval' / 'perplexity_step2.json').read_text())[
      'results']['validation']['perplexity']
  assert ppl('d8/dense/seed0') != ppl('d8/dense/seed1')
  report = (root / 'report' / 'report.md').read_text()
  assert report.count('### By configuration, over its seeds') == 2
  assert "## The papers' questions, as measured here" in report
  assert 'per configuration (mean over seeds)' in out and ', 2 seeds)' in out
  # What it printed is what the runs say: the answers recomputed from the run directories.
  again = questions.answer(build_report([str(root / r) for r in runs], str(tmp_path / 'r')))
  assert questions.render_text(again) in out
  assert [a.answer for a in again][-1] != 'not measured'      # the PKM pair by seed was read


def test_the_study_can_be_emitted_as_scheduler_jobs_instead(tmp_path, capsys):
  jobs_dir, root = tmp_path / 'jobs', tmp_path / 'runs'
  assert STUDY.main(['--quick', '--only', 'd8', '--emit_jobs', str(jobs_dir),
                     '--root', str(root)]) == 0
  commands = (jobs_dir / 'commands.txt').read_text().splitlines()
  names = ['d8/dense/seed0', 'd8/moe/seed0', 'd8/dense/seed1', 'd8/moe/seed1']
  assert [c.split('--gin_file=')[1].split('.gin')[0].rsplit('/', 1)[1] for c in commands] == [
      n.replace('/', '__') for n in names]
  assert all(c.startswith('moescale train ') and c.endswith('--multiprocess') for c in commands)
  assert f'--array=0-{len(names) - 1}' in (jobs_dir / 'slurm_array.sbatch').read_text()
  assert not (root / 'd8').exists() or not any((root / 'd8').rglob('metrics.jsonl'))
  assert '4 jobs:' in capsys.readouterr().out
