"""`moescale report RUN_DIRS... --out DIR`: a set of runs as DIR/report.md, PNG plots beside it.

    report = build_report(['runs/study/small/dense', ...], 'runs/study/report')
    report.path       # .../report.md

It reads each run directory (config.gin, config.json where a study wrote one, metrics.jsonl,
eval/*.json from `moescale eval` / `prime`, finetune.json from `moescale finetune`) and writes:
the runs and configs it read; what is missing (a run without evaluation, a run it could not
read, a matched pair off its target); speedup factors over the dense runs per domain, in FLOPs
and in device-seconds (Artetxe et al.); the parameter-matched comparison (Csordás et al.);
training curves; expert usage per layer over training; priming and fine-tuning results. Every
number comes from the runs. Sections render through `report_md`.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
import re
from typing import Sequence

from moescale.analysis import (collect, history, history_plots, matched, plots, questions,
                               speedup)

log = logging.getLogger(__name__)

# meta.matched.quantity (a study's Matching) -> the record column that recounts it.
_MATCH_COLUMNS = {'total_params': 'params', 'active_params': 'active_params',
                  'forward_flops': 'forward_flops_per_token',
                  'train_flops': 'train_flops_per_token'}


@dataclasses.dataclass
class Report:
  """What `build_report` read and wrote. runs: one dict per run directory read; missing: one
  line per thing absent or failed; checks: matched pairs recounted; the rest as analysed."""
  path: str
  plots: list[str]
  runs: list[dict]
  rows: list[dict]
  missing: list[str]
  checks: list[dict]
  analysis: speedup.Analysis | None
  pairs: list[dict]
  priming: list[dict]
  finetuning: list[dict]
  answers: list = dataclasses.field(default_factory=list)   # questions.Answer


def build_report(run_dirs: Sequence[str], out_dir: str, *, fit: str | None = None,
                 reference: str = 'dense', convention: str = 'standard',
                 devices: int | None = None, tolerance: float = 0.01) -> Report:
  """Reads the runs, analyses them and writes out_dir/report.md with its plots; see the
  module docstring. A run that cannot be read is reported as missing, not fatal."""
  if not run_dirs:
    raise ValueError('no run directories given')
  dirs = [os.path.abspath(d) for d in run_dirs]
  names = collect.run_names(dirs)
  rows, runs, missing, histories, logged_only = [], [], [], [], []
  for d in dirs:
    info = {'run': names[d], 'dir': d, **_config_info(d)}
    if os.path.isfile(os.path.join(d, 'finetune.json')):
      # A fine-tuned run answers a task, not the LM question: its own section only.
      runs.append({**info, 'status': 'fine-tuned'})
      continue
    try:
      got = collect.collect_run(d, names[d], convention=convention, devices=devices)
      histories.append(history.read_history(d, names[d]))
    except (FileNotFoundError, ValueError) as e:
      missing.append(f'{names[d]}: not read: {e}')
      runs.append({**info, 'status': 'not read'})
      continue
    if not got:
      missing.append(f'{names[d]}: no evaluation (logged or by `moescale eval`)')
    elif any(r['source'] == 'metrics' for r in got):
      logged_only.append(names[d])
    rows += got
    runs.append({**info, 'status': 'read', 'step': got[0]['step'] if got else None,
                 'family': got[0]['family'] if got else None})
  if logged_only:
    missing.append(f'only the evaluation logged while training (a few batches, not the whole '
                   f'split: `moescale eval RUN_DIR` evaluates the checkpoint): '
                   f'{", ".join(logged_only)}')
  # A run a study matched on compute is compared by speedup, not at equal parameters: it is
  # left out of the parameter-matched comparison (and of its "no dense run" note).
  flops_matched = {r['run'] for r in runs if 'flops' in str(
      (r['meta'].get('matched') or {}).get('quantity', ''))}
  analysis, pairs = _analyse(rows, reference, fit, tolerance, missing, flops_matched)
  checks = matched_checks(runs, rows, tolerance)
  missing += [f"{c['run']}: {c['quantity']} {c['recounted']:.4f} x its reference "
              f"{c['reference']}, outside {100 * tolerance:g}%" for c in checks if not c['ok']]
  os.makedirs(out_dir, exist_ok=True)
  paths = [] if analysis is None else plots.write_plots(analysis, out_dir)
  paths += history_plots.write_history_plots(histories, rows, reference, out_dir)
  report = Report(os.path.join(out_dir, 'report.md'), paths, runs, rows, missing, checks,
                  analysis, pairs, priming_results(dirs, names), finetune_results(dirs, names))
  report.answers = questions.answer(report)
  from moescale.analysis import report_md
  with open(report.path, 'w') as f:
    f.write(report_md.render(report, histories, fit=fit, convention=convention))
  return report


def _analyse(rows, reference, fit, tolerance, missing, flops_matched=frozenset()):
  """(the speedup Analysis or None, parameter-matched pairs); notes go to `missing`."""
  analysis, pairs = None, []
  if not rows:
    return analysis, pairs
  try:
    analysis = speedup.analyse(rows, reference, fit, source='the runs')
    missing += analysis.notes
  except ValueError as e:   # e.g. only dense runs, or no two dense runs in any domain
    missing.append(f'no speedup factors: {e}')
    return analysis, pairs
  candidates = [r for r in rows if r['run'] not in flops_matched]
  if any(r['family'] != reference for r in candidates):
    pairs, notes = matched.param_matched(candidates, reference, tolerance, source='the runs')
    missing += notes
  return analysis, pairs


def _config_info(run_dir: str) -> dict:
  """The config files of a run and a short hash of config.gin (which config produced it)."""
  out = {'config': None, 'config_sha': None, 'meta': {}}
  gin_path = os.path.join(run_dir, 'config.gin')
  if os.path.isfile(gin_path):
    with open(gin_path, 'rb') as f:
      out['config'], out['config_sha'] = gin_path, hashlib.sha256(f.read()).hexdigest()[:12]
  json_path = os.path.join(run_dir, 'config.json')
  if os.path.isfile(json_path):
    try:
      with open(json_path) as f:
        out['meta'] = json.load(f).get('meta') or {}
    except (OSError, ValueError) as e:
      log.warning('%s: unreadable (%s): its study labels are ignored', json_path, e)
  return out


def matched_checks(runs: Sequence[dict], rows: Sequence[dict], tolerance: float) -> list[dict]:
  """Each run a study matched to a reference (config.json meta.matched), recounted from the
  records: the quantity's ratio to the reference run of the same study and size, and whether it is
  within tolerance. A reference not among the runs read is a failed check too."""
  by_run = {r['run']: r for r in rows}
  out = []
  for run in runs:
    m, size = run['meta'].get('matched'), run['meta'].get('size')
    if not m or run['run'] not in by_run:
      continue
    study = run['meta'].get('study')
    ref = next((r for r in runs if r['meta'].get('size') == size and r['run'] in by_run
                and r['meta'].get('study') == study and r['meta'].get('family') == m['to']),
               None)
    column = _MATCH_COLUMNS.get(m['quantity'])
    recounted = None
    if ref is not None and column is not None and (
        m['quantity'] != 'train_flops' or by_run[run['run']].get('convention') == m.get(
            'convention', 'standard')):
      a, b = by_run[run['run']].get(column), by_run[ref['run']].get(column)
      recounted = a / b if a and b else None
    ratio = m.get('ratio') if recounted is None else recounted
    out.append({'run': run['run'], 'reference': ref['run'] if ref else f"{size}/{m['to']}",
                'quantity': m['quantity'], 'knob': f"{m.get('knob')}={m.get('value')}",
                'stored': m.get('ratio'), 'recounted': ratio if ratio is not None else float('nan'),
                'ok': ref is not None and ratio is not None and abs(ratio - 1) <= tolerance})
  return out


def _latest(pattern: str) -> str | None:
  step = lambda p: int(re.search(r'step(\d+)\.json$', p).group(1))
  found = glob.glob(pattern)
  return max(found, key=step) if found else None


def priming_results(dirs: Sequence[str], names: dict) -> list[dict]:
  """One row per (run, task, shots) of each run's latest eval/priming_step<N>.json."""
  out = []
  for d in dirs:
    path = _latest(os.path.join(d, 'eval', 'priming_step*.json'))
    if path is None:
      continue
    with open(path) as f:
      saved = json.load(f)
    for key, r in saved.get('results', {}).items():
      out.append({'run': names[d], 'step': saved.get('step'), 'task': r.get('task', key),
                  'shots': r.get('shots'), 'draws': r.get('draws'),
                  'examples': r.get('examples'), 'chance': r.get('chance'),
                  'accuracy': r.get('accuracy', {})})
  return out


def finetune_results(dirs: Sequence[str], names: dict) -> list[dict]:
  """Each fine-tuned run's finetune.json (from `moescale finetune`), with its run name."""
  out = []
  for d in dirs:
    path = os.path.join(d, 'finetune.json')
    if os.path.isfile(path):
      with open(path) as f:
        out.append({'run': names[d], **json.load(f)})
  return out
