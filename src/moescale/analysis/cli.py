"""`moescale collect`, `speedup` and `report`: run directories -> a records file -> speedup
factors (a table, --json, --plot DIR) -> a report with plots. None reads data: no seqio, no
TensorFlow.

    moescale collect RUN_DIR [RUN_DIR ...] --out runs.csv [--step N] [--convention C]
                     [--devices N]
    moescale speedup runs.csv [--json] [--fit powerlaw] [--plot DIR] [--reference dense]
                     [--param_tolerance 0.01]
    moescale report RUN_DIR_OR_STUDY [...] --out DIR [--fit powerlaw] [--devices N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence


def collect_main(argv: Sequence[str]) -> int:
  from moescale import accounting  # collect counts every run with it (JAX, no TensorFlow)
  p = argparse.ArgumentParser(
      prog='moescale collect', description='One record per (run, evaluation domain): family, '
      'parameters, training FLOPs and device-seconds at the evaluated step, loss / perplexity '
      '/ bits. The columns are described in moescale.analysis.collect.')
  p.add_argument('run_dirs', nargs='+', metavar='RUN_DIR', help='trained run directories')
  p.add_argument('--out', required=True,
                 help='the records file: .csv (CSV) or .jsonl (JSON lines)')
  p.add_argument('--step', type=int, default=None,
                 help='the evaluated step of every run (default: each run\'s latest)')
  p.add_argument('--convention', default='standard', choices=accounting.CONVENTIONS,
                 help="training FLOPs per token (moescale.accounting): 'standard' = 3 x "
                      "forward, as the trainer logs; 'artetxe' as Artetxe et al.'s plots")
  p.add_argument('--devices', type=int, default=None,
                 help='devices every run trained on (default: what each run\'s mesh config '
                      'pins, else 1)')
  args = p.parse_args(argv)
  if args.devices is not None and args.devices < 1:
    p.error(f'--devices={args.devices}: must be >= 1')
  from moescale.analysis import collect, records
  records.file_format(args.out)  # a bad suffix fails before any run is counted
  rows = collect.collect_runs(args.run_dirs, step=args.step, convention=args.convention,
                              devices=args.devices)
  records.write_records(rows, args.out)
  print(f"{args.out}: {len(rows)} records of {len({r['run'] for r in rows})} run(s)")
  return 0


def speedup_main(argv: Sequence[str]) -> int:
  p = argparse.ArgumentParser(
      prog='moescale speedup', description='Speedup factors (Artetxe et al.) per domain: the '
      'dense compute needed for each run\'s perplexity over the run\'s compute, in training '
      'FLOPs and in device-seconds; and parameter-matched comparisons (Csordás et al.).')
  p.add_argument('file', help='records: .csv or .jsonl with at least run, family, train_flops, '
                              'perplexity (optional: domain, device_seconds, params)')
  p.add_argument('--json', action='store_true', help='print one JSON object')
  p.add_argument('--fit', default=None, choices=('powerlaw',),
                 help='also read factors off ppl = a·C^-b fitted to the dense runs '
                      '(extrapolations marked)')
  p.add_argument('--plot', default=None, metavar='DIR', help='write PNG figures into DIR')
  p.add_argument('--reference', default='dense', help='the family of the reference curve')
  p.add_argument('--param_tolerance', type=float, default=0.01,
                 help='parameter-matched: |params / dense params - 1| at most this')
  args = p.parse_args(argv)
  from moescale.analysis import matched, records, speedup, tables
  rows = records.read_records(args.file)
  analysis = speedup.analyse(rows, args.reference, args.fit, source=args.file)
  pairs, pair_notes = matched.param_matched(rows, args.reference, args.param_tolerance,
                                            source=args.file)
  plots = []
  if args.plot:
    from moescale.analysis import plots as plots_lib
    plots = plots_lib.write_plots(analysis, args.plot)
  notes = analysis.notes + pair_notes
  if args.json:
    print(json.dumps(_json_result(analysis, pairs, notes, plots), indent=1))
    return 0
  print(tables.speedup_table(analysis))
  if pairs:
    print('\nparameter-matched:\n' + tables.pairs_table(pairs))
  for note in notes:
    print(f'note: {note}', file=sys.stderr)
  for path in plots:
    print(path)
  return 0


def _json_result(analysis, pairs, notes, plots) -> dict:
  curves = {}
  for (domain, measure), c in analysis.curves.items():
    entry = {'compute': list(c.compute), 'perplexity': list(c.perplexity)}
    fit = analysis.fits.get((domain, measure))
    if fit is not None:
      entry['fit'] = {'a': fit.a, 'b': fit.b}
    curves.setdefault(domain, {})[measure] = entry
  return {'reference': analysis.reference, 'fit': analysis.fit,
          'speedups': analysis.speedups, 'param_matched': pairs, 'curves': curves,
          'notes': notes, 'plots': plots}


def report_main(argv: Sequence[str]) -> int:
  from moescale import accounting
  p = argparse.ArgumentParser(
      prog='moescale report', description='DIR/report.md with PNG plots beside it: the runs '
      'read, what is missing, speedup factors per domain (FLOPs and device-seconds), the '
      'parameter-matched comparison, training curves, expert usage, priming and fine-tuning.')
  p.add_argument('run_dirs', nargs='+', metavar='RUN_DIR',
                 help='run directories or study roots (a study.json lists the runs), local '
                      'or on cloud storage (gs://..., copied into OUT/runs without checkpoints)')
  p.add_argument('--out', required=True, help='the report directory (created)')
  p.add_argument('--fit', default=None, choices=('powerlaw',),
                 help='also fit ppl = a·C^-b to the dense runs')
  p.add_argument('--reference', default='dense', help='the family of the reference curve')
  p.add_argument('--convention', default='standard', choices=accounting.CONVENTIONS)
  p.add_argument('--devices', type=int, default=None,
                 help='devices every run trained on (default: each run\'s mesh config, else 1)')
  p.add_argument('--param_tolerance', type=float, default=0.01)
  args = p.parse_args(argv)
  if args.devices is not None and args.devices < 1:
    p.error(f'--devices={args.devices}: must be >= 1')
  from moescale.analysis import report as report_lib
  from moescale.analysis import storage, tables
  dirs = storage.stage_runs(args.run_dirs, os.path.join(args.out, 'runs'), checkpoints=False)
  if not any(storage.is_run(d) for d in dirs):   # else a report of nothing but 'missing'
    raise ValueError(f"no run directory in {', '.join(args.run_dirs)}: valid are run "
                     'directories (with the config.gin or metrics.jsonl `moescale train` '
                     'writes) and study roots (with a study.json), or folders holding them')
  r = report_lib.build_report(dirs, args.out, fit=args.fit,
                              reference=args.reference, convention=args.convention,
                              devices=args.devices, tolerance=args.param_tolerance)
  if r.analysis is not None:
    print(tables.speedup_table(r.analysis))
  if r.pairs:
    print('\nparameter-matched:\n' + tables.pairs_table(r.pairs))
  for line in r.missing:
    print(f'missing: {line}', file=sys.stderr)
  print(f'\n{r.path} ({len(r.plots)} plots beside it)')
  return 0
