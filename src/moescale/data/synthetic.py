"""Synthetic packed LM batches (no seqio, no TensorFlow): for tests, benchmarks and smoke runs.

Text is drawn from a fixed random bigram chain (each token has `branching` likely successors),
so a model can learn it and its loss visibly falls; sequences are packed like seqio's decoder
feature converter does (segment ids from 1, positions restarting at 0, padding 0 at the end).
The stream is a pure function of (seed, batch index, shard), so `position()` is one integer.
"""

from __future__ import annotations

import numpy as np


def _packed_row(rng: np.random.Generator, table: np.ndarray, length: int, min_doc: int
                ) -> dict[str, np.ndarray]:
  vocab = table.shape[0]
  tokens = np.zeros(length + 1, np.int32)
  seg = np.zeros(length + 1, np.int32)
  pos = np.zeros(length + 1, np.int32)
  i, s = 0, 1
  while i < length - min_doc:
    n = int(rng.integers(min_doc, length + 1 - i))
    doc = np.empty(n + 1, np.int32)
    doc[0] = rng.integers(2, vocab)
    for j in range(1, n + 1):
      doc[j] = table[doc[j - 1], rng.integers(table.shape[1])]
    tokens[i:i + n + 1], seg[i:i + n + 1], pos[i:i + n + 1] = doc, s, np.arange(n + 1)
    i, s = i + n + 1, s + 1
  # decoder_input = target shifted right within each segment (0 = BOS), like seqio.
  inputs = np.where(pos[:length] == 0, 0, np.concatenate([[0], tokens[:length - 1]]))
  return {'decoder_target_tokens': tokens[:length], 'decoder_input_tokens': inputs,
          'decoder_segment_ids': seg[:length], 'decoder_positions': pos[:length],
          'decoder_loss_weights': (seg[:length] > 0).astype(np.float32)}


class SyntheticIterator:
  def __init__(self, source: 'SyntheticData', batch_size: int, shard_id: int, num_shards: int,
               seed: int, start: int = 0, limit: int | None = None):
    self.source, self.batch_size = source, batch_size
    self.shard_id, self.num_shards, self.seed = shard_id, num_shards, seed
    self.index, self.limit = start, limit

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self.limit is not None and self.index >= self.limit:
      raise StopIteration
    rows = []
    for r in range(self.batch_size):
      # Global row id: batch-major over hosts, so the union of shards is the global batch.
      row = (self.index * self.num_shards + self.shard_id) * self.batch_size + r
      rng = np.random.default_rng([self.seed, row])
      rows.append(_packed_row(rng, self.source.table, self.source.length, self.source.min_doc))
    self.index += 1
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

  def position(self) -> dict:
    return {'batches': self.index}


class SyntheticData:
  """A DataSource (see `moescale.train.trainer`) of bigram-chain text, packed."""

  def __init__(self, vocab_size: int = 64, length: int = 32, branching: int = 2,
               min_doc: int = 4, eval_batches: int = 2, table_seed: int = 1234):
    if vocab_size < 3 or length < 2 * min_doc:
      raise ValueError(f'vocab_size={vocab_size} must be >= 3 and length={length} >= 2*min_doc')
    rng = np.random.default_rng(table_seed)
    self.table = rng.integers(2, vocab_size, size=(vocab_size, branching)).astype(np.int32)
    self.vocab_size, self.length, self.min_doc = vocab_size, length, min_doc
    self.eval_batches = eval_batches

  def train_iterator(self, batch_size, shard_id=0, num_shards=1, seed=0, position=None):
    start = (position or {}).get('batches', 0)
    return SyntheticIterator(self, batch_size, shard_id, num_shards, seed, start)

  def eval_iterators(self, batch_size, shard_id=0, num_shards=1):
    # A seed no training run uses, so validation text is held out from the training stream.
    return {'validation': SyntheticIterator(self, batch_size, shard_id, num_shards,
                                            seed=10**9 + 7, limit=self.eval_batches)}
