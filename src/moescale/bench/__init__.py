"""`moescale bench`: sparse layers and training steps timed against their dense baselines.

    moescale bench [--quick] [--json] [--sections moe,sigma,pkm,train] [--backends fused,slots]
                   [--experts 8,64] [--tokens 4096] [--repeats 5] [--markdown docs/performance.md]
    moescale bench --from_json bench.json --markdown docs/performance.md
    python -m moescale.bench ...

Sections (each in its own module, each returns records in the schema of `timing`):
  moe    top-2 MoE dispatch backends vs a FLOP-matched dense FFN; DenseFFN vs plain JAX.
  sigma  σ-MoE vs the FLOP-matched (d_ff = K·G) and parameter-matched (d_ff = N_E·G) dense FFN.
  pkm    product-key memory vs its FLOP-matched and parameter-matched dense FFN.
  train  whole training steps of small LMs: MFU against the measured peak matmul rate of this
         machine, and peak memory against params + optimizer state.

Every time is forward + backward, the median of `repeats` interleaved rounds; every ratio is
measured side by side in this process (see `timing.interleaved`). No gin, seqio or TensorFlow
is imported: the benchmark runs on a bare JAX install (a GPU machine, say).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
from typing import Sequence

import jax

from moescale.bench import report
from moescale.bench.timing import format_table, interleaved  # noqa: F401  (re-exported)

# section name -> module under moescale.bench with `run(opts, log) -> list[dict]`.
SECTIONS = {'moe': 'moe', 'sigma': 'sigma', 'pkm': 'pkm', 'train': 'train_step'}


@dataclasses.dataclass(frozen=True)
class Options:
  """What the command line chose; a section fills in its own defaults where a field is None."""
  quick: bool = False
  repeats: int = 5
  experts: tuple[int, ...] | None = None
  tokens: tuple[int, ...] | None = None
  backends: tuple[str, ...] | None = None


def _ints(text: str) -> tuple[int, ...]:
  try:
    return tuple(int(v) for v in text.split(','))
  except ValueError:
    raise argparse.ArgumentTypeError(f'expected a comma list of integers, got {text!r}')


def _sections(text: str) -> tuple[str, ...]:
  names = tuple(s for s in text.split(',') if s)
  unknown = [s for s in names if s not in SECTIONS]
  if unknown:
    raise argparse.ArgumentTypeError(f'unknown section(s) {unknown}; valid: {list(SECTIONS)}')
  return names


def main(argv: Sequence[str] | None = None) -> list[dict]:
  """Runs the chosen sections, prints a table (or JSON with --json); returns the records."""
  parser = argparse.ArgumentParser(prog='moescale bench', description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true', help='a tiny grid of every section')
  parser.add_argument('--json', action='store_true', help='print JSON records, not a table')
  parser.add_argument('--sections', type=_sections, default=tuple(SECTIONS),
                      help=f'comma list of {list(SECTIONS)}')
  parser.add_argument('--backends', help='comma list of MoE dispatch backends; options as '
                      'fused:block_size=64:granule=16')
  parser.add_argument('--experts', type=_ints, help='comma list of num_experts')
  parser.add_argument('--tokens', type=_ints, help='comma list of token counts')
  parser.add_argument('--repeats', type=int, default=None, help='timed rounds (default 5)')
  parser.add_argument('--markdown', help='also write the records as a page (docs/performance.md)')
  parser.add_argument('--from_json', help='render these --json records instead of running')
  args = parser.parse_args(argv)
  if args.from_json:
    with open(args.from_json) as f:
      saved = json.load(f)
    # The --json records say nothing of the machine: the page says what it can.
    _write_markdown(args.markdown, saved, {}, argv)
    return saved
  opts = Options(quick=args.quick, repeats=args.repeats or (3 if args.quick else 5),
                 experts=args.experts, tokens=args.tokens,
                 backends=tuple(b for b in args.backends.split(',') if b)
                 if args.backends else None)
  log = None if args.json else (lambda msg: print(msg, file=sys.stderr, flush=True))
  if log:
    log(f'moescale bench on {jax.default_backend()} ({jax.devices()[0].device_kind}), '
        f'fwd+bwd, median of {opts.repeats} interleaved rounds')
  records = []
  for section in args.sections:
    module = importlib.import_module(f'moescale.bench.{SECTIONS[section]}')
    records += module.run(opts, log)
  if args.json:
    print(json.dumps(records, indent=1))
  else:
    print(format_table(records))
  _write_markdown(args.markdown, records, report.machine(), argv)
  return records


def _write_markdown(path: str | None, records, meta, argv) -> None:
  if not path:
    return
  command = 'moescale bench ' + ' '.join(a for a in (argv or sys.argv[1:]) if a != '--json')
  with open(path, 'w') as f:
    f.write(report.markdown(records, meta, command.strip()))
