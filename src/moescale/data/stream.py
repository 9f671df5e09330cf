"""Contiguous token streams for Transformer-XL training: each batch row reads on where it left.

A packed pipeline (moescale.data.pipeline) shuffles and packs chunks, so row b of one batch has
nothing to do with row b of the next, and a Transformer-XL memory carried between them would
hold unrelated text. Csordás et al. (2023) train, like Dai et al. (2019), on the split as one
token stream cut into `batch_size` contiguous parts, one per row:

    tokens of the split, in order:  t0 t1 t2 ... t(N-1)
    chunk j (L + 1 tokens, overlapping by one): t(jL) .. t(jL + L)
    per_row = ((N - 1) // L) // batch_size chunks per row
    step p, row b: chunk b·per_row + p -> inputs its first L tokens, targets its last L

so row b's segment at step p + 1 is the text right after its segment at step p, and the memory
of step p is exactly the context step p + 1 needs (docs/sources.md#csordas-et-al-2023-memory:
their `MultibatchSequentialSampler` and `lm_dataset.py`). The last (N - 1) mod (L·batch_size)
tokens do not fit a row and are not read (at most L·batch_size + L - 1 of the split; with
batch 4 and L 256 that is < 1.3k of WikiText-103's 217k validation tokens); `StreamIterator.tokens`
says how many are.

An epoch is per_row steps; training repeats epochs in the same order (as the authors do) and
marks the first step of each with `memory_reset` = 1, where the trainer empties the memory.
The position is two integers, so resuming costs nothing however far the run got.

Batches (host-local numpy, int32):
  decoder_input_tokens, decoder_target_tokens, decoder_loss_weights  [rows, L]
  memory_reset                                                       [rows] (1: forget memory)
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import numpy as np

Batch = dict[str, np.ndarray]


def split_tokens(mixture_or_task_name: str, split: str, vocabulary: Any = None) -> np.ndarray:
  """Every token of a task's split in document order, concatenated: [N] int32.

  The task's own preprocessing runs unchanged (tokenizer, EOS per document or per line), but
  without chunking (no sequence length) and without shuffling. Imports seqio and TensorFlow.
  """
  from moescale.data import tasks as tasks_lib  # seqio / TF: only where data is read
  parts = tasks_lib.tokenized_documents(
      mixture_or_task_name, split, vocabulary,
      needs='a contiguous stream needs one task (a mixture samples its tasks at random); '
            'register a task instead')
  if not parts:
    raise ValueError(f'{mixture_or_task_name}:{split} has no documents')
  return np.concatenate(parts).astype(np.int32)


class StreamIterator(Iterator[Batch]):
  """This host's rows of each step of the stream, with a two-integer position.

  Args:
    tokens: the split as one stream, [N] int.
    length: L, tokens per segment.
    batch_size: GLOBAL rows; host shard_id of num_shards gets rows
      [shard_id·b, (shard_id + 1)·b), b = batch_size / num_shards.
    num_epochs: passes over the stream (None: forever).
    name: for error messages.
    state: a `state()` to resume from.
  """

  def __init__(self, tokens: np.ndarray, length: int, batch_size: int, *,
               shard_id: int = 0, num_shards: int = 1, num_epochs: int | None = None,
               name: str = 'stream', state: Mapping[str, int] | None = None):
    if length < 1:
      raise ValueError(f'segment length {length}; expected >= 1')
    if num_shards < 1 or not 0 <= shard_id < num_shards or batch_size % num_shards:
      raise ValueError(f'batch_size={batch_size}, shard_id={shard_id}, num_shards={num_shards}:'
                       ' the global batch must split evenly over the shards')
    self.per_row = (len(tokens) - 1) // length // batch_size
    if self.per_row < 1:
      raise ValueError(f'{name} has {len(tokens)} tokens: too few for {batch_size} rows of at '
                       f'least one {length}-token segment (+1 target); need '
                       f'{batch_size * length + 1}. Use a smaller batch or segment length.')
    self.length, self.batch_size, self.num_epochs = length, batch_size, num_epochs
    per_host = batch_size // num_shards
    rows = np.arange(shard_id * per_host, (shard_id + 1) * per_host)
    self._starts = rows * self.per_row * length      # row b's first token
    self._tokens = np.asarray(tokens, np.int32)
    self._epoch, self._step = 0, 0
    if state is not None:
      self.restore(state)

  @property
  def tokens(self) -> int:
    """Tokens predicted in one epoch by all rows together."""
    return self.per_row * self.batch_size * self.length

  def __iter__(self) -> StreamIterator:
    return self

  def __next__(self) -> Batch:
    if self.num_epochs is not None and self._epoch >= self.num_epochs:
      raise StopIteration
    starts = self._starts + self._step * self.length
    window = self._tokens[starts[:, None] + np.arange(self.length + 1)[None, :]]
    batch = {'decoder_input_tokens': window[:, :-1], 'decoder_target_tokens': window[:, 1:],
             'decoder_loss_weights': np.ones_like(window[:, 1:]),
             'memory_reset': np.full(len(starts), int(self._step == 0), np.int32)}
    self._step += 1
    if self._step == self.per_row:
      self._epoch, self._step = self._epoch + 1, 0
    return batch

  def state(self) -> dict[str, int]:
    return {'epoch': self._epoch, 'step_in_epoch': self._step, 'stream_steps': self.per_row}

  position = state  # the name moescale.train.trainer uses

  def restore(self, state: Mapping[str, int]) -> None:
    if 'step_in_epoch' not in state:
      raise ValueError(f'data position {dict(state)} is not a stream position (it has no '
                       "'step_in_epoch'): the run was started with packed data")
    if state.get('stream_steps', self.per_row) != self.per_row:
      raise ValueError(f'the stream position was saved with {state["stream_steps"]} steps per '
                       f'epoch, this stream has {self.per_row}: the data, batch size or segment '
                       'length changed since the checkpoint')
    self._epoch, self._step = int(state['epoch']), int(state['step_in_epoch'])

  def rewind(self) -> None:
    self._epoch, self._step = 0, 0
