"""Text tables of a speedup analysis and of the parameter-matched comparison (what `moescale
speedup` prints without --json)."""

from __future__ import annotations

import textwrap
from typing import Sequence

from moescale.analysis.speedup import Analysis

LEGEND = ('speedup: the {ref} compute needed for the run\'s perplexity / the run\'s compute '
          '(perplexity linear in log compute between {ref} runs); >x / <x: the run is outside '
          'the {ref} runs\' perplexities, only a bound; no curve: fewer than 2 {ref} runs in '
          'that domain and measure; -: the run has no value of that measure.')
FIT_LEGEND = "fit: the power law ppl = a·C^-b through the {ref} runs; *: extrapolated."


def factor_cell(f: dict) -> str:
  """A Factor (as a dict) in one cell: '2.00', '3.10*' (extrapolated), '>4.00', 'no curve'."""
  if f['status'] == 'no_curve':
    return 'no curve'
  if f['status'] == 'no_data':
    return '-'
  if f['speedup'] is None:
    return f"{'>' if f['bound_kind'] == 'lower' else '<'}{f['bound']:.2f}"
  return f"{f['speedup']:.2f}{'*' if f['status'] == 'extrapolated' else ''}"


def speedup_table(analysis: Analysis) -> str:
  """One row per (run, domain); device-second columns only where the records have them."""
  seconds = any(r.get('device_seconds') is not None for r in analysis.rows)
  head = ['run', 'family', 'domain', 'ppl', 'train FLOPs', 'speedup FLOPs']
  if seconds:
    head += ['device-s', 'speedup device-s']
  if analysis.fit:
    head += ['fit FLOPs'] + (['fit device-s'] if seconds else [])
  rows = []
  for s in analysis.speedups:
    row = [s['run'], s['family'], s['domain'], f"{s['perplexity']:.3f}",
           f"{s['train_flops']:.3g}", factor_cell(s['flops'])]
    if seconds:
      ds = s['device_seconds']
      row += ['-' if ds is None else f'{ds:.4g}', factor_cell(s['seconds'])]
    if analysis.fit:
      row += [factor_cell(s['fit_flops'])] + ([factor_cell(s['fit_seconds'])] if seconds else [])
    rows.append(row)
  legend = LEGEND + (' ' + FIT_LEGEND if analysis.fit else '')
  return text_table(head, rows) + '\n' + textwrap.fill(legend.format(ref=analysis.reference),
                                                        100)


def factor_text(entry: dict, measure: str) -> str:
  """A `seeds.speedups` entry's factor in one measure, with its seeds' range and bounds."""
  main = factor_cell(entry[measure])
  spread, bounds = entry[f'{measure}_seeds'], entry[f'{measure}_bounds']
  parts = []
  if spread is not None and (spread.n > 1 or bounds):
    parts.append(f'seeds {spread.lo:.2f}..{spread.hi:.2f}' if spread.n > 1
                 else f'seed {spread.lo:.2f}')
  if bounds:
    parts.append('bounds ' + ', '.join(bounds))
  return main + (f" ({'; '.join(parts)})" if parts else '')


def percent(s) -> str:
  """A `seeds.Spread` of ratios as signed percentages, with its range over seeds."""
  if s is None:
    return '-'
  if s.n == 1:
    return f'{100 * s.mean:+.1f}%'
  return f'{100 * s.mean:+.1f}% ({100 * s.lo:+.1f}..{100 * s.hi:+.1f}%, {s.n} seeds)'


def speedup_group_rows(entries: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
  """(head, rows) of `seeds.speedups` entries: per configuration and domain, the factor of the
  mean perplexity and the seeds' range."""
  head = ['configuration', 'family', 'domain', 'seeds', 'perplexity (mean, min..max)',
          'speedup FLOPs (seeds)', 'speedup device-s (seeds)']
  rows = [[e['config'], e['family'], e['domain'], str(len(e['seeds'])), e['perplexity'].text(),
           factor_text(e, 'flops'), factor_text(e, 'seconds')] for e in entries]
  return head, rows


def matched_group_rows(groups: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
  """(head, rows) of `seeds.matched` groups: sparse and dense perplexity over seeds and the
  relative difference."""
  head = ['configuration', 'dense', 'domain', 'perplexity (mean, min..max)',
          'dense perplexity', 'sparse / dense - 1']
  rows = [[g['config'], g['dense_config'], g['domain'], g['perplexity'].text(),
           g['dense_perplexity'].text(), percent(g['relative'])] for g in groups]
  return head, rows


def pairs_table(pairs: Sequence[dict]) -> str:
  """The parameter-matched comparisons, sparse / dense where a pair of numbers."""
  head = ['run', 'dense run', 'domain', 'params s/d', 'ppl s/d', 'ppl diff', 'FFN FLOPs',
          'FFN weights read', 'FFN weights held']
  rows = [[p['run'], p['dense_run'], p['domain'],
           f"{p['params']:.4g} / {p['dense_params']:.4g}",
           f"{p['perplexity']:.3f} / {p['dense_perplexity']:.3f}",
           f"{p['perplexity_diff']:+.3f}", _ratio(p['ffn_flops_ratio']),
           _ratio(p['ffn_active_bytes_ratio']), _ratio(p['ffn_param_bytes_ratio'])]
          for p in pairs]
  return text_table(head, rows) + '\n' + textwrap.fill(
      'ppl diff: sparse - dense (negative: the sparse run is better); FFN columns: sparse / '
      'dense, per token (FLOPs, weights a token reads) or in all (weights held).', 100)


def _ratio(x: float | None) -> str:
  return '-' if x is None else f'{100 * x:.1f}%'


def text_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  """Columns padded to their widest cell, names (the first three) left-aligned, figures
  right-aligned."""
  widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
  fmt = lambda row: '  '.join(str(x).ljust(w) if i < 3 else str(x).rjust(w)
                              for i, (x, w) in enumerate(zip(row, widths)))
  return '\n'.join([fmt(head), fmt(['-' * w for w in widths])] + [fmt(r) for r in rows])
