"""A grid as independent jobs for a scheduler: at paper scale every run is its own multi-host
job, and an existing scheduler (SLURM, or any that runs command lines) runs them.

    write_jobs(study.expand(), root='gs://bucket/study', jobs_dir='jobs/study')

writes, for N runs:

    jobs/study/<run>.gin     each run's operative config (`Experiment.to_gin`), its MODEL_DIR
                             under root (a local path or cloud storage the hosts can reach)
    jobs/study/commands.txt  line i: the i-th run's `moescale train --gin_file=... --multiprocess`
    jobs/study/slurm_array.sbatch   a SLURM job array, one task per run: task i runs line i+1
                             of commands.txt with `srun` on its nodes, one process per node
                             (JAX reads the cluster from SLURM's environment)
    jobs/study/study.json    the runs, their directories and study labels

`moescale report ROOT` then finds the runs the jobs wrote below ROOT (local or cloud storage).

Nothing here trains or imports JAX's runtime: writing the jobs of a 1T-parameter grid takes
seconds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
from typing import Sequence

from moescale.study.experiment import Experiment
from moescale.study.specs import _json_value


@dataclasses.dataclass(frozen=True)
class Slurm:
  """The job array's resources per run (None: the cluster's default, no directive written).

  nodes: hosts per run (one JAX process each); gpus_per_node: `--gpus-per-node`;
  time: wall-clock limit ('2-00:00:00'); partition, account: the cluster's names;
  max_parallel: runs at once (`--array=0-N%max_parallel`); setup: shell lines run before the
  command on each task (e.g. activating the environment that has moescale).
  """
  nodes: int = 1
  gpus_per_node: int | None = None
  cpus_per_task: int | None = None
  time: str | None = None
  partition: str | None = None
  account: str | None = None
  max_parallel: int | None = None
  setup: Sequence[str] = ()

  def __post_init__(self):
    if self.nodes < 1:
      raise ValueError(f'nodes={self.nodes} must be >= 1')
    if self.max_parallel is not None and self.max_parallel < 1:
      raise ValueError(f'max_parallel={self.max_parallel} must be >= 1 or None')


def job_name(run: str) -> str:
  """A run name ('small/moe') as a file name ('small__moe')."""
  return re.sub(r'[^A-Za-z0-9_.-]', '_', run.replace('/', '__'))


def command(gin_path: str, multiprocess: bool = True) -> str:
  """The command line that trains one run from its config."""
  args = ['moescale', 'train', f'--gin_file={gin_path}']
  return shlex.join(args + (['--multiprocess'] if multiprocess else []))


def write_jobs(experiments: Sequence[Experiment], root: str, jobs_dir: str,
               slurm: Slurm = Slurm(), multiprocess: bool = True) -> dict[str, str]:
  """Writes the files of the module docstring; returns {'commands', 'sbatch', 'study'} paths.

  root: where the runs' directories will be (each run's MODEL_DIR = root/<run name>), as the
  hosts see it. multiprocess: pass --multiprocess (a multi-host run; JAX detects the cluster).
  """
  if not experiments:
    raise ValueError('no experiments to write jobs for')
  names = [e.name for e in experiments]
  if len(set(names)) != len(names):
    raise ValueError(f'run names repeat: {names}')
  os.makedirs(jobs_dir, exist_ok=True)
  lines, runs = [], []
  for e in experiments:
    model_dir = _join(root, e.name)
    gin_path = os.path.abspath(os.path.join(jobs_dir, f'{job_name(e.name)}.gin'))
    with open(gin_path, 'w') as f:
      f.write(e.to_gin(model_dir))
    lines.append(command(gin_path, multiprocess))
    runs.append({'name': e.name, 'dir': model_dir, 'meta': _json_value(dict(e.meta))})
  paths = {'commands': os.path.join(jobs_dir, 'commands.txt'),
           'sbatch': os.path.join(jobs_dir, 'slurm_array.sbatch'),
           'study': os.path.join(jobs_dir, 'study.json')}
  with open(paths['commands'], 'w') as f:
    f.write('\n'.join(lines) + '\n')
  with open(paths['sbatch'], 'w') as f:
    f.write(sbatch_script(os.path.abspath(paths['commands']), len(lines), slurm))
  with open(paths['study'], 'w') as f:
    json.dump({'study': experiments[0].meta.get('study'), 'root': root, 'runs': runs}, f,
              indent=1)
  return paths


def sbatch_script(commands_path: str, num_runs: int, slurm: Slurm) -> str:
  """A SLURM array script: task i runs line i + 1 of commands_path on its nodes."""
  array = f'0-{num_runs - 1}' + (f'%{slurm.max_parallel}' if slurm.max_parallel else '')
  directives = [('job-name', 'moescale'), ('array', array), ('nodes', slurm.nodes),
                ('ntasks-per-node', 1), ('gpus-per-node', slurm.gpus_per_node),
                ('cpus-per-task', slurm.cpus_per_task), ('time', slurm.time),
                ('partition', slurm.partition), ('account', slurm.account),
                ('output', 'moescale_%A_%a.out')]
  head = ['#!/bin/bash', f'# moescale: {num_runs} runs, one array task each (study/jobs.py).',
          '# Submit: sbatch slurm_array.sbatch', *(
              f'#SBATCH --{k}={v}' for k, v in directives if v is not None)]
  body = ['set -euo pipefail', *slurm.setup,
          f'cmd=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {shlex.quote(commands_path)})',
          'echo "task $SLURM_ARRAY_TASK_ID: $cmd"',
          '# One process per node: jax.distributed.initialize() (--multiprocess) reads the',
          "# coordinator and the process ids from SLURM's environment.",
          'srun bash -c "$cmd"']
  return '\n'.join(head + [''] + body) + '\n'


def _join(root: str, name: str) -> str:
  # Cloud paths are joined with '/', whatever the local os.sep.
  return root.rstrip('/') + '/' + name if '://' in root else os.path.join(root, name)


def add_flags(p) -> None:
  """The experiment scripts' flags for writing the grid as jobs (argparse)."""
  p.add_argument('--emit_jobs', default=None, metavar='DIR',
                 help='write each run as a scheduler job into DIR (commands.txt and a SLURM '
                      'array script) instead of training; runs go under --root')
  p.add_argument('--nodes', type=int, default=1, help='hosts per run (with --emit_jobs)')
  p.add_argument('--gpus_per_node', type=int, default=None, help='with --emit_jobs')
  p.add_argument('--time', default=None, help="SLURM time limit per run, e.g. '2-00:00:00'")
  p.add_argument('--partition', default=None, help='SLURM partition')
  p.add_argument('--account', default=None, help='SLURM account')


def from_args(args) -> dict:
  """run_from_args's keyword arguments from the flags of `add_flags`."""
  return {'emit_jobs': args.emit_jobs,
          'slurm': Slurm(nodes=args.nodes, gpus_per_node=args.gpus_per_node, time=args.time,
                         partition=args.partition, account=args.account)}
