"""A seqio mixture's training batches, per host, resumable in O(1).

    it = MixtureIterator([('wiki', 3.0, wiki_docs), ('code', 1.0, code_docs)], length=512,
                         batch_size=64, shard_id=h, num_shards=H, seed=0)
    batch = next(it)        # dict of int32 [64 // H, 512], the packed features
    saved = it.position()   # {'mixture_steps': 1, 'tasks': [['code', 2500], ['wiki', 7500]], ...}

What `SeqioDataSource.train_iterator` uses for a mixture with packing. seqio's own mixture
(`DataPipeline`) samples each example's task at random; its position is the number of batches
taken, so resuming means replaying them all: at the papers' 300B tokens, re-reading the run.

Here each task is a row stream of its own (moescale.data.sharded: this host's share of the
task's documents, chunks permuted every epoch, cut into rows; any rows of it are computable
from their index). A batch takes whole rows from the tasks in the mixture's proportions, and
which task fills which row follows a fixed schedule, so the rows of batch k, and how many rows
of each task came before it, are arithmetic on k:

    rates (seqio's get_rate, normalised) -> integer weights w_t summing to PERIOD (10,000;
        largest remainder, at least 1 each: rates are kept to 1e-4)
    schedule: the task of each of the PERIOD rows of a period, by smooth weighted round robin
        (every task t gains w_t credit a row; the task with the most credit takes the row and
        pays PERIOD), which spreads each task evenly over the period
    host row n (n = k · rows + j) is task schedule[n mod PERIOD]'s row
        (n // PERIOD) · w_t + (rows of t among the first n mod PERIOD of the schedule)

Worked example: rates 3 : 1 give weights 7500 and 2500. Credits after each row's gain:
(7500, 2500) -> wiki; (5000, 5000) -> wiki (a tie goes to the first); (2500, 7500) -> code;
(10000, 0) -> wiki; then it repeats: wiki, wiki, code, wiki, ... With 4 rows a batch, every
batch holds 3 wiki rows and 1 code row; with 6, batches alternate 5 : 1 and 4 : 2.

The position is the number of batches taken (the same on every host); resuming at batch k
builds the iterator and computes, costing what starting does. Hosts read disjoint document
shares of every task (documents i with i mod H = h), as `ShardedIterator` does for one task.

Against seqio's sampling: proportions are exact (every task within one row of rate × rows
after any number of rows: tests/test_data_mixture.py checks every prefix of a period for four
sets of rates) instead of random; a row holds one task's text
(seqio packs examples of several tasks into one row); a task runs into its next epoch on its
own, as seqio's repeated task datasets do.
"""

from __future__ import annotations

from typing import Iterator, Mapping, Sequence

import numpy as np

from moescale.data import sharded

Batch = dict[str, np.ndarray]
PERIOD = 10_000


def integer_weights(rates: Sequence[float], period: int = PERIOD) -> np.ndarray:
  """`rates` as integers summing to `period` (largest remainder), each at least 1: [tasks]."""
  rates = np.asarray(rates, np.float64)
  if len(rates) == 0 or not np.all(np.isfinite(rates)) or (rates <= 0).any():
    raise ValueError(f'mixture rates {rates.tolist()}: expected one positive rate per task')
  if len(rates) > period:
    raise ValueError(f'{len(rates)} tasks: at most {period} fit a schedule period')
  quota = rates / rates.sum() * period
  weights = np.maximum(np.floor(quota).astype(np.int64), 1)
  # Hand out (or take back) the rows rounding left over, by largest (smallest) remainder.
  remainder = quota - weights
  while weights.sum() < period:
    t = int(np.argmax(remainder))
    weights[t] += 1
    remainder[t] -= 1
  while weights.sum() > period:
    t = int(np.argmin(np.where(weights > 1, remainder, np.inf)))
    weights[t] -= 1
    remainder[t] += 1
  return weights


def row_schedule(weights: np.ndarray) -> np.ndarray:
  """The task of each row of one period (smooth weighted round robin): [sum(weights)] int."""
  period = int(weights.sum())
  credit = np.zeros(len(weights), np.int64)
  out = np.empty(period, np.int64)
  for n in range(period):
    credit += weights
    t = int(np.argmax(credit))   # ties: the first task
    out[n] = t
    credit[t] -= period
  return out


def _task_seed(seed: int, task: int) -> int:
  return int(np.random.SeedSequence([seed, task, 0x6d6978]).generate_state(1)[0])


class MixtureIterator(Iterator[Batch]):
  """This host's packed batches of a mixture, with a position of one integer.

  Args:
    tasks: (name, rate, this host's documents of the task tokenized) per task.
    length: tokens per row.
    batch_size: GLOBAL rows per step; this host gets batch_size / num_shards.
    shard_id, num_shards: this host and the number of hosts.
    seed: each task's chunk order (a different permutation every epoch of the task).
    name: for error messages.
    state: a `position()` to resume from.
  """

  def __init__(self, tasks: Sequence[tuple[str, float, Sequence[np.ndarray]]], length: int,
               batch_size: int, *, shard_id: int = 0, num_shards: int = 1, seed: int = 0,
               name: str = 'mixture', state: Mapping | None = None):
    self.names = [t[0] for t in tasks]
    self.weights = integer_weights([t[1] for t in tasks])
    self._streams = [
        sharded.ShardedIterator(docs, length, batch_size, shard_id=shard_id,
                                num_shards=num_shards, seed=_task_seed(seed, i),
                                name=f'{name}/{task}')
        for i, (task, _, docs) in enumerate(tasks)]
    self.length, self.rows = length, batch_size // num_shards
    self.seed, self.num_shards, self.name = int(seed), num_shards, name
    self._schedule = row_schedule(self.weights)
    # [tasks, PERIOD + 1]: rows of each task among the first i rows of a period.
    self._before = np.concatenate(
        [np.zeros((len(tasks), 1), np.int64),
         np.cumsum(self._schedule[None] == np.arange(len(tasks))[:, None], axis=1)], axis=1)
    self._steps = 0
    if state is not None:
      self.restore(state)

  def __iter__(self) -> MixtureIterator:
    return self

  @property
  def task_rows_per_epoch(self) -> list[int]:
    """Rows of one epoch of each task's share on this host (its last row partly padding)."""
    return [s.rows_per_epoch for s in self._streams]

  def task_rows_before(self, n: int) -> np.ndarray:
    """Rows each task gave to this host's first n rows: [tasks]."""
    cycles, i = divmod(n, PERIOD)
    return cycles * self.weights + self._before[:, i]

  def __next__(self) -> Batch:
    n = self._steps * self.rows
    before, after = self.task_rows_before(n), self.task_rows_before(n + self.rows)
    task_of_row = self._schedule[(n + np.arange(self.rows)) % PERIOD]
    out = None
    for t, stream in enumerate(self._streams):
      if after[t] == before[t]:
        continue
      part = stream.take_rows(int(before[t]), int(after[t] - before[t]))
      if out is None:
        out = {k: np.zeros((self.rows, self.length), v.dtype) for k, v in part.items()}
      for k, v in part.items():
        out[k][task_of_row == t] = v
    self._steps += 1
    return out

  def position(self) -> dict:
    """Batches taken (the same on every host), and what a resume must match."""
    return {'mixture_steps': self._steps, 'seed': self.seed, 'num_shards': self.num_shards,
            'rows': self.rows, 'length': self.length,
            'tasks': [[n, int(w)] for n, w in zip(self.names, self.weights)]}

  state = position

  def restore(self, state: Mapping) -> None:
    if 'mixture_steps' not in state:
      raise ValueError(
          f'data position {dict(state)} was not saved by a mixture iterator (it has no '
          "'mixture_steps'): a moescale.data.pipeline.DataPipeline position, which "
          'SeqioDataSource.train_iterator resumes with DataPipeline')
    have = self.position()
    bad = {k: (state[k], have[k]) for k in ('seed', 'num_shards', 'rows', 'length', 'tasks')
           if k in state and state[k] != have[k]}
    if bad:
      raise ValueError(
          f'{self.name}: the data position was saved with '
          f'{ {k: s for k, (s, _) in bad.items()} }, this iterator has '
          f'{ {k: h for k, (_, h) in bad.items()} }: the rows of a batch depend on the seed, '
          'the number of hosts, the per-host batch, the row length and the tasks and weights')
    self._steps = int(state['mixture_steps'])
