"""The Markdown of a `report.Report`: one function per section, each a list of lines."""

from __future__ import annotations

import datetime
import os
import subprocess
from typing import Sequence

import moescale
from moescale.analysis import history, questions, seeds, tables


def render(report, histories: Sequence[history.History], *, fit: str | None,
           convention: str) -> str:
  out_dir = os.path.dirname(report.path)
  sections = [_header(report, convention), _runs(report), _missing(report),
              questions.render_md(report.answers) if report.answers else [],
              _speedup(report, out_dir, fit), _matched(report, out_dir),
              _training(report, histories, out_dir), _priming(report), _finetuning(report)]
  return '\n'.join(line for s in sections for line in s) + '\n'


def md_table(head: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
  return (['| ' + ' | '.join(map(str, head)) + ' |', '|' + '---|' * len(head)]
          + ['| ' + ' | '.join(str(c).replace('|', '\\|') for c in r) + ' |' for r in rows]
          + [''])


def _image(out_dir: str, name: str, paths: Sequence[str], caption: str) -> list[str]:
  path = os.path.join(out_dir, name)
  return [f'![{caption}]({name})', ''] if path in paths else []


def _commit() -> str | None:
  """The git commit of the moescale source in use, where it is a checkout (None otherwise)."""
  src = os.path.dirname(os.path.abspath(moescale.__file__))
  try:
    out = subprocess.run(['git', '-C', src, 'rev-parse', '--short=12', 'HEAD'],
                         capture_output=True, text=True, timeout=10)
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip() if out.returncode == 0 else None


def _header(report, convention: str) -> list[str]:
  when = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')
  commit = _commit()
  return ['# moescale report', '',
          f'Written {when} by moescale {moescale.__version__}'
          + (f' (commit {commit})' if commit else '')
          + f' from {len(report.runs)} run directories. Training FLOPs: the `{convention}` '
          'convention of `moescale.accounting`; device-seconds: the median logged step time '
          'x steps x devices.', '']


def _fmt(x, spec: str = '.4g') -> str:
  return '-' if x is None else format(x, spec)


def _runs(report) -> list[str]:
  by_run = {}
  for r in report.rows:
    by_run.setdefault(r['run'], r)
  rows = []
  for run in report.runs:
    r = by_run.get(run['run'], {})
    rows.append([run['run'], run.get('family') or run['meta'].get('family') or '-',
                 run['status'], _fmt(run.get('step'), 'd'), _fmt(r.get('params')),
                 _fmt(r.get('train_flops')), _fmt(r.get('device_seconds')),
                 f"`{run['config_sha']}`" if run['config_sha'] else 'no config.gin',
                 f"`{run['dir']}`"])
  return (['## Runs read', ''] + md_table(
      ['run', 'family', 'status', 'step', 'params', 'train FLOPs', 'device-s',
       'config.gin sha256', 'directory'], rows))


def _missing(report) -> list[str]:
  lines = ['## Missing or failed', '']
  lines += [f'- {m}' for m in report.missing] or ['Nothing: every run was read and evaluated.']
  if report.checks:
    lines += ['', 'Matched pairs, recounted from the runs\' configs:', '']
    lines += md_table(['run', 'reference', 'quantity', 'knob', 'ratio', 'within tolerance'],
                      [[c['run'], c['reference'], c['quantity'], c['knob'],
                        f"{c['recounted']:.4f}", 'yes' if c['ok'] else '**no**']
                       for c in report.checks])
  return lines + ['']


def _speedup(report, out_dir: str, fit: str | None) -> list[str]:
  lines = ['## Speedup over the dense runs (Artetxe et al. 2022)', '']
  a = report.analysis
  if a is None:
    return lines + ['No speedup factors: see the missing section.', '']
  seconds = any(r.get('device_seconds') is not None for r in a.rows)
  head = ['run', 'family', 'domain', 'perplexity', 'train FLOPs', 'speedup (FLOPs)']
  head += ['device-s', 'speedup (device-s)'] if seconds else []
  head += ['fit (FLOPs)'] if fit else []
  rows = []
  for s in a.speedups:
    row = [s['run'], s['family'], s['domain'], f"{s['perplexity']:.3f}",
           f"{s['train_flops']:.3g}", tables.factor_cell(s['flops'])]
    if seconds:
      row += [_fmt(s['device_seconds']), tables.factor_cell(s['seconds'])]
    if fit:
      row += [tables.factor_cell(s['fit_flops'])]
    rows.append(row)
  lines += md_table(head, rows)
  lines += [tables.LEGEND.format(ref=a.reference), '']
  if seeds.has_seeds(a.speedups):
    lines += ['### By configuration, over its seeds', '',
              'The factor of the mean perplexity at the mean compute against the dense curve '
              '(itself the mean over the dense seeds), with the range of the seeds\' own factors.',
              ''] + md_table(*tables.speedup_group_rows(seeds.speedups(a)))
  for name, caption in (('perplexity_vs_flops.png', 'perplexity against training FLOPs'),
                        ('perplexity_vs_seconds.png', 'perplexity against device-seconds'),
                        ('speedup.png', 'speedup per domain')):
    lines += _image(out_dir, name, report.plots, caption)
  return lines


def _matched(report, out_dir: str) -> list[str]:
  lines = ['## Parameter-matched comparison (Csordás et al. 2023)', '']
  if report.pairs:
    lines += md_table(
        ['run', 'dense run', 'domain', 'params (sparse / dense)', 'perplexity (sparse / dense)',
         'difference', 'FFN FLOPs', 'FFN weights read', 'FFN weights held'],
        [[p['run'], p['dense_run'], p['domain'], f"{p['params']:.4g} / {p['dense_params']:.4g}",
          f"{p['perplexity']:.3f} / {p['dense_perplexity']:.3f}",
          f"{p['perplexity_diff']:+.3f}", _pct(p['ffn_flops_ratio']),
          _pct(p['ffn_active_bytes_ratio']), _pct(p['ffn_param_bytes_ratio'])]
         for p in report.pairs])
    lines += ['FFN columns: sparse as a share of dense.', '']
    if seeds.has_seeds(report.pairs):
      lines += ['### By configuration, over its seeds', '',
                'Each seed against the dense run of the same parameters and seed.', '']
      lines += md_table(*tables.matched_group_rows(seeds.matched(report.pairs)))
  else:
    lines += ['No sparse run has a dense run of the same parameters (within tolerance).', '']
  return lines + _image(out_dir, 'perplexity_vs_params.png', report.plots,
                        'perplexity against parameters')


def _pct(x) -> str:
  return '-' if x is None else f'{100 * x:.1f}%'


def _training(report, histories, out_dir: str) -> list[str]:
  lines = ['## Training', '']
  lines += _image(out_dir, 'loss_curves.png', report.plots, 'loss curves')
  routed = [h for h in histories if h.routed]
  if routed:
    lines += ['### Expert usage', '',
              'Each expert\'s share of the kept assignments at the last log, against the '
              'uniform share 1/E, and the mean fraction of assignments dropped over capacity.',
              '']
    lines += md_table(['run', 'layer', 'experts', 'max share', 'min share', '1/E',
                       'mean dropped'],
                      [[h.run, u['layer'], u['experts'], f"{u['max_share']:.3f}",
                        f"{u['min_share']:.3f}", f"{u['uniform']:.3f}",
                        _fmt(u['mean_dropped'], '.3f')]
                       for h in routed for u in history.usage_summary(h)])
    from moescale.analysis.history_plots import file_name
    for h in routed:
      lines += _image(out_dir, f'expert_usage_{file_name(h.run)}.png', report.plots,
                      f'expert usage of {h.run}')
  return lines


def _acc(acc: dict, key: str) -> str:
  a = acc.get(key) if isinstance(acc, dict) else None
  if isinstance(a, dict):
    return f"{a['mean']:.3f} ± {a['std']:.3f}"
  return '-' if a is None else f'{a:.3f}'


def _priming(report) -> list[str]:
  if not report.priming:
    return ['## Priming', '', 'No priming results (`moescale prime`).', '']
  return ['## Priming (zero- and few-shot)', ''] + md_table(
      ['run', 'step', 'task', 'shots', 'draws', 'examples', 'chance', 'accuracy (per token)',
       'accuracy (per byte)', 'accuracy (sum)'],
      [[p['run'], p['step'], p['task'], p['shots'], p['draws'], p['examples'],
        _fmt(p['chance'], '.3f'), _acc(p['accuracy'], 'per_token'),
        _acc(p['accuracy'], 'per_byte'), _acc(p['accuracy'], 'sum')] for p in report.priming]
  ) + ['Mean ± standard deviation over the draws of the shots.', '']


def _finetuning(report) -> list[str]:
  if not report.finetuning:
    return ['## Fine-tuning', '', 'No fine-tuned runs among those read (`moescale finetune`).',
            '']
  rows = []
  for f in report.finetuning:
    cfg = f.get('config', {})
    options = ', '.join(f'{k}={cfg[k]}' for k in ('head', 'freeze_router', 'expert_dropout',
                                                     'router_lr_scale', 'expert_lr_scale',
                                                     'steps') if k in cfg)
    shots = {k: _acc(v.get('accuracy', {}), 'per_token')
             for k, v in f.get('pretrained', {}).items()}
    tuned = f.get('finetuned', {}).get('accuracy')
    rows.append([f['run'], f.get('task'), f.get('pretrained_run', '-'), options,
                 '; '.join(f'{k} {v}' for k, v in shots.items()),
                 _acc({'a': tuned}, 'a')])
  return ['## Fine-tuning', ''] + md_table(
      ['run', 'task', 'pretrained run', 'options', 'pretrained (per token)', 'fine-tuned'],
      rows)
