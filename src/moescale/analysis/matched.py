"""Parameter-matched comparison (Csordás et al. 2023): each sparse run against the dense run
of the same total parameters, per domain: the perplexity it gains or loses, and the FFN
compute and memory it uses for it.

A sparse run is matched to the dense run of its domain whose `params` are nearest, when
|params / dense params - 1| <= tolerance (0.01 by default, as `moescale pairs` checks pair
files). What it reports, sparse over dense where a ratio:
  perplexity_diff          sparse - dense perplexity (negative: the sparse run is better)
  ffn_flops_ratio          FFN forward FLOPs per token (`ffn_flops_per_token`)
  ffn_active_bytes_ratio   FFN weights one token reads (`ffn_active_bytes`): the memory
                           traffic a sparse layer saves
  ffn_param_bytes_ratio    FFN weights held (`ffn_param_bytes`): about 1 by construction
A ratio is None where either record lacks the column (a file not written by `collect`).
"""

from __future__ import annotations

from typing import Sequence

from moescale.analysis import records as records_lib
from moescale.analysis import speedup

RATIOS = {'ffn_flops_ratio': 'ffn_flops_per_token', 'ffn_active_bytes_ratio': 'ffn_active_bytes',
          'ffn_param_bytes_ratio': 'ffn_param_bytes', 'train_flops_ratio': 'train_flops'}


def param_matched(records: Sequence[dict], reference: str = 'dense', tolerance: float = 0.01,
                  source: str = 'records') -> tuple[list[dict], list[str]]:
  """(one comparison per matched (sparse run, domain), notes on what was not matched)."""
  if not tolerance >= 0:
    raise ValueError(f'tolerance={tolerance!r}; it must be a number >= 0 (0.01: 1%)')
  rows = speedup.validate(records, reference, source)
  if all(r.get('params') is None for r in rows):
    return [], [f'{source}: no params values: no parameter-matched comparison']
  out, unmatched = [], []
  for r in rows:
    if r['family'] == reference or r.get('params') is None:
      continue
    dense = [d for d in rows if d['family'] == reference and d['domain'] == r['domain']
             and d.get('params') is not None]
    # The nearest in parameters; among dense seeds of equal size, the run's own seed.
    best = min(dense, key=lambda d: (round(abs(r['params'] / d['params'] - 1), 9),
                                     d.get('seed') != r.get('seed')), default=None)
    if best is None or abs(r['params'] / best['params'] - 1) > tolerance:
      unmatched.append(f"{r['run']} ({r['domain']})")
      continue
    out.append(_comparison(r, best))
  notes = []
  if unmatched:
    notes.append(f'no {reference} run within {100 * tolerance:g}% of the parameters of: '
                 f'{", ".join(unmatched)}')
  return out, notes


def _comparison(r: dict, d: dict) -> dict:
  out = {'run': r['run'], 'family': r['family'], 'config': r.get('config'), 'seed': r.get('seed'),
         'train_task': r.get('train_task'), 'domain': r['domain'], 'dense_run': d['run'],
         'dense_config': d.get('config'),
         'params': r['params'], 'dense_params': d['params'],
         'params_ratio': r['params'] / d['params'],
         'perplexity': r['perplexity'], 'dense_perplexity': d['perplexity'],
         'perplexity_diff': r['perplexity'] - d['perplexity']}
  for name, column in RATIOS.items():
    a = records_lib.number(r.get(column), column, f"run {r['run']!r}, domain {r['domain']!r}")
    b = records_lib.number(d.get(column), column, f"run {d['run']!r}, domain {d['domain']!r}")
    out[name] = a / b if a is not None and b else None
  return out
