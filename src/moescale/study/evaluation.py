"""A study's trained runs evaluated from their checkpoints (`evaluate_runs`, what
`ScalingStudy.evaluate` does): perplexity by domain and priming tasks, through
`moescale.evaluate`, each result saved beside its checkpoint (RUN_DIR/eval/) as `moescale eval`
and `moescale prime` save theirs. With reuse=True, results already saved for a run's latest
checkpoint are read back instead of computed again (a study run a second time, or continued
after an interruption)."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Mapping, Sequence

from moescale.study.experiment import Experiment


def latest_step(run_dir: str) -> int | None:
  """The step of run_dir's latest complete checkpoint (None: none yet)."""
  if not os.path.isdir(os.path.join(run_dir, 'checkpoints')):
    return None
  from moescale.train import checkpoint
  ckpt = checkpoint.Checkpointer(run_dir, keep=None)
  try:
    return ckpt.latest_step()
  finally:
    ckpt.close()


def saved_results(run_dir: str, kind: str, step: int) -> dict:
  """The results saved in run_dir/eval/<kind>_step<step>.json ({} if none)."""
  path = os.path.join(run_dir, 'eval', f'{kind}_step{step}.json')
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    return json.load(f).get('results', {})


def evaluate_runs(root: str, experiments: Sequence[Experiment], tasks=None, *,
                  max_batches: int | None = None,
                  priming: Sequence[str] | Mapping[str, Mapping] = (),
                  shots: Sequence[int] = (0,), draws: int | None = None,
                  max_examples: int | None = None, reuse: bool = False,
                  progress=None) -> dict[str, dict]:
  """{run name: {'step', 'perplexity': {task: metrics}, 'priming': {'task/kshot': result},
  'reused': [the parts read back]}} for every experiment under root that has a checkpoint.

  tasks: perplexity tasks (None: each run's own evaluation splits); max_batches: at most this
  many batches per task; priming: task specs scored at each number of `shots`, on at most
  max_examples examples (or a mapping spec -> the task builder's arguments, e.g.
  {'sotu_next_sentence': {'max_continuation_chars': 32}} for short sequences); reuse: take
  the results saved for the same checkpoint (perplexity only where tasks are named: a run's
  own splits are known once its data is built); progress: a `StudyProgress`, advanced once a
  run."""
  if not isinstance(priming, Mapping):
    priming = {spec: {} for spec in priming}
  evaluator = _Evaluator(tasks, max_batches, dict(priming), tuple(shots), draws, max_examples,
                         reuse)
  out = {}
  for e in experiments:
    run_dir = os.path.join(root, e.name)
    step = latest_step(run_dir)
    if step is None:
      continue
    if progress is not None:
      progress.label(e.name)
    out[e.name] = evaluator.run(e, run_dir, step)
    if progress is not None:
      progress.advance()
  return out


@dataclasses.dataclass
class _Evaluator:
  """A study's evaluation settings, and what its runs share, each built once: the data
  source per data spec (building one reads and tokenizes every evaluation split again) and
  the priming tasks (a built-in one takes seconds to make)."""
  tasks: Sequence[str] | None
  max_batches: int | None
  priming: dict[str, Mapping]
  shots: tuple[int, ...]
  draws: int | None
  max_examples: int | None
  reuse: bool
  sources: dict = dataclasses.field(default_factory=dict)
  loaded: dict = dataclasses.field(default_factory=dict)

  def run(self, e: Experiment, run_dir: str, step: int) -> dict:
    res = {'step': step, **self._saved(run_dir, step)}
    res['reused'] = [part for part in ('perplexity', 'priming') if part in res]
    if not self.priming:
      res['priming'] = {}
    if 'perplexity' in res and 'priming' in res:
      return res
    from moescale.evaluate import lm
    run = self._load(e, run_dir, step)
    if 'perplexity' not in res:
      from moescale.evaluate import perplexity
      res['perplexity'] = perplexity(run, self.tasks, max_batches=self.max_batches)
      lm.save(run, 'perplexity', res['perplexity'])
    if 'priming' not in res:
      from moescale.evaluate import prime
      res['priming'] = {f'{spec}/{k}shot': prime(run, self._task(spec), k, draws=self.draws,
                                                 max_examples=self.max_examples)
                        for spec in self.priming for k in self.shots}
      lm.save(run, 'priming', res['priming'])
    return res

  def _saved(self, run_dir: str, step: int) -> dict:
    """The parts of this checkpoint's evaluation saved whole already (reuse=True)."""
    out = {}
    if not self.reuse:
      return out
    saved = saved_results(run_dir, 'perplexity', step) if self.tasks else {}
    if self.tasks and all(t in saved for t in self.tasks):
      out['perplexity'] = {t: saved[t] for t in self.tasks}
    keys = [f'{spec}/{k}shot' for spec in self.priming for k in self.shots]
    saved = saved_results(run_dir, 'priming', step) if keys else {}
    if keys and all(k in saved for k in keys):
      out['priming'] = {k: saved[k] for k in keys}
    return out

  def _task(self, spec: str):
    if spec not in self.loaded:
      from moescale.evaluate import load_task
      self.loaded[spec] = load_task(spec, **self.priming[spec])
    return self.loaded[spec]

  def _load(self, e: Experiment, run_dir: str, step: int):
    """The run at `step`, reading the source of the first run with the same data spec."""
    from moescale.evaluate import load_run
    run = load_run(run_dir, step)
    key = None if e.data is None else tuple(e.data.gin_lines())
    if key is not None and key in self.sources:
      run.data = self.sources[key]  # `Run.data` is a cached property: this is its value
    elif key is not None:
      self.sources[key] = run.data
    return run
