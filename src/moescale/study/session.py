"""A study end to end in one process: `run_study(study, root, Evaluation(...))`

1. picks the study directory (`choose_root`): root itself when it is new or holds this very
   grid (the same runs with the same config.gin: the study continues there), else the first
   free root-2, root-3, ...: earlier results are never overwritten;
2. writes every run directory, and checks every matched pair with the pair checker
   (`moescale.pairs`) before any training: each pair as a pair file in root/pairs/, so
   `moescale pairs check root/pairs/*.gin` repeats the check; one off stops the study;
3. trains the runs not finished yet, one after another (an interrupted one resumes from its
   latest checkpoint; a finished one is reused and said to be), all reading one data source;
4. evaluates each run by domain and on priming tasks (`evaluation.evaluate_runs`, reusing
   results saved for the same checkpoint);
5. writes root/report/report.md with its plots (`moescale.analysis.build_report`).

One progress display for the whole study (`progress.StudyProgress`); messages print above it.
The run directories are ordinary ones: `moescale eval`, `moescale report` and the notebook
read them.
"""

from __future__ import annotations

import dataclasses
import os
import textwrap
import time
from typing import Mapping, Sequence

from moescale.study.evaluation import evaluate_runs, latest_step
from moescale.study.experiment import Experiment
from moescale.study.grid import ScalingStudy
from moescale.study.progress import StudyProgress


class Stopped(RuntimeError):
  """A run stopped at a preemption notice (SIGTERM), checkpointed: the study stops there too,
  and the same call continues it."""


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """What each trained run is evaluated on (see `evaluation.evaluate_runs`)."""
  tasks: tuple[str, ...] | None = None
  max_batches: int | None = None
  priming: tuple[str, ...] | Mapping[str, Mapping] = ()
  shots: tuple[int, ...] = (0,)
  max_examples: int | None = None


@dataclasses.dataclass
class StudyResult:
  """Where the study went and what happened: trained / reused run names, the pair checks
  (`moescale.pairs.PairResult`), the evaluations, the report (`analysis.Report`) and the
  seconds each phase took."""
  root: str
  continued: bool
  trained: list[str]
  reused: list[str]
  checks: list
  evaluations: dict
  report: object
  seconds: dict[str, float]


def _same_grid(root: str, experiments: Sequence[Experiment]) -> bool | None:
  """None: root is free (absent or empty); True: it holds exactly these runs with the same
  config.gin; False: anything else."""
  if not os.path.isdir(root) or not os.listdir(root):
    return None
  import json
  try:
    with open(os.path.join(root, 'study.json')) as f:
      listed = [r['name'] for r in json.load(f)['runs']]
  except (OSError, ValueError, KeyError, TypeError):
    return False
  if sorted(listed) != sorted(e.name for e in experiments):
    return False
  for e in experiments:
    run_dir = os.path.join(root, e.name)
    try:
      with open(os.path.join(run_dir, 'config.gin')) as f:
        if f.read() != e.to_gin(run_dir):
          return False
    except OSError:
      return False
  return True


def choose_root(root: str, experiments: Sequence[Experiment]) -> tuple[str, bool]:
  """(the study directory, whether it continues the same grid there): root if free or
  holding this grid, else the first root-N (N = 2, 3, ...) that is."""
  root = os.path.normpath(root)
  candidate, n = root, 1
  while True:
    same = _same_grid(candidate, experiments)
    if same is not False:
      return candidate, bool(same)
    n += 1
    candidate = f'{root}-{n}'


def _length_bindings(e: Experiment) -> list[str]:
  """The macros the pair checker reads for attention FLOPs (`pairs.context_lengths`): a
  study's config.gin binds the lengths on its data and model, not as macros."""
  keys, segment = e.lengths()
  if segment:
    return [f"TASK_FEATURE_LENGTHS = {{'targets': {segment}}}", f'MEM_LEN = {keys - segment}']
  return [f'MAX_LENGTH = {keys}']


def check_pairs(study: ScalingStudy, runs: Sequence[tuple[Experiment, str]], root: str) -> list:
  """Every matched run against its reference, by the pair checker from the written
  config.gin files; each pair also written as root/pairs/<size>_<family>.gin. Raises
  ValueError, with the checker's table, if a pair is off its target."""
  from moescale import pairs
  dirs = {e.name: d for e, d in runs}
  families = {f.name: f for f in study.families}
  results, checked = [], set()
  for e, d in runs:
    m = e.meta.get('matched')
    # Seeds of one configuration share its matched knob: one check per configuration.
    if not m or e.meta.get('config', e.name) in checked:
      continue
    checked.add(e.meta.get('config', e.name))
    seed = f"/seed{e.meta['seed']}" if 'seed' in e.meta else ''
    ref = f"{e.meta['size']}/{m['to']}{seed}"
    name = f"{e.meta['size']}_{e.meta['family']}"
    pair = pairs.Pair(
        dense=[os.path.abspath(os.path.join(dirs[ref], 'config.gin'))],
        sparse=[os.path.abspath(os.path.join(d, 'config.gin'))],
        dense_bindings=_length_bindings(e), sparse_bindings=_length_bindings(e),
        match=m['quantity'], convention=m['convention'],
        tolerance=study.rule(families[e.meta['family']]).tolerance, name=name,
        description=f'{study.name}: {e.name} ({m["knob"]}={m["value"]}) matched to {ref} in '
                    f'{m["quantity"]}; "dense" is the reference run.')
    os.makedirs(os.path.join(root, 'pairs'), exist_ok=True)
    with open(os.path.join(root, 'pairs', f'{name}.gin'), 'w') as f:
      f.write(pairs.to_gin(pair))
    results.append(pairs.check(pair))
  off = [r for r in results if not r.ok]
  if off:
    raise ValueError(f'{len(off)} matched pair(s) off target; nothing trained:\n'
                     + pairs.format_table(results))
  return results


def _train(runs, display: StudyProgress) -> None:
  """Trains the runs in order, every run of the same data reading one built source."""
  if not runs:
    return
  sources = {}
  display.phase('training', sum(e.train.get('train_steps', 0) - (latest_step(d) or 0)
                                for e, d in runs), 'step')
  for i, (e, d) in enumerate(runs):
    display.label(f'{e.name} ({i + 1}/{len(runs)})')
    key = tuple(e.data.gin_lines())
    if key not in sources:
      sources[key] = e.data.build()
    summary = e.launch(d, data=display.ticking(sources[key]), progress=False)
    if summary.preempted:
      raise Stopped(f'{e.name} stopped at step {summary.final_step} (a preemption notice), '
                    f'checkpointed in {d}')


def _write(study: ScalingStudy, root: str, experiments: Sequence[Experiment], continued: bool
           ) -> list[tuple[Experiment, str]]:
  """The run directories: all written in a new study directory; in a continued one (whose
  config.gin files `choose_root` found the same) only what is missing, so a study run again
  leaves every earlier file as it was."""
  if not continued:
    return study.write(root, experiments)
  runs = [(e, os.path.join(root, e.name)) for e in experiments]
  for e, d in runs:
    if not os.path.isfile(os.path.join(d, 'config.json')):
      e.write(d)
  return runs


def run_study(study: ScalingStudy, root: str, evaluation: Evaluation | None = None, *,
              experiments: Sequence[Experiment] | None = None, progress: bool = True
              ) -> StudyResult:
  """The study end to end (see the module docstring); returns what it did."""
  from moescale import analysis
  experiments = study.expand() if experiments is None else list(experiments)
  asked = os.path.normpath(root)
  root, continued = choose_root(root, experiments)
  display = StudyProgress(study.name, enabled=progress)
  if root != asked:
    display.note(f'{asked} holds other runs (not this grid): left as it is; this study goes '
                 f'to {root}')
  seconds, t = {}, time.perf_counter()
  runs = _write(study, root, experiments, continued)
  checks = check_pairs(study, runs, root)
  display.note(f'{study.name}: {len(runs)} runs in {root}; {len(checks)} matched pairs pass '
               f'the pair checker ({os.path.join(root, "pairs")})')
  finished = {e.name for e, d in runs if latest_step(d) == e.train.get('train_steps')}
  done = [(e, d) for e, d in runs if e.name in finished]
  todo = [(e, d) for e, d in runs if e.name not in finished]
  if done:
    display.note(_wrap(f'reusing {len(done)} finished run(s) in {root}, not trained again: '
                       + ', '.join(e.name for e, _ in done)))
  try:
    _train(todo, display)
    seconds['train'], t = time.perf_counter() - t, time.perf_counter()
    ev = evaluation or Evaluation()
    display.phase('evaluating', len(runs), 'run')
    results = evaluate_runs(root, experiments, ev.tasks, max_batches=ev.max_batches,
                            priming=ev.priming, shots=ev.shots, max_examples=ev.max_examples,
                            reuse=True, progress=display)
    reused = [name for name, r in results.items() if r['reused']]
    if reused:
      display.note(_wrap(f'reusing the saved evaluations of {len(reused)} run(s): '
                         + ', '.join(reused)))
    seconds['evaluate'], t = time.perf_counter() - t, time.perf_counter()
    display.label('report')
    report = analysis.build_report([d for _, d in runs], os.path.join(root, 'report'))
    seconds['report'] = time.perf_counter() - t
  finally:
    display.close()
  return StudyResult(root, continued, [e.name for e, _ in todo], [e.name for e, _ in done],
                     checks, results, report, seconds)


def _wrap(text: str) -> str:
  return textwrap.fill(text, 100, subsequent_indent='  ', break_on_hyphens=False)


def summary(result: StudyResult) -> str:
  """What a study's end prints: the speedup table (FLOPs and device-seconds), the
  parameter-matched comparison, zero-shot priming, what is missing, where everything is."""
  from moescale.analysis import seeds, tables
  r = result.report
  out = []
  if r.analysis is not None and seeds.has_seeds(r.analysis.speedups):
    out.append('Speedup over the dense runs, per configuration (mean over seeds) and domain:\n'
               + tables.text_table(*tables.speedup_group_rows(seeds.speedups(r.analysis))))
  elif r.analysis is not None:
    out.append('Speedup over the dense runs, per domain:\n' + tables.speedup_table(r.analysis))
  if r.pairs and seeds.has_seeds(r.pairs):
    out.append('Parameter-matched, per configuration over its seeds (each seed against the '
               'dense run of its parameters and seed):\n'
               + tables.text_table(*tables.matched_group_rows(seeds.matched(r.pairs))))
  elif r.pairs:
    out.append('Parameter-matched (each run against the dense run of its parameter count):\n'
               + tables.pairs_table(r.pairs))
  if r.priming:
    rows = [[p['run'], p['task'], f"{p['shots']}", f"{p['examples']}",
             f"{p['accuracy'].get('per_byte', {}).get('mean', float('nan')):.3f}",
             f"{p['chance']:.3f}"] for p in r.priming]
    out.append('Priming (accuracy, per-byte normalised):\n' + tables.text_table(
        ['run', 'task', 'shots', 'examples', 'accuracy', 'chance'], rows))
  out += [_wrap(f'missing: {line}') for line in r.missing]
  took = ', '.join(f'{k} {v:.0f} s' for k, v in result.seconds.items())
  reused = f'; reused {len(result.reused)} finished run(s)' if result.reused else ''
  out.append(_wrap(f'The study: {result.root} (trained {len(result.trained)} run(s){reused}; '
                   f'{took})') + f'\nThe report: {r.path} ({len(r.plots)} plots beside it)')
  return '\n\n'.join(out)
