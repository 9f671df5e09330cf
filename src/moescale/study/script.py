"""The command line of an experiment script that runs a whole study in one process
(experiments/demo.py, experiments/study.py): `main(argv, make_study, evaluation, ...)`.

    make_study(steps, quick, seeds) -> ScalingStudy     the grid (seeds None: the script's own)
    evaluation(quick) -> session.Evaluation             what every run is evaluated on

Flags: --root, --steps, --quick, --seeds, --only (sizes), --families, --dry_run (write the runs
and check the pairs, train nothing), --no_progress, and `study.jobs`'s (--emit_jobs DIR: each
run a scheduler job instead). A stop (Ctrl-C, SIGTERM) returns 130 after
saying that the same command continues; `exit` leaves without the interpreter's teardown then.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable

STOPPED = 130


def parser(doc: str, root: str, steps: int) -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=doc,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--root', default=root, help='the study directory (see above)')
  p.add_argument('--steps', type=int, default=None,
                 help=f'training steps of every run (default {steps}; --quick: 2)')
  p.add_argument('--quick', action='store_true',
                 help='the grid at tiny sizes, 2 steps, 1 batch per domain: seconds, no signal')
  p.add_argument('--seeds', type=int, nargs='+', default=None,
                 help="the seeds each configuration trains with (default: the script's)")
  p.add_argument('--only', nargs='*', default=None, help='size names to keep')
  p.add_argument('--families', nargs='*', default=None, help='family names to keep')
  p.add_argument('--dry_run', action='store_true',
                 help='write the run directories, check the pairs and print counts; train nothing')
  p.add_argument('--no_progress', action='store_true', help='no progress display')
  from moescale.study import jobs
  jobs.add_flags(p)
  return p


def main(argv, make_study: Callable, evaluation: Callable, *, doc: str, root: str, steps: int,
         after: Callable | None = None) -> int:
  """Parses argv and runs the study (see the module docstring). after(result) -> str: more to
  print after the study's summary (e.g. the answers to the papers' questions)."""
  args = parser(doc, root, steps).parse_args(argv)
  from moescale.cpu import heap
  heap.keep_heap()  # as the `moescale` command does, before JAX starts its CPU client
  logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
  from moescale.study import session, table
  study = make_study(args.steps or (2 if args.quick else steps), args.quick, args.seeds)
  experiments = [e for e in study.expand(args.only)
                 if not args.families or e.meta['family'] in args.families]
  print(table(experiments))
  if args.emit_jobs:
    # Each run a scheduler job (its `moescale train` command, a SLURM array): then `moescale
    # eval` / `report` over the root, as the study would have done in this process.
    from moescale.study import jobs
    paths = jobs.write_jobs(experiments, args.root, args.emit_jobs,
                            jobs.from_args(args)['slurm'])
    print(f"{len(experiments)} jobs: {paths['commands']}, {paths['sbatch']}; runs under "
          f'{args.root}')
    return 0
  if args.dry_run:
    root, _ = session.choose_root(args.root, experiments)
    session.check_pairs(study, study.write(root, experiments), root)
    print(f'wrote the run directories under {root}; every matched pair passes the pair checker')
    return 0
  try:
    result = session.run_study(study, args.root, evaluation(args.quick),
                               experiments=experiments, progress=not args.no_progress)
  except (KeyboardInterrupt, session.Stopped) as e:
    print(f'\nstopped{": " + str(e) if str(e) else ""}. The same command continues where it '
          'stopped (finished runs, checkpoints and evaluations are kept).', file=sys.stderr)
    return STOPPED
  print(session.summary(result))
  if after is not None:
    print('\n' + after(result))
  return 0


def exit(code: int) -> None:
  """sys.exit(code); after a stop, os._exit: what is worth keeping is on disk, and a Ctrl-C can
  land inside XLA or a tf.data thread, after which the interpreter's teardown crashes in native
  code (a segmentation fault after the message, measured with jax 0.10.2 and TF 2.21)."""
  if code == STOPPED:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
  sys.exit(code)
