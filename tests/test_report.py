"""From trained runs to the report: `moescale report` on two tiny studies (compute-matched and
parameter-matched) writes report.md whose every section comes from the runs, lists what is
missing, and draws its plots; the Colab notebook (experiments/colab_eval.ipynb) runs headless
against the same runs, so it cannot rot."""

import hashlib
import json
import os
import pathlib
import shutil

import nbclient   # test dependencies (setup.cfg [test]): a missing one fails, never skips
import nbformat
import pytest

from moescale import cli, evaluate
from moescale.analysis import history, report, storage
from moescale.evaluate import lm
from moescale.study import Component, DataSpec, Family, Matching, ModelSpec, ScalingStudy

REPO = pathlib.Path(__file__).resolve().parents[1]
PNG = b'\x89PNG\r\n\x1a\n'


def _dense(size):
  return ModelSpec(vocab_size=64, d_model=32, num_layers=2, num_heads=2, max_length=32,
                   ffn=Component('DenseFFN', d_ff=size['d_ff']))


def _moe(size):
  return _dense(size).replace(sparse_ffn=Component('TopKMoE', num_experts=4,
                                                   expert_size=size['expert_size']))


def _sigma(size):
  return _dense(size).replace(sparse_layers='all', sparse_ffn=Component(
      'SigmaMoE', num_experts=4, expert_size=size['expert_size'], top_k=2))


def _study(name, sizes, families, quantity, multiple_of=4):
  return ScalingStudy(
      name, sizes, families, data=DataSpec('synthetic', vocab_size=64, length=32),
      train=lambda n, s: dict(train_steps=6, batch_size=8, seed=0, log_period=3,
                              eval_period=3, eval_steps=1),
      matching=Matching(quantity, multiple_of=multiple_of, tolerance=0.05))


@pytest.fixture(scope='module')
def studies(tmp_path_factory):
  """root/cm: dense at 3 widths and a top-2 MoE compute-matched at the middle one; root/pm: a
  dense run and a σ-MoE of the same parameters. One run evaluated from its checkpoint."""
  root = tmp_path_factory.mktemp('studies')
  cm = _study('cm', {'s': dict(d_ff=32, expert_size=32), 'm': dict(d_ff=64, expert_size=64),
                     'l': dict(d_ff=128, expert_size=128)},
              [Family('dense', _dense, knob='d_ff'),
               Family('moe', lambda s: _moe(s) if s['d_ff'] == 64 else None,
                      knob='expert_size')], 'train_flops')
  pm = _study('pm', {'m': dict(d_ff=256, expert_size=64)},
              [Family('dense', _dense), Family('sigma', _sigma, knob='expert_size')],
              'total_params', multiple_of=1)
  cm.run(str(root / 'cm'))
  pm.run(str(root / 'pm'))
  run = evaluate.load_run(str(root / 'cm' / 'm' / 'moe'))
  lm.save(run, 'perplexity', evaluate.perplexity(run, max_batches=2))
  return root


def _priming_file(run_dir):
  """A priming result as `moescale prime` saves it (one task, 0 and 2 shots)."""
  acc = lambda m, s: {k: {'mean': m, 'std': s, 'min': m - s, 'max': m + s, 'per_draw': [m]}
                      for k in ('sum', 'per_token', 'per_byte')}
  results = {f'toy/{k}shot': {'task': 'toy', 'shots': k, 'draws': 1 + 2 * k, 'examples': 30,
                              'chance': 0.25, 'accuracy': acc(0.3 + 0.1 * k, 0.01 * k),
                              'truncated': 0.0} for k in (0, 2)}
  os.makedirs(os.path.join(run_dir, 'eval'), exist_ok=True)
  with open(os.path.join(run_dir, 'eval', 'priming_step6.json'), 'w') as f:
    json.dump({'results': results, 'run_dir': run_dir, 'step': 6}, f)


def test_report_of_two_studies_reads_every_run_and_says_what_is_missing(studies, tmp_path):
  cm, pm = studies / 'cm', studies / 'pm'
  _priming_file(str(cm / 's' / 'dense'))
  broken = studies / 'broken'
  broken.mkdir(exist_ok=True)                      # a run directory that never trained
  dirs = storage.stage_runs([str(cm), str(pm)], str(tmp_path / 'cache')) + [str(broken)]
  assert len(dirs) == 7 and all(d.startswith(str(studies)) for d in dirs[:6])
  r = report.build_report(dirs, str(tmp_path / 'out'))
  text = open(r.path).read()
  # Every run read is listed with a hash of the config.gin it ran.
  for d in dirs[:6]:
    sha = hashlib.sha256(open(os.path.join(d, 'config.gin'), 'rb').read()).hexdigest()[:12]
    assert sha in text
  names = {x['run']: x for x in r.runs}
  assert names['broken']['status'] == 'not read'
  assert any(m.startswith('broken: not read:') and 'metrics.jsonl' in m for m in r.missing)
  # Only the checkpoint-evaluated run is not listed as evaluated during training only.
  logged = next(m for m in r.missing if m.startswith('only the evaluation logged'))
  assert 'cm/m/moe' not in logged and 'cm/s/dense' in logged and 'pm/m/sigma' in logged
  assert {x['source'] for x in r.rows if x['run'] == 'cm/m/moe'} == {'eval'}
  # Speedups: the MoE against cm's dense curve; the parameter-matched σ-MoE pair from pm.
  assert [s['run'] for s in r.analysis.speedups if s['domain'].endswith('validation')
          and s['run'].startswith('cm')] == ['cm/m/moe']
  assert [(p['run'], p['dense_run']) for p in r.pairs] == [('pm/m/sigma', 'pm/m/dense')]
  # The studies' matched pairs, recounted: within tolerance.
  assert {(c['run'], c['reference'], c['ok']) for c in r.checks} == {
      ('cm/m/moe', 'cm/m/dense', True), ('pm/m/sigma', 'pm/m/dense', True)}
  for section in ('## Runs read', '## Missing or failed', '## Speedup over the dense runs',
                  '## Parameter-matched comparison', '## Training', '### Expert usage',
                  '## Priming (zero- and few-shot)', '| toy | 2 | 5 | 30 |'):
    assert section in text, section
  written = {os.path.basename(p) for p in r.plots}
  assert {'perplexity_vs_flops.png', 'speedup.png', 'loss_curves.png',
          'perplexity_vs_params.png', 'expert_usage_cm_m_moe.png',
          'expert_usage_pm_m_sigma.png'} <= written
  for p in r.plots:
    assert open(p, 'rb').read(8) == PNG and f']({os.path.basename(p)})' in text


def test_a_pair_off_its_target_is_reported(studies, tmp_path):
  """A run whose recounted matched quantity is off its reference's by more than the tolerance
  (here: its config.json claims the wrong reference size) fails the check, named."""
  run = tmp_path / 'moe'
  shutil.copytree(studies / 'cm' / 'm' / 'moe', run)
  meta_path = run / 'config.json'
  cfg = json.loads(meta_path.read_text())
  cfg['meta']['size'] = 'l'          # matched to l/dense, which it is not
  meta_path.write_text(json.dumps(cfg))
  dirs = [str(studies / 'cm' / 'l' / 'dense'), str(studies / 'cm' / 's' / 'dense'), str(run)]
  r = report.build_report(dirs, str(tmp_path / 'out'))
  (check,) = r.checks
  assert not check['ok'] and check['recounted'] < 0.95
  assert any(m.endswith("moe: train_flops {:.4f} x its reference ".format(check['recounted'])
                        + f"{check['reference']}, outside 1%") for m in r.missing)


def test_history_reads_the_routing_of_every_sparse_layer(studies):
  h = history.read_history(str(studies / 'cm' / 'm' / 'moe'))
  assert list(h.usage) == ['layer_02'] and list(h.dropped) == ['layer_02']
  steps, usage = h.usage['layer_02']
  assert list(steps) == [3, 6] and usage.shape == (2, 4)
  assert abs(usage.sum(axis=1) - 1).max() < 1e-5      # shares of the kept assignments
  assert list(h.loss[0]) == [3, 6] and 'validation' in h.evals
  dense = history.read_history(str(studies / 'cm' / 's' / 'dense'))
  assert not dense.routed


def test_report_command_on_study_roots(studies, tmp_path, capsys):
  out = tmp_path / 'rep'
  assert cli.main(['report', str(studies / 'cm'), str(studies / 'pm'), '--out', str(out)]) == 0
  printed = capsys.readouterr()
  assert 'cm/m/moe' in printed.out and 'speedup' in printed.out
  assert (out / 'report.md').is_file() and (out / 'speedup.png').is_file()
  assert cli.main(['report', str(tmp_path / 'nope'), '--out', str(out)]) == 2
  assert 'nope: no such run directory' in capsys.readouterr().err


def test_stage_copies_a_remote_tree_whole_or_not_at_all(studies, tmp_path, monkeypatch):
  """The copy of a cloud run (here a local tree through the same epath code) lands complete,
  with or without checkpoints, and a cached copy is reused."""
  src = studies / 'pm' / 'm' / 'dense'
  dest = storage.copy_tree(str(src), str(tmp_path / 'a'), checkpoints=False)
  assert sorted(os.listdir(dest)) == sorted(x for x in os.listdir(src) if x != 'checkpoints')
  assert not os.path.exists(dest + '.partial')
  full = storage.copy_tree(str(src), str(tmp_path / 'b'))
  assert os.path.isdir(os.path.join(full, 'checkpoints'))
  copies = []
  monkeypatch.setattr(storage, 'copy_tree', lambda s, d, **k: copies.append(d) or d)
  monkeypatch.setattr(storage, 'open_remote', lambda p: p)
  cache = tmp_path / 'cache'
  (cache / 'bucket' / 'run').mkdir(parents=True)
  assert storage.stage('gs://bucket/run', str(cache)) == str(cache / 'bucket' / 'run')
  assert copies == []                                  # cached: not copied again
  storage.stage('gs://bucket/run', str(cache), refresh=True)
  assert copies == [str(cache / 'bucket' / 'run')]


def test_colab_notebook_runs_headless_on_the_runs(studies):
  """The notebook executed as a user would (a kernel, every cell in order) with its
  parameters pointed at the test's runs: a speedup table and figures come out."""
  nb = nbformat.read(REPO / 'experiments' / 'colab_eval.ipynb', as_version=4)
  params = next(c for c in nb.cells if 'parameters' in c.metadata.get('tags', []))
  params.source = (f"RUNS = [{str(studies / 'cm')!r}, {str(studies / 'pm')!r}]\n"
                   f"OUT = {str(studies / 'nb_report')!r}\nLOCAL_CACHE = '/nonexistent'\n"
                   f"EVAL_RUN = {str(studies / 'cm' / 'l' / 'dense')!r}\nEVAL_TASKS = None\n"
                   "MAX_BATCHES = 1\nFIT = 'powerlaw'\nMOESCALE_SOURCE = 'never-installed'\n")
  nbclient.NotebookClient(nb, timeout=300, kernel_name='python3',
                          resources={'metadata': {'path': str(studies)}}).execute()
  text = '\n'.join(o.get('text', '') for c in nb.cells if c.cell_type == 'code'
                   for o in c.get('outputs', []) if o.get('output_type') == 'stream')
  assert 'speedup FLOPs' in text and 'cm/m/moe' in text and 'parameter-matched' in text
  images = [o for c in nb.cells for o in c.get('outputs', []) if 'image/png' in o.get('data', {})]
  assert len(images) >= 3
  assert (studies / 'nb_report' / 'report.md').is_file()
  assert (studies / 'cm' / 'l' / 'dense' / 'eval' / 'perplexity_step6.json').is_file()
