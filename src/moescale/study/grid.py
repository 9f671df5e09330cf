"""Grids of runs: `ScalingStudy` expands sizes x `Family`s into `Experiment`s, matching each
family's knob to the reference family per `Matching` (`moescale.pairs.solve_integer`); `table`
and `run_from_args` are what the experiment scripts print and do with their flags."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Mapping, Sequence

from moescale import accounting
from moescale.study.experiment import Experiment
from moescale.study.specs import DataSpec, ModelSpec, _json_value


@dataclasses.dataclass(frozen=True)
class Family:
  """An FFN family of a study: `build(size) -> ModelSpec`, or None where it does not apply.

  knob: the key of the size dict that matching may change (e.g. 'expert_size', 'd_ff');
  None: the family is never adjusted.
  train: what this family's runs change in the study's training settings: a dict or a
    function (size name, size) -> dict, merged over the study's `train` (the 'optimizer' dict
    key by key), e.g. Csordás et al.'s Top-K activation runs clip gradients at 0.1.
  matching: this family's own rule where it differs from the study's, e.g. families
    parameter-matched to the dense model in a study that matches the others' compute.
  """
  name: str
  build: Callable[[Mapping[str, Any]], ModelSpec | None]
  knob: str | None = None
  train: Mapping[str, Any] | Callable[[str, Mapping], Mapping] | None = None
  matching: Matching | None = None


@dataclasses.dataclass(frozen=True)
class Matching:
  """How the families of one size relate.

  quantity: None (no matching: e.g. Artetxe's shape twins) or one of moescale.pairs.MATCHES;
  reference: the family the others match; convention: for 'train_flops';
  multiple_of: round the knob to a multiple (hardware-friendly sizes);
  tolerance: a solved knob further off than this raises (the knob cannot reach the target).
  """
  quantity: str | None = None
  reference: str = 'dense'
  convention: str = 'standard'
  multiple_of: int = 1
  tolerance: float = 0.01


@dataclasses.dataclass(frozen=True)
class ScalingStudy:
  """A grid: every size x every family, matched to the reference family per `matching` (or
  per the family's own `Family.matching`).

  sizes: name -> size dict (free-form; what the family builders read).
  data, train: a DataSpec / TrainConfig-kwargs dict, or a function (size name, size) -> one.
  seeds: None (one run per configuration, named '<size>/<family>', trained with `train`'s
    seed) or the seeds to train each configuration with: its runs are then named
    '<size>/<family>/seed<N>', train with seed N (the initialisation and the data order), and
    carry meta 'config' ('<size>/<family>') and 'seed', which the analysis groups by to give
    each configuration's mean and spread. Matching is per configuration: seeds share the knob.
  Experiments live in root/<name>.
  """
  name: str
  sizes: Mapping[str, Mapping[str, Any]]
  families: Sequence[Family]
  data: DataSpec | Callable[[str, Mapping], DataSpec] | None = None
  train: Mapping[str, Any] | Callable[[str, Mapping], Mapping] = dataclasses.field(
      default_factory=dict)
  matching: Matching = Matching()
  seeds: Sequence[int] | None = None

  def __post_init__(self):
    names = [f.name for f in self.families]
    if len(set(names)) != len(names):
      raise ValueError(f'family names repeat: {names}')
    if self.seeds is not None:
      seeds = list(self.seeds)
      if (not seeds or len(set(seeds)) != len(seeds)
          or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in seeds)):
        raise ValueError(f'seeds={self.seeds!r}; valid: None or distinct integers >= 0, at '
                         'least one')
    from moescale import pairs
    for family in self.families:
      m = self.rule(family)
      if m.quantity is None:
        continue
      if m.quantity not in pairs.MATCHES:
        raise ValueError(f'Matching.quantity={m.quantity!r}; valid: None or '
                         f'{list(pairs.MATCHES)}')
      if m.reference not in names:
        raise ValueError(f'Matching.reference={m.reference!r} is not a family: {names}')

  def rule(self, family: Family) -> Matching:
    """The matching rule of a family: its own, else the study's."""
    return family.matching or self.matching

  def _resolve(self, value, size_name, size):
    return value(size_name, size) if callable(value) else value

  def _experiment(self, size_name, size, family, meta) -> Experiment | None:
    spec = family.build(size)
    if spec is None:
      return None
    return Experiment(name=f'{size_name}/{family.name}', model=spec,
                      data=self._resolve(self.data, size_name, size),
                      train=_merge_train(self._resolve(self.train, size_name, size),
                                         self._resolve(family.train, size_name, size)),
                      meta={'study': self.name, 'size': size_name, 'family': family.name,
                            **meta})

  def expand(self, only: Sequence[str] | None = None) -> list[Experiment]:
    """The grid's experiments, matched. only: size names to expand (default all)."""
    families = {f.name: f for f in self.families}
    references = {self.rule(f).reference for f in self.families
                  if self.rule(f).quantity is not None}
    out = []
    for size_name, size in self.sizes.items():
      if only and size_name not in only:
        continue
      refs = {name: self._experiment(size_name, size, families[name], {'role': 'reference'})
              for name in references}
      for family in self.families:
        m, ref = self.rule(family), refs.get(self.rule(family).reference)
        if family.name in refs:
          exp = refs[family.name]
        elif m.quantity is None or ref is None or family.knob is None:
          exp = self._experiment(size_name, size, family, {})
        else:
          exp = self._match(size_name, size, family, ref, m)
        if exp is not None:
          out.append(exp)
    if self.seeds is None:
      return out
    # Seed by seed: a study stopped early has whole seeds of the grid, not some configurations.
    return [_seeded(e, seed) for seed in self.seeds for e in out]

  def _match(self, size_name, size, family, ref: Experiment, m: Matching
             ) -> Experiment | None:
    from moescale import pairs
    target = _quantity(ref.counts, m.quantity, m.convention)
    if family.build(size) is None:
      return None

    def evaluate(x: int) -> float:
      exp = self._experiment(size_name, {**size, family.knob: x}, family, {})
      return _quantity(exp.counts, m.quantity, m.convention)

    start = size.get(family.knob)
    if not isinstance(start, int):
      raise ValueError(f'{size_name}: size[{family.knob!r}] must be an int to match '
                       f'{family.name}, got {start!r}')
    value, q = pairs.solve_integer(evaluate, target, start, m.multiple_of)
    if abs(q / target - 1) > m.tolerance:
      raise ValueError(f'{size_name}/{family.name}: {family.knob}={value} gets {m.quantity} '
                       f'{q:.4g} vs {target:.4g} ({100 * (q / target - 1):+.2f}%), outside '
                       f'the tolerance {m.tolerance}')
    return self._experiment(size_name, {**size, family.knob: value}, family,
                            {'matched': {'quantity': m.quantity, 'convention': m.convention,
                                         'to': m.reference, 'knob': family.knob,
                                         'value': value, 'ratio': q / target}})

  def write(self, root: str, experiments: Sequence[Experiment] | None = None
            ) -> list[tuple[Experiment, str]]:
    """Writes every run directory (config.gin, config.json) and root/study.json."""
    experiments = self.expand() if experiments is None else experiments
    runs = [(e, e.write(os.path.join(root, e.name))) for e in experiments]
    with open(os.path.join(root, 'study.json'), 'w') as f:
      json.dump({'study': self.name, 'runs': [{'name': e.name, 'dir': d,
                                               'meta': _json_value(dict(e.meta))}
                                              for e, d in runs]}, f, indent=1)
    return runs

  def run(self, root: str, experiments: Sequence[Experiment] | None = None) -> list[dict]:
    """Writes every run directory, then trains the runs one after another."""
    runs = self.write(root, experiments)
    return [e.launch(d) for e, d in runs]

  def evaluate(self, root: str, tasks=None, experiments: Sequence[Experiment] | None = None,
               **kwargs) -> dict[str, dict]:
    """The trained runs under root, evaluated from their checkpoints:
    `moescale.study.evaluation.evaluate_runs`."""
    from moescale.study.evaluation import evaluate_runs
    return evaluate_runs(root, self.expand() if experiments is None else experiments, tasks,
                         **kwargs)


def _seeded(e: Experiment, seed: int) -> Experiment:
  """One seed's run of a configuration (see ScalingStudy.seeds)."""
  return dataclasses.replace(e, name=f'{e.name}/seed{seed}', train={**e.train, 'seed': seed},
                             meta={**e.meta, 'config': e.name, 'seed': seed})


def run_from_args(study: 'ScalingStudy', root: str, only=None, families=None,
                  dry_run: bool = False, convention: str = 'standard',
                  emit_jobs: str | None = None, slurm=None) -> int:
  """What an experiment script does with its parsed flags: expand (optionally keeping some
  sizes / families), print the count table, then write the run directories (dry run), write
  each run as a scheduler job into emit_jobs (`study.jobs`; slurm: a `jobs.Slurm`), or train
  them one after another."""
  experiments = [e for e in study.expand(only)
                 if not families or e.meta['family'] in families]
  print(table(experiments, convention=convention))
  if emit_jobs:
    from moescale.study import jobs
    paths = jobs.write_jobs(experiments, root, emit_jobs, slurm or jobs.Slurm())
    print(f"{len(experiments)} jobs: {paths['commands']} (one command per run), "
          f"{paths['sbatch']} (sbatch it: a SLURM array, one task per run); runs under {root}")
    return 0
  if dry_run:
    runs = study.write(root, experiments)
    print(f'wrote {len(runs)} run directories under {root}')
    return 0
  for summary in study.run(root, experiments):
    print(summary, end='\n\n')
  return 0


def _quantity(c: accounting.ModelCount, quantity: str, convention: str) -> float:
  if quantity == 'train_flops':
    return c.train_flops_per_token[convention]
  if quantity == 'forward_flops':
    return c.flops_per_token
  return float(getattr(c, quantity))


def table(experiments: Sequence[Experiment], convention: str = 'standard') -> str:
  """A text table of the experiments' counts (what the experiments scripts' --dry_run print)."""
  from moescale.pairs import human
  head = ('run', 'params', 'active', f'train FLOPs/token ({convention})', 'matched')
  rows = []
  for e in experiments:
    c = e.counts
    m = e.meta.get('matched')
    note = (f"{m['knob']}={m['value']} ({m['quantity']} ratio {m['ratio']:.4f})" if m
            else e.meta.get('role', ''))
    rows.append((e.name, human(c.total_params), human(c.active_params),
                 human(c.train_flops_per_token[convention], 'G'), note))
  widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
  fmt = '  '.join(f'{{:<{w}}}' for w in widths)
  return '\n'.join([fmt.format(*head), fmt.format(*('-' * w for w in widths))] +
                   [fmt.format(*r) for r in rows])


def _merge_train(base: Mapping | None, override: Mapping | None) -> dict:
  """The study's training settings with a family's changes on top (optimizer key by key)."""
  out = dict(base or {})
  for key, value in (override or {}).items():
    if key == 'optimizer' and isinstance(out.get(key), Mapping):
      out[key] = {**out[key], **value}
    else:
      out[key] = value
  return out
