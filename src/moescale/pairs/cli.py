"""`moescale pairs check|make|list`: the command line of `moescale.pairs`.

Argument parsing and printing only; the checks and derivations are `members`', the table is
`matching`'s. `moescale pairs --help` prints the package docstring (the pair file format).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Sequence

from moescale.pairs.matching import PairResult, format_table
from moescale.pairs.members import Derivation, check, derive, load, shipped_pair_files
from moescale.pairs.spec import CONVENTIONS, MATCHES, to_gin


def _resolve_pair_file(f: str) -> str:
  if os.path.isfile(f):
    return f
  from moescale import gin_config
  root = gin_config.shipped_gin_dir()
  for cand in ([root / f, root / 'pairs' / f] if root else []):
    if cand.is_file():
      return str(cand)
  raise FileNotFoundError(f'pair file {f!r} not found (shipped pairs: moescale pairs list)')


def _print_json(results: Sequence[PairResult]) -> None:
  import json
  for r in results:
    print(json.dumps({'pair': r.pair.name, 'match': r.pair.match,
                      'convention': r.pair.convention, 'ratio': r.ratio,
                      'expected_ratio': r.pair.expected_ratio,
                      'tolerance': r.pair.tolerance, 'ok': r.ok,
                      'dense': dataclasses.asdict(r.dense),
                      'sparse': dataclasses.asdict(r.sparse)}))


def _check_main(argv: Sequence[str]) -> int:
  p = argparse.ArgumentParser(prog='moescale pairs check',
                              description='check pair files (default: every shipped pair)')
  p.add_argument('files', nargs='*', help='pair files (gin); none: all of gin/pairs/')
  p.add_argument('--json', action='store_true', help='one JSON object per pair')
  args = p.parse_args(argv)
  files = args.files or shipped_pair_files()
  if not files:
    p.error('no pair files given and none shipped')
  results = []
  for f in files:
    path = _resolve_pair_file(f)
    results.append(check(load(path), path))
  if args.json:
    _print_json(results)
  else:
    print(format_table(results))
  off = [r.pair.name for r in results if not r.ok]
  if off:
    print(f'{len(off)} of {len(results)} pairs off: {", ".join(off)}', file=sys.stderr)
    return 1
  return 0


def _make_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog='moescale pairs make',
      description='derive the partner value that matches a pair, e.g. the dense d_ff with '
                  'the parameters of a sparse model (--vary dense:D_FF --match total_params) '
                  'or the expert size with the FLOPs of a dense model (--vary '
                  'sparse:EXPERT_SIZE --match train_flops)')
  p.add_argument('--dense', nargs='+', required=True, help='gin files of the dense member')
  p.add_argument('--sparse', nargs='+', required=True, help='gin files of the sparse member')
  p.add_argument('--dense_binding', action='append', default=[], help='extra binding')
  p.add_argument('--sparse_binding', action='append', default=[], help='extra binding')
  p.add_argument('--vary', required=True,
                 help='SIDE:NAME, NAME a macro (D_FF) or Configurable.param (TopKMoE.top_k)')
  p.add_argument('--match', default='train_flops', choices=MATCHES)
  p.add_argument('--convention', default='standard', choices=CONVENTIONS)
  p.add_argument('--expected_ratio', type=float, default=1.0,
                 help='target sparse/dense ratio (default 1)')
  p.add_argument('--tolerance', type=float, default=0.01, help='for the written pair file')
  p.add_argument('--multiple_of', type=int, default=1, help='round the value to a multiple')
  p.add_argument('--start', type=int, default=None,
                 help='starting value (default: its value in the gin files)')
  p.add_argument('--name', default='', help='Pair.name for --write')
  p.add_argument('--write', default=None, help='write the matched pair file here')
  return p


def _print_derivation(d: Derivation, args: argparse.Namespace) -> None:
  r = d.result
  what = args.match + (f' ({args.convention})' if args.match == 'train_flops' else '')
  qd = r.dense.quantity(args.match, args.convention)
  qs = r.sparse.quantity(args.match, args.convention)
  print(f'{what}: dense {qd:,.0f}  sparse {qs:,.0f}  ratio {r.ratio:.6f} '
        f'(target {args.expected_ratio:g}, {100 * r.error:+.4f}%)')
  print(f'binding:    {d.name} = {d.value}')
  print(f'flag:       --gin.{d.name}={d.value}' if '.' not in d.name else
        f"flag:       --gin_bindings='{d.name} = {d.value}'")
  print(f"pair file:  Pair.{d.side}_bindings = {list(getattr(d.pair, d.side + '_bindings'))!r}")


def _make_main(argv: Sequence[str]) -> int:
  args = _make_parser().parse_args(argv)
  d = derive(args.dense, args.sparse, args.vary, args.match, args.convention,
             args.dense_binding, args.sparse_binding, args.multiple_of, args.start,
             args.expected_ratio, args.tolerance, args.name)
  _print_derivation(d, args)
  if args.write:
    os.makedirs(os.path.dirname(os.path.abspath(args.write)), exist_ok=True)
    with open(args.write, 'w') as f:
      f.write(to_gin(d.pair))
    print(f'wrote {args.write}')
  return 0


def _list_main(argv: Sequence[str]) -> int:
  argparse.ArgumentParser(prog='moescale pairs list').parse_args(argv)
  from moescale import gin_config
  root = gin_config.shipped_gin_dir()
  for f in shipped_pair_files():
    print(os.path.relpath(f, root) if root else f)
  return 0


_SUBCOMMANDS = {'check': _check_main, 'make': _make_main, 'list': _list_main}


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ('-h', '--help', 'help'):
    from moescale import pairs  # the package, loaded by now: its docstring is the manual
    print(pairs.__doc__)
    return 0
  sub, rest = argv[0], argv[1:]
  if sub not in _SUBCOMMANDS:
    print(f"moescale pairs: unknown subcommand {sub!r}; valid: {', '.join(_SUBCOMMANDS)}",
          file=sys.stderr)
    return 2
  return _SUBCOMMANDS[sub](rest)
