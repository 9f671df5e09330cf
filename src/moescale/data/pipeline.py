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
stream, so resuming it replays everything consumed so far.

`SeqioDataSource` adapts this to moescale.train.trainer (per-host batch sizes,
`position()`, eval iterators, bytes per token for bits per byte).
"""

from __future__ import annotations

import atexit
from typing import Any, Iterator, Mapping
import weakref

import numpy as np

from moescale.data import _tf
from moescale.data import tasks as tasks_lib
from moescale.data import vocab as vocab_lib
from moescale.data._tf import tf
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
    # preprocessor (~3 s on the dev VM), and an eval pipeline is read from its start again at
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
    """Size of one epoch (one pass over it): batches, rows, tokens, padding.

    'rows' are packed rows with text; 'tokens' non-padding target tokens;
    'fill' the share of target slots that are padding.
    """
    def count(totals, batch):
      weights = batch['decoder_loss_weights']
      return (totals[0] + 1,
              totals[1] + tf.reduce_sum(tf.cast(
                  tf.reduce_any(weights > 0, axis=1), tf.int64)),
              totals[2] + tf.reduce_sum(tf.cast(weights, tf.int64)))
    zero = tf.constant(0, tf.int64)
    batches, rows, tokens = (int(x) for x in self.global_dataset(0).reduce(
        (zero, zero, zero), count))
    slots = batches * self.batch_size * self.task_feature_lengths['targets']
    return {'batches': batches, 'rows': rows, 'tokens': tokens,
            'fill': 1.0 - tokens / slots if slots else 0.0}


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


class SeqioDataSource:
  """The trainer's data source (see moescale.train.trainer.DataSource).

  Args:
    mixture_or_task_name: task or mixture to train on.
    task_feature_lengths: {'targets': sequence length}.
    vocabulary: 'bytes', a SentencePiece .model path (checked against the
      task's; also used to register the default tasks).
    eval_splits: what to evaluate, each 'split' (of the training task) or
      'task:split' (another task, e.g. 'moescale_kjv:validation'). None: the
      training task's 'validation' split (else its non-train splits), and for
      the default in-domain corpus also the out-of-domain ones.
    pack: pack chunks into rows.

  Batch sizes given to the iterators are per host, as the trainer passes them;
  the global batch is batch_size * num_shards.
  """

  def __init__(self, mixture_or_task_name: str,
               task_feature_lengths: Mapping[str, int],
               vocabulary: Any = vocab_lib.BYTES,
               eval_splits: tuple[str, ...] | None = None, pack: bool = True):
    self.name = mixture_or_task_name
    self.task_feature_lengths = dict(task_feature_lengths)
    self.vocabulary_spec = vocabulary
    self.pack = pack
    provider = tasks_lib.get_provider(mixture_or_task_name, vocabulary)
    self.vocabulary = provider.output_features['targets'].vocabulary
    self.vocab_size = self.vocabulary.vocab_size
    self.sequence_length = self.task_feature_lengths['targets']
    self.eval_splits = tuple(eval_splits) if eval_splits is not None else (
        self._default_eval_splits(provider))
    self._eval_pipelines: dict[tuple[int, int, int], dict[str, DataPipeline]] = {}

  def _default_eval_splits(self, provider) -> tuple[str, ...]:
    splits = [s for s in provider.splits if s != 'train']
    own = ('validation',) if 'validation' in splits else tuple(splits)
    sotu = tasks_lib.DEFAULT_PREFIX + 'sotu'
    if self.name.startswith(sotu):
      suffix = self.name[len(sotu):]
      own += tuple(f'{tasks_lib.DEFAULT_PREFIX}{c}{suffix}:validation'
                   for c in tasks_lib.DEFAULT_CORPORA if c != 'sotu')
    return own

  def _resolve(self, split: str) -> tuple[str, str]:
    return tuple(split.split(':', 1)) if ':' in split else (self.name, split)

  def train_iterator(self, batch_size: int, shard_id: int = 0,
                     num_shards: int = 1, seed: int = 0,
                     position: Mapping[str, int] | None = None
                     ) -> DataPipeline:
    return DataPipeline(self.name, self.task_feature_lengths, 'train',
                        batch_size * num_shards, seed=seed, shuffle=True,
                        shard_id=shard_id, num_shards=num_shards,
                        vocabulary=self.vocabulary_spec, pack=self.pack,
                        state=position)

  def eval_iterators(self, batch_size: int, shard_id: int = 0,
                     num_shards: int = 1) -> dict[str, DataPipeline]:
    """{split: a pipeline from its first batch}. The pipelines are kept and rewound for the
    next evaluation with the same batch and sharding: the tiny run's three eval splits took
    ~9 s to build each time."""
    key = (batch_size, shard_id, num_shards)
    if key in self._eval_pipelines:
      for p in self._eval_pipelines[key].values():
        p.rewind()
      return dict(self._eval_pipelines[key])
    out = self._eval_pipelines[key] = {}
    for split in self.eval_splits:
      name, task_split = self._resolve(split)
      out[split] = DataPipeline(
          name, self.task_feature_lengths, task_split, batch_size * num_shards,
          shuffle=False, num_epochs=1, shard_id=shard_id,
          num_shards=num_shards, vocabulary=self.vocabulary_spec,
          pack=self.pack)
    return dict(out)

  def bytes_per_token(self, split: str) -> float | None:
    """UTF-8 bytes per predicted token of an eval split (for bits per byte)."""
    stats = split_stats(*self._resolve(split))
    return stats['bytes'] / stats['tokens'] if stats['tokens'] else None


# ------------------------------------------------------------------ sizes

_STATS: dict[tuple[str, str, str], dict[str, int]] = {}


def split_stats(mixture_or_task_name: str, split: str) -> dict[str, int]:
  """Documents, UTF-8 bytes and tokens of a split (one pass, cached).

  'tokens' counts what the model predicts in one epoch, EOS included (it is
  the sum of decoder_loss_weights over the epoch); 'bytes' is the size of the
  documents' text, the denominator of bits per byte. A mixture sums its tasks
  that have the split.
  """
  provider = tasks_lib.get_provider(mixture_or_task_name)
  if not isinstance(provider, seqio.Task):
    totals = {'documents': 0, 'bytes': 0, 'tokens': 0}
    for task in provider.tasks:
      if split in task.splits:
        for k, v in split_stats(task.name, split).items():
          totals[k] += v
    return totals
  key = (provider.name, split, tasks_lib._CONFIGS.get(provider.name, ''))  # pylint: disable=protected-access
  if key in _STATS:
    return dict(_STATS[key])
  if not isinstance(provider.source, tasks_lib.DocumentSource):
    raise TypeError(f'split_stats: {provider.name!r} was not registered by '
                    'moescale.data (its source has no documents to count).')
  feature = provider.output_features['targets']
  documents = num_bytes = 0
  for doc in provider.source.documents(split):
    documents += 1
    num_bytes += len(doc)
  if vocab_lib.vocabulary_spec(feature.vocabulary) == vocab_lib.BYTES:
    tokens = num_bytes + (documents if feature.add_eos else 0)
  else:
    ds = provider.get_dataset(sequence_length=None, split=split, shuffle=False,
                              num_epochs=1, try_in_mem_cache=False)
    tokens = int(ds.reduce(tf.constant(0, tf.int64), lambda total, ex: (
        total + tf.cast(tf.size(ex['targets']), tf.int64))))
  _STATS[key] = {'documents': documents, 'bytes': num_bytes, 'tokens': tokens}
  return dict(_STATS[key])


def count_tokens(mixture_or_task_name: str, split: str) -> int:
  """Tokens of one epoch of a split (EOS included); see `split_stats`."""
  return split_stats(mixture_or_task_name, split)['tokens']
