"""Per-host training batches from per-host document shards, resumable in O(1).

    it = ShardedIterator(share_tokens('moescale_sotu', 'train', shard_id=h, num_shards=H),
                         length=512, batch_size=64, shard_id=h, num_shards=H, seed=0)
    batch = next(it)           # dict of int32 [64 // H, 512], the packed features
    saved = it.position()      # {'sharded_steps': 1, 'seed': 0, 'num_shards': H, ...}
    later = ShardedIterator(..., state=saved)   # continues with the 2nd batch, no replay

What `SeqioDataSource.train_iterator` uses for a task with packing, and, through `take_rows`,
for each task of a mixture (moescale.data.mixture). moescale.data.pipeline's `DataPipeline`
remains for `pack=False`, evaluation, and positions saved before this module existed.

Sharding: host h of H tokenizes and trains on only documents h, h + H, h + 2H, ... of the
split (seqio.ShardInfo(h, H) on the source, before any preprocessing), the same share every
epoch, so across the hosts every document is read by exactly one host, once per epoch. (The
source still lists the split's documents on every host, as text: `DocumentSource` shards its
document stream, which for an in-memory split is a cached tuple of bytes.)

Order and packing: the host's documents are tokenized by the task's own preprocessing
(tokenizer, EOS) and cut into chunks of `length` tokens (the last of a document shorter), as
the task's chunking does. Each epoch permutes the chunks with a seed drawn from
(seed, epoch, shard_id), concatenates them and cuts the stream into rows of `length` tokens.
The features are those of seqio.DecoderFeatureConverter(pack=True): a segment per piece of a
chunk in a row (decoder_segment_ids 1, 2, ...; 0 on padding), decoder_positions restarting in
every segment, inputs shifted right within a segment (0 first). A chunk crossing a row
boundary continues in the next row as a new segment. Only the epoch's last row and batch are
padded (empty rows, loss weight 0): nothing is dropped, and the number of rows of an epoch
does not depend on the order, which is what makes a batch's rows computable from its index.

Because every host packs its own rows, the global batch (the hosts' rows side by side)
depends on the number of hosts, and hosts may have different numbers of batches per epoch
(their shares differ in tokens); each host simply runs into its next epoch. The position is
therefore the number of batches taken, which is the same on every host (the trainer takes
one per step) and is all a host needs: epoch = steps // batches_per_epoch, and the rows of
batch k start at token k * rows * length of that epoch's stream of permuted chunks.

Costs, stated: building an iterator tokenizes the host's share of the split once and keeps
its tokens in host memory (1/H of the split; the stream mode keeps it whole); every batch
after that is numpy slicing, an epoch change is one permutation of the chunks, and resuming
at any position costs the same as starting (measured by tests/test_data_resume.py). Splits
larger than host memory / H would need per-document offsets on disk; not served here.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import numpy as np

Batch = dict[str, np.ndarray]


def share_tokens(mixture_or_task_name: str, split: str, vocabulary: Any = None, *,
                 shard_id: int = 0, num_shards: int = 1) -> list[np.ndarray]:
  """Host `shard_id`'s documents of a task's split, tokenized: one int32 array each.

  Documents i with i % num_shards == shard_id, in source order; the task's preprocessing
  runs unchanged except chunking (no sequence length) and shuffling. Imports seqio and TF.
  """
  from moescale.data import tasks as tasks_lib  # seqio / TF: only where data is read
  import seqio
  return tasks_lib.tokenized_documents(
      mixture_or_task_name, split, vocabulary, shard_info=seqio.ShardInfo(shard_id, num_shards),
      needs='per-host document shards are of one task; a mixture reads each of its tasks\' '
            '(moescale.data.mixture)')


def _chunks(doc_lengths: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
  """(start in the concatenated documents, length) of every chunk: each document cut into
  pieces of `length` tokens, the last one shorter (what moescale's chunk_targets does)."""
  per_doc = -(-doc_lengths // length)
  doc_start = np.concatenate([[0], np.cumsum(doc_lengths)[:-1]])
  doc = np.repeat(np.arange(len(doc_lengths)), per_doc)
  index = np.arange(len(doc)) - np.repeat(np.cumsum(per_doc) - per_doc, per_doc)
  start = doc_start[doc] + index * length
  return start, np.minimum(length, doc_start[doc] + doc_lengths[doc] - start)


def _epoch_order_seed(seed: int, epoch: int, shard_id: int) -> int:
  return int(np.random.SeedSequence([seed, epoch, shard_id]).generate_state(1)[0])


class ShardedIterator(Iterator[Batch]):
  """This host's packed batches over its own documents, with a position of one integer.

  Args:
    documents: this host's documents, tokenized ([n] int each; see `share_tokens`).
    length: tokens per row; documents are cut into chunks of this many tokens.
    batch_size: GLOBAL rows per step; this host gets batch_size / num_shards.
    shard_id, num_shards: this host and the number of hosts (checked against a position).
    seed: chunk order (a different permutation every epoch).
    name: for error messages.
    state: a `position()` to resume from.
  """

  def __init__(self, documents: Sequence[np.ndarray], length: int, batch_size: int, *,
               shard_id: int = 0, num_shards: int = 1, seed: int = 0, name: str = 'data',
               state: Mapping[str, int] | None = None):
    if length < 1:
      raise ValueError(f'row length {length}; expected >= 1')
    if num_shards < 1 or not 0 <= shard_id < num_shards or batch_size % num_shards:
      raise ValueError(f'batch_size={batch_size}, shard_id={shard_id}, num_shards={num_shards}:'
                       ' the global batch must split evenly over the shards')
    doc_lengths = np.array([len(d) for d in documents], np.int64)
    if not doc_lengths.sum():
      raise ValueError(f'{name}: shard {shard_id} of {num_shards} has no tokens; use fewer '
                       'hosts than documents')
    self.length, self.rows = length, batch_size // num_shards
    self.shard_id, self.num_shards, self.seed, self.name = shard_id, num_shards, int(seed), name
    self._tokens = np.concatenate([np.asarray(d, np.int32) for d in documents])
    self._chunk_start, self._chunk_len = _chunks(doc_lengths, length)
    self.tokens_per_epoch = len(self._tokens)
    self.batches_per_epoch = -(-self.tokens_per_epoch // (self.rows * length))
    self._steps = 0
    self._epoch = None  # (epoch, chunk order, their starts in the epoch's stream)
    if state is not None:
      self.restore(state)

  def __iter__(self) -> ShardedIterator:
    return self

  def _order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    if self._epoch is None or self._epoch[0] != epoch:
      # Chunks, not documents, are permuted: a batch then mixes many documents, as seqio's
      # chunk shuffle buffer did, instead of holding consecutive pieces of one long one.
      order = np.random.default_rng(_epoch_order_seed(self.seed, epoch, self.shard_id)
                                    ).permutation(len(self._chunk_len))
      starts = np.concatenate([[0], np.cumsum(self._chunk_len[order])])
      self._epoch = (epoch, order, starts)
    return self._epoch[1], self._epoch[2]

  def _window(self, epoch: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens [lo, hi) of `epoch`'s stream of permuted chunks, and each token's chunk number
    (its place in the epoch's order: what tells pack_rows where a segment starts)."""
    order, starts = self._order(epoch)
    first = int(np.searchsorted(starts, lo, side='right')) - 1
    last = int(np.searchsorted(starts, hi, side='left'))     # chunks [first, last)
    parts = []
    for c, s in zip(order[first:last], starts[first:last]):
      begin = self._chunk_start[c]
      parts.append(self._tokens[begin + max(lo - s, 0):begin + min(hi - s, self._chunk_len[c])])
    chunk = np.repeat(np.arange(first, last), [len(p) for p in parts])
    return np.concatenate(parts), chunk

  def __next__(self) -> Batch:
    epoch, k = divmod(self._steps, self.batches_per_epoch)
    span = self.rows * self.length
    tokens, chunk = self._window(epoch, k * span, min((k + 1) * span, self.tokens_per_epoch))
    self._steps += 1
    return pack_rows(tokens, chunk, self.rows, self.length)

  @property
  def rows_per_epoch(self) -> int:
    return -(-self.tokens_per_epoch // self.length)

  def take_rows(self, first: int, count: int) -> Batch:
    """Rows [first, first + count) of this host's row stream, packed: each epoch's stream of
    permuted chunks cut into rows of `length` (its last row padded), one epoch after another.
    What a mixture reads from each of its tasks (moescale.data.mixture); costs O(count) rows,
    whatever `first` is. Independent of `__next__` and its position."""
    parts, row, end = [], first, first + count
    while row < end:
      epoch, i = divmod(row, self.rows_per_epoch)
      n = min(end - row, self.rows_per_epoch - i)
      tokens, chunk = self._window(epoch, i * self.length,
                                   min((i + n) * self.length, self.tokens_per_epoch))
      parts.append(pack_rows(tokens, chunk, n, self.length))
      row += n
    if not parts:
      return pack_rows(np.zeros(0, np.int32), np.zeros(0, np.int64), 0, self.length)
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def position(self) -> dict[str, int]:
    """Batches taken (the same on every host), and what a resume must match."""
    return {'sharded_steps': self._steps, 'seed': self.seed, 'num_shards': self.num_shards,
            'rows': self.rows, 'length': self.length}

  state = position

  def restore(self, state: Mapping[str, int]) -> None:
    if 'sharded_steps' not in state:
      raise ValueError(
          f'data position {dict(state)} was not saved by a per-host-sharded iterator (it has '
          "no 'sharded_steps'): it is a moescale.data.pipeline.DataPipeline position, which "
          'SeqioDataSource.train_iterator resumes with DataPipeline; resume it there')
    want = {'seed': self.seed, 'num_shards': self.num_shards, 'rows': self.rows,
            'length': self.length}
    bad = {k: (state[k], v) for k, v in want.items() if k in state and int(state[k]) != v}
    if bad:
      raise ValueError(f'{self.name}: the data position was saved with '
                       f'{ {k: s for k, (s, _) in bad.items()} }, this iterator has '
                       f'{ {k: v for k, (_, v) in bad.items()} }: a host\'s rows depend on the '
                       'seed, the number of hosts, the per-host batch and the row length')
    self._steps = int(state['sharded_steps'])


def pack_rows(tokens: np.ndarray, doc: np.ndarray, rows: int, length: int) -> Batch:
  """`rows` x `length` packed features of a token window and each token's chunk number.

  Padding (zeros, segment 0) fills the window up to rows * length.
  """
  size = rows * length
  pad = size - len(tokens)
  targets = np.pad(tokens, (0, pad)).reshape(rows, length)
  # Chunk numbers increase along the window: padding gets -1, so it is never a segment.
  doc = np.pad(doc, (0, pad), constant_values=-1).reshape(rows, length)
  real = doc >= 0
  new = np.ones_like(real)
  new[:, 1:] = doc[:, 1:] != doc[:, :-1]
  segment = np.where(real, np.cumsum(new & real, axis=1), 0)
  col = np.broadcast_to(np.arange(length), (rows, length))
  seg_start = np.maximum.accumulate(np.where(new, col, 0), axis=1)
  inputs = np.zeros_like(targets)
  inputs[:, 1:] = targets[:, :-1]
  out = {'decoder_target_tokens': targets,
         'decoder_input_tokens': np.where(new | ~real, 0, inputs),
         'decoder_loss_weights': real,
         'decoder_segment_ids': segment,
         'decoder_positions': np.where(real, col - seg_start, 0)}
  return {k: np.ascontiguousarray(v, np.int32) for k, v in out.items()}
