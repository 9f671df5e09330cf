"""Per-host iterators of packed numpy batches, resumable from a small state.

    pipeline = get_dataset('moescale_sotu', {'targets': 512}, 'train',
                           batch_size=64, seed=0, shard_id=jax.process_index(),
                           num_shards=jax.process_count())
    batch = next(pipeline)   # dict of int32 [64 // num_shards, 512]
    saved = pipeline.state() # {'epoch': 0, 'batches_in_epoch': 1, ...}
    later = get_dataset(..., state=saved)  # continues with the 2nd batch

Each epoch is one seqio pipeline: the task's documents permuted with a seed
derived from (seed, epoch), tokenized, chunked to the sequence length, packed
by seqio.DecoderFeatureConverter(pack=True) into rows with
decoder_target_tokens, decoder_input_tokens, decoder_loss_weights,
decoder_segment_ids (1, 2, ... per packed chunk; 0 on padding) and
decoder_positions (0, 1, ... restarting in every segment). The packed rows are
grouped into *global* batches; the last batch of an epoch is filled up with
empty rows (all zeros, loss weight 0), so no text is dropped and every host
gets the same number of batches. Host `shard_id` receives rows
[shard_id * b, (shard_id + 1) * b) of each global batch, b = batch_size /
num_shards: the hosts' batches are disjoint and concatenate to the global
batch, which does not depend on the number of hosts.

Costs, stated: every host reads, tokenizes and packs the whole stream and
keeps its slice (simple and exact; the price is host CPU, not accelerator
time). Resuming rebuilds the epoch's pipeline and skips the consumed batches
(`Dataset.skip`), i.e. re-reads at most one epoch of data; a mixture is one
stream, so resuming it replays everything consumed so far. Training with packing
therefore uses moescale.data.sharded (a task) or moescale.data.mixture (a mixture)
instead: each host reads its own documents and resumes in O(1). This pipeline
serves unpacked rows, evaluation (whose batches must not depend on the number of
hosts) and runs saved before those.

`SeqioDataSource` (moescale.data.source) adapts this to moescale.train.trainer
(per-host batch sizes, `position()`, eval iterators, bytes per token for bits
per byte); `split_stats` (moescale.data.stats) counts a split's bytes and tokens.
"""

from __future__ import annotations

import atexit
from typing import Any, Iterator, Mapping
import weakref

import numpy as np

from moescale.data import _tf
from moescale.data import stats as stats_lib
from moescale.data import tasks as tasks_lib
from moescale.data._tf import tf
# Split sizes lived here before `stats` existed; tests still read them as pipeline.split_stats.
from moescale.data.stats import count_tokens, split_stats  # noqa: F401  (re-exported)
import seqio  # pylint: disable=g-bad-import-order  (after _tf: it configures TF)

Batch = dict[str, np.ndarray]

# Pipelines with a live tf.data iterator. TF warns ("Error occurred when
# finalizing GeneratorDataset iterator") when a Python-generator-backed
# iterator outlives the interpreter, so they are closed at exit.
_OPEN: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_open_pipelines():
  for pipeline in list(_OPEN):
    pipeline.close()


def epoch_seed(seed: int, epoch: int) -> int:
  """A well-mixed int32 seed for one epoch (different order every epoch)."""
  return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]
             & 0x7FFFFFFF)


def _check_arguments(task_feature_lengths: Mapping[str, int], batch_size: int,
                     num_epochs: int | None, shard_id: int, num_shards: int) -> None:
  """Raises ValueError for a DataPipeline that could not be built as asked."""
  if set(task_feature_lengths) != {'targets'}:
    raise ValueError(f'task_feature_lengths={dict(task_feature_lengths)}; '
                     "a decoder LM expects exactly {'targets': length}.")
  if task_feature_lengths['targets'] < 1:
    raise ValueError(f'targets length {task_feature_lengths["targets"]}; '
                     'expected >= 1.')
  if num_shards < 1 or not 0 <= shard_id < num_shards:
    raise ValueError(f'shard_id={shard_id}, num_shards={num_shards}; '
                     'expected 0 <= shard_id < num_shards.')
  if batch_size < 1 or batch_size % num_shards:
    raise ValueError(f'batch_size={batch_size} (global) must be a positive '
                     f'multiple of num_shards={num_shards}.')
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f'num_epochs={num_epochs}; expected None or >= 1.')


class DataPipeline(Iterator[Batch]):
  """Iterator of this host's numpy batches, with a checkpointable position.

  Args:
    mixture_or_task_name: a registered seqio task or mixture (the default
      corpus tasks register themselves when named).
    task_feature_lengths: {'targets': sequence length}.
    split: 'train', 'validation', ...
    batch_size: GLOBAL batch size (rows); each host gets batch_size /
      num_shards rows.
    seed: order of documents and chunks (deterministic for a given seed).
    shuffle: shuffle documents and chunks (default: only for 'train').
    num_epochs: epochs to iterate (None: forever).
    shard_id, num_shards: this host's index and the number of hosts.
    vocabulary: the vocabulary the task must use (see tasks.get_provider).
    shuffle_buffer_size: chunks in seqio's shuffle buffer (None: the task's).
    pack: pack chunks into rows (False: one chunk per row, padded).
    num_threads: private tf.data thread pool size (None: TF's shared pool).
    state: a `state()` dict to resume from.
  """

  def __init__(self, mixture_or_task_name: str,
               task_feature_lengths: Mapping[str, int],
               split: str = 'train', batch_size: int = 8, *,
               seed: int = 0, shuffle: bool | None = None,
               num_epochs: int | None = None,
               shard_id: int = 0, num_shards: int = 1,
               vocabulary: Any = None,
               shuffle_buffer_size: int | None = None,
               pack: bool = True, num_threads: int | None = None,
               state: Mapping[str, int] | None = None):
    _check_arguments(task_feature_lengths, batch_size, num_epochs, shard_id, num_shards)
    self.name = mixture_or_task_name
    self.task_feature_lengths = dict(task_feature_lengths)
    self.split = split
    self.batch_size = batch_size
    self.seed = int(seed)
    self.shuffle = split == 'train' if shuffle is None else shuffle
    self.num_epochs = num_epochs
    self.shard_id = shard_id
    self.num_shards = num_shards
    self.shuffle_buffer_size = shuffle_buffer_size
    self.num_threads = num_threads
    self.provider = tasks_lib.get_provider(mixture_or_task_name, vocabulary)
    self._is_task = isinstance(self.provider, seqio.Task)
    if self._is_task and split not in self.provider.splits:
      raise ValueError(f'{mixture_or_task_name!r} has no {split!r} split; it '
                       f'has {list(self.provider.splits)}.')
    self._converter = seqio.DecoderFeatureConverter(pack=pack)
    self.model_feature_lengths = dict(
        self._converter.get_model_feature_lengths(self.task_feature_lengths))
    self._epoch = 0
    self._batches_in_epoch = 0
    self._batches_consumed = 0
    self._iterator = None
    # The last tf.data pipeline built, by (epoch, skip): building one traces every seqio
    # preprocessor (seconds), and an eval pipeline is read from its start again at
    # every evaluation (see `rewind`).
    self._built: tuple[tuple[int, int], tf.data.Dataset] | None = None
    if state is not None:
      self.restore(state)

  @property
  def per_host_batch_size(self) -> int:
    return self.batch_size // self.num_shards

  @property
  def vocabulary(self):
    return self.provider.output_features['targets'].vocabulary

  # ----------------------------------------------------------- datasets

  def _examples(self, epoch: int) -> tf.data.Dataset:
    """Packed rows (model features, [length] each) of one epoch."""
    kwargs = dict(sequence_length=self.task_feature_lengths, split=self.split,
                  shuffle=self.shuffle, seed=epoch_seed(self.seed, epoch),
                  try_in_mem_cache=False)
    if self._is_task:
      ds = self.provider.get_dataset(
          num_epochs=1, shuffle_buffer_size=self.shuffle_buffer_size, **kwargs)
    else:  # A mixture samples its tasks as one stream (repeated as asked).
      ds = self.provider.get_dataset(num_epochs=self.num_epochs, **kwargs)
    return self._converter(ds, self.task_feature_lengths)

  def global_dataset(self, epoch: int = 0) -> tf.data.Dataset:
    """Global batches of one epoch (all hosts' rows), dicts of [B, length]."""
    ds = self._examples(epoch)
    empty = {k: tf.zeros([n], tf.int32)
             for k, n in self.model_feature_lengths.items()}
    # Fill the last batch with empty rows; drop_remainder then only drops
    # fill rows, never text.
    ds = ds.concatenate(
        tf.data.Dataset.from_tensors(empty).repeat(self.batch_size - 1))
    ds = ds.batch(self.batch_size, drop_remainder=True)
    return ds.with_options(_tf.dataset_options(self.num_threads))

  def host_dataset(self, epoch: int = 0, skip: int = 0) -> tf.data.Dataset:
    """This host's slice of each global batch of one epoch, after `skip`."""
    lo = self.shard_id * self.per_host_batch_size
    hi = lo + self.per_host_batch_size
    ds = self.global_dataset(epoch)
    if skip:
      ds = ds.skip(skip)
    ds = ds.map(lambda batch: {k: v[lo:hi] for k, v in batch.items()})
    return ds.prefetch(2)

  # ----------------------------------------------------------- iteration

  def __iter__(self) -> DataPipeline:
    return self

  def __next__(self) -> Batch:
    while True:
      if self._finished():
        raise StopIteration
      if self._iterator is None:
        key = (self._epoch, self._batches_in_epoch)
        if self._built is None or self._built[0] != key:
          self._built = (key, self.host_dataset(*key))
        self._iterator = self._built[1].as_numpy_iterator()
        _OPEN.add(self)
      try:
        batch = next(self._iterator)
      except StopIteration:
        self._iterator = None
        if not self._is_task:
          self._epoch = self.num_epochs or 1  # a mixture is a single stream.
          continue
        if self._batches_in_epoch == 0:
          raise ValueError(f'{self.name}:{self.split} yielded no data.') from None
        self._epoch += 1
        self._batches_in_epoch = 0
        continue
      self._batches_in_epoch += 1
      self._batches_consumed += 1
      return batch

  def position(self) -> dict[str, int]:
    """Same as `state()` (the name moescale.train.trainer uses)."""
    return self.state()

  def rewind(self) -> None:
    """Back to the first batch (what `eval_iterators` does before each evaluation)."""
    self.restore({'epoch': 0, 'batches_in_epoch': 0, 'batches_consumed': 0})
    self.close()

  def close(self) -> None:
    """Releases the tf.data iterator (the position is kept)."""
    self._iterator = None
    _OPEN.discard(self)

  def _finished(self) -> bool:
    if not self._is_task:
      return self._epoch > 0
    return self.num_epochs is not None and self._epoch >= self.num_epochs

  def state(self) -> dict[str, int]:
    """The data position: restore it with `restore` or `state=` to continue.

    'epoch' and 'batches_in_epoch' locate the next batch; 'batches_consumed'
    counts all batches so far (for logs); 'seed' is checked on restore.
    Positions count global batches, so they stay valid when the number of
    hosts changes (the global batch size and seed must not).
    """
    return {'epoch': self._epoch, 'batches_in_epoch': self._batches_in_epoch,
            'batches_consumed': self._batches_consumed, 'seed': self.seed}

  def restore(self, state: Mapping[str, int]) -> None:
    """Moves to the position saved by `state()` (rebuilds lazily)."""
    missing = {'epoch', 'batches_in_epoch'} - set(state)
    if missing:
      raise ValueError(f'data state {dict(state)} lacks {sorted(missing)}.')
    if 'seed' in state and int(state['seed']) != self.seed:
      raise ValueError(f'data state was saved with seed={state["seed"]}, '
                       f'this pipeline has seed={self.seed}.')
    self._epoch = int(state['epoch'])
    self._batches_in_epoch = int(state['batches_in_epoch'])
    self._batches_consumed = int(state.get('batches_consumed',
                                           self._batches_in_epoch))
    self._iterator = None

  # -------------------------------------------------------------- sizes

  def epoch_stats(self) -> dict[str, float]:
    """Size of one epoch (one pass over it); see `stats.epoch_stats`."""
    return stats_lib.epoch_stats(self.global_dataset(0), self.batch_size,
                                 self.task_feature_lengths['targets'])


def get_dataset(mixture_or_task_name: str,
                task_feature_lengths: Mapping[str, int],
                split: str = 'train', batch_size: int = 8, *,
                seed: int = 0, shuffle: bool | None = None,
                num_epochs: int | None = None,
                shard_id: int = 0, num_shards: int = 1,
                vocabulary: Any = None, **kwargs) -> DataPipeline:
  """A per-host iterator of packed numpy batches; see `DataPipeline`."""
  return DataPipeline(mixture_or_task_name, task_feature_lengths, split,
                      batch_size, seed=seed, shuffle=shuffle,
                      num_epochs=num_epochs, shard_id=shard_id,
                      num_shards=num_shards, vocabulary=vocabulary, **kwargs)
