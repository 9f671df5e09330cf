"""Multi-host runs: the command-line flags every command that computes shares, and JAX's own
distributed runtime behind them (`jax.distributed.initialize`, never a home-made one).

    moescale train|eval|prime|finetune ... --multiprocess        # TPU pod / SLURM: detected
    ... --coordinator_address=host0:1234 --num_processes=4 --process_id=3   # explicit

Every process runs the same command; each reads its share of the data, and process 0 alone
writes files (`moescale.evaluate.run.writes_files`).
"""

from __future__ import annotations

import argparse

_PROCESS_FLAGS = ('coordinator_address', 'num_processes', 'process_id')


def add_flags(p: argparse.ArgumentParser) -> None:
  p.add_argument('--multiprocess', action='store_true',
                 help='call jax.distributed.initialize() (auto-detects TPU pods / SLURM)')
  p.add_argument('--coordinator_address', default=None,
                 help='host:port of process 0; with --num_processes and --process_id')
  p.add_argument('--num_processes', type=int, default=None)
  p.add_argument('--process_id', type=int, default=None, help='0 .. num_processes - 1')


def check_flags(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  """The explicit cluster flags go together: with only some of them, each process would
  either run alone (--num_processes without a coordinator never initialises anything) or hang
  waiting for peers that do not agree on the cluster. --multiprocess alone auto-detects."""
  given = [f for f in _PROCESS_FLAGS if getattr(args, f) is not None]
  if given and len(given) < len(_PROCESS_FLAGS):
    missing = ', '.join(f'--{f}' for f in _PROCESS_FLAGS if f not in given)
    p.error(f"{', '.join(f'--{f}' for f in given)} without {missing}: pass all of "
            '--coordinator_address, --num_processes and --process_id, or --multiprocess alone '
            'to let JAX detect them (TPU pod, SLURM)')
  if given and not 0 <= args.process_id < args.num_processes:
    p.error(f'--process_id={args.process_id} must be in [0, --num_processes='
            f'{args.num_processes})')


def initialize(args: argparse.Namespace) -> None:
  """jax.distributed.initialize with the flags, when any asks for several processes."""
  if args.multiprocess or args.coordinator_address:
    import jax
    jax.distributed.initialize(coordinator_address=args.coordinator_address,
                               num_processes=args.num_processes, process_id=args.process_id)
