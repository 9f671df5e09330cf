"""A run's training history from its metrics.jsonl, as arrays: the loss curve, the logged
evaluations by domain, and the routing statistics of its sparse layers over training.

    h = read_history('runs/small/moe')
    h.loss            (steps [n], values [n])        training loss at each log step
    h.evals           {domain: (steps, eval loss)}   the evaluations logged while training
    h.usage           {layer: (steps [n], [n, E])}   each expert's share of the kept
                                                     assignments (MoE layers)
    h.dropped         {layer: (steps, fraction)}     capacity overflow (top-k MoE)

The trainer logs training records ('loss', ...) and evaluation records ('<task>/eval_loss',
...) as lines of one file, sometimes on the same line; routing metrics are named
'routing/layer_NN/<metric>'. NumPy only: no JAX, no TensorFlow.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from moescale.analysis import collect

_ROUTING = re.compile(r'routing/(layer_\d+)/(expert_usage|fraction_dropped)$')
_EVAL = re.compile(r'(.+)/eval_loss$')

Series = tuple[np.ndarray, np.ndarray]


@dataclasses.dataclass
class History:
  run: str
  loss: Series
  evals: dict[str, Series]
  usage: dict[str, Series]
  dropped: dict[str, Series]

  @property
  def routed(self) -> bool:
    """Whether any layer logged expert usage (a MoE run)."""
    return bool(self.usage)


def read_history(run_dir: str, name: str | None = None) -> History:
  """The History of run_dir (named `name`, default the directory's base name)."""
  records = collect.read_metrics(run_dir)
  loss, evals, usage, dropped = [], {}, {}, {}
  for r in records:
    step = r.get('step')
    if step is None:
      continue
    if 'loss' in r:
      loss.append((step, r['loss']))
    for key, value in r.items():
      if (m := _EVAL.match(key)) and value is not None:
        evals.setdefault(m.group(1), []).append((step, value))
      elif (m := _ROUTING.match(key)) and value is not None:
        into = usage if m.group(2) == 'expert_usage' else dropped
        into.setdefault(m.group(1), []).append((step, value))
  return History(name or run_dir.rstrip('/').rsplit('/', 1)[-1], _series(loss),
                 {k: _series(v) for k, v in evals.items()},
                 {k: _series(v) for k, v in sorted(usage.items())},
                 {k: _series(v) for k, v in sorted(dropped.items())})


def _series(points: list) -> Series:
  """(steps, values) sorted by step, the last value of a step kept (a resumed run logs the
  steps after its checkpoint again)."""
  by_step = dict(points)
  steps = np.array(sorted(by_step), dtype=np.int64)
  return steps, np.array([by_step[s] for s in steps], dtype=np.float64)


def usage_summary(h: History) -> list[dict]:
  """Per routed layer, at the last log: the largest and smallest expert share against the
  uniform 1/E, and the mean dropped fraction over training (None without one)."""
  out = []
  for layer, (steps, usage) in h.usage.items():
    last = usage[-1]
    drop = h.dropped.get(layer)
    out.append({'layer': layer, 'experts': int(last.shape[0]), 'step': int(steps[-1]),
                'max_share': float(last.max()), 'min_share': float(last.min()),
                'uniform': 1.0 / last.shape[0],
                'mean_dropped': None if drop is None else float(drop[1].mean())})
  return out
