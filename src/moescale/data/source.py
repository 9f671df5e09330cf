"""The trainer's data source over seqio tasks: train and eval iterators, bytes per token.

`SeqioDataSource` is what `moescale.launch.seqio_data` builds for a run (see
moescale.train.trainer.DataSource): it turns the trainer's per-host batch sizes and saved
positions into `ShardedIterator`s or `MixtureIterator`s (training on a task or a mixture: each
host reads its own documents and resumes in O(1)) or `DataPipeline`s (unpacked rows,
evaluation, older positions),
picks the eval splits (the default corpus adds its out-of-domain ones), keeps eval pipelines
to rewind rather than rebuild, and gives bits per byte its bytes per token.
"""

from __future__ import annotations

from typing import Any, Mapping

from moescale.data import stats as stats_lib
from moescale.data import tasks as tasks_lib
from moescale.data import vocab as vocab_lib
from moescale.data.pipeline import DataPipeline


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
    pack: pack chunks into rows. Training with packing reads per-host document shards and
      resumes in O(1): a task with moescale.data.sharded, a mixture with
      moescale.data.mixture. `pack=False` and evaluation use
      moescale.data.pipeline.DataPipeline.
    stream: instead of packed shuffled chunks, each split as one contiguous token stream
      whose rows continue from batch to batch (moescale.data.stream): what a model with
      Transformer-XL memory trains and evaluates on. Needs a task, not a mixture.

  Batch sizes given to the iterators are per host, as the trainer passes them;
  the global batch is batch_size * num_shards.
  """

  def __init__(self, mixture_or_task_name: str,
               task_feature_lengths: Mapping[str, int],
               vocabulary: Any = vocab_lib.BYTES,
               eval_splits: tuple[str, ...] | None = None, pack: bool = True,
               stream: bool = False):
    self.name = mixture_or_task_name
    self.task_feature_lengths = dict(task_feature_lengths)
    self.vocabulary_spec = vocabulary
    self.pack = pack
    self.stream = stream
    self._stream_tokens: dict[tuple[str, str], Any] = {}
    self._share_tokens: dict[tuple[str, int, int], Any] = {}
    provider = tasks_lib.get_provider(mixture_or_task_name, vocabulary)
    self.vocabulary = provider.output_features['targets'].vocabulary
    self.vocab_size = self.vocabulary.vocab_size
    self.sequence_length = self.task_feature_lengths['targets']
    self.eval_splits = tuple(eval_splits) if eval_splits is not None else (
        self._default_eval_splits(provider))
    self._eval_pipelines: dict[tuple, dict[str, Any]] = {}

  def fingerprint(self) -> dict:
    """What identifies the token ids (`vocab.fingerprint`): recorded with a run's checkpoints
    and checked when they are read again (moescale.train.guard.check_vocabulary)."""
    return vocab_lib.fingerprint(self.vocabulary)

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
                     ):
    if self.stream:
      return self._stream('train', batch_size * num_shards, shard_id, num_shards, None,
                          position)
    reader = {'task': self._sharded_iterator, 'mixture': self._mixture_iterator}.get(
        self._per_host_reader(position))
    if reader is not None:
      return reader(batch_size, shard_id, num_shards, seed, position)
    return DataPipeline(self.name, self.task_feature_lengths, 'train',
                        batch_size * num_shards, seed=seed, shuffle=True,
                        shard_id=shard_id, num_shards=num_shards,
                        vocabulary=self.vocabulary_spec, pack=self.pack,
                        state=position)

  def _per_host_reader(self, position) -> str | None:
    """How training reads per-host document shares, resuming in O(1): 'task'
    (moescale.data.sharded) or 'mixture' (moescale.data.mixture), with packing. None: a
    DataPipeline, for unpacked rows, or a position a DataPipeline saved (a run started before
    these, continued exactly; skipping to it re-reads up to an epoch, a mixture's whole run)."""
    import seqio
    if not self.pack or (position is not None and 'batches_in_epoch' in position):
      return None
    provider = tasks_lib.get_provider(self.name)
    return ('task' if isinstance(provider, seqio.Task)
            else 'mixture' if isinstance(provider, seqio.Mixture) else None)

  def _share(self, task: str, shard_id: int, num_shards: int):
    """This host's documents of a task's train split, tokenized (cached: the slow part)."""
    from moescale.data import sharded
    key = (task, shard_id, num_shards)
    if key not in self._share_tokens:
      self._share_tokens[key] = sharded.share_tokens(
          task, 'train', self.vocabulary_spec, shard_id=shard_id, num_shards=num_shards)
    return self._share_tokens[key]

  def _sharded_iterator(self, batch_size, shard_id, num_shards, seed, position):
    from moescale.data import sharded
    return sharded.ShardedIterator(
        self._share(self.name, shard_id, num_shards), self.sequence_length,
        batch_size * num_shards, shard_id=shard_id, num_shards=num_shards, seed=seed,
        name=f'{self.name}:train', state=position)

  def _mixture_iterator(self, batch_size, shard_id, num_shards, seed, position):
    from moescale.data import mixture
    mix = tasks_lib.get_provider(self.name)
    tasks = [(t.name, mix.get_rate(t), self._share(t.name, shard_id, num_shards))
             for t in mix.tasks]
    return mixture.MixtureIterator(
        tasks, self.sequence_length, batch_size * num_shards, shard_id=shard_id,
        num_shards=num_shards, seed=seed, name=f'{self.name}:train', state=position)

  def eval_iterators(self, batch_size: int, shard_id: int = 0,
                     num_shards: int = 1) -> dict[str, DataPipeline]:
    """{split: a pipeline from its first batch}. The pipelines are kept and rewound for the
    next evaluation with the same batch and sharding: the tiny run's three eval splits took
    ~9 s to build each time."""
    key = (batch_size, shard_id, num_shards, self.eval_splits)
    if key in self._eval_pipelines:
      for p in self._eval_pipelines[key].values():
        p.rewind()
      return dict(self._eval_pipelines[key])
    out = self._eval_pipelines[key] = {}
    for split in self.eval_splits:
      if self.stream:
        out[split] = self._stream(split, batch_size * num_shards, shard_id, num_shards, 1)
        continue
      name, task_split = self._resolve(split)
      out[split] = DataPipeline(
          name, self.task_feature_lengths, task_split, batch_size * num_shards,
          shuffle=False, num_epochs=1, shard_id=shard_id,
          num_shards=num_shards, vocabulary=self.vocabulary_spec,
          pack=self.pack)
    return dict(out)

  def _stream(self, split, batch_size, shard_id, num_shards, num_epochs, position=None):
    from moescale.data import stream as stream_lib
    name, task_split = self._resolve(split)
    if (name, task_split) not in self._stream_tokens:  # tokenizing a split is the slow part
      self._stream_tokens[name, task_split] = stream_lib.split_tokens(
          name, task_split, self.vocabulary_spec)
    return stream_lib.StreamIterator(
        self._stream_tokens[name, task_split], self.sequence_length, batch_size,
        shard_id=shard_id, num_shards=num_shards, num_epochs=num_epochs,
        name=f'{name}:{task_split}', state=position)

  def bytes_per_token(self, split: str) -> float | None:
    """UTF-8 bytes per predicted token of an eval split (for bits per byte)."""
    stats = stats_lib.split_stats(*self._resolve(split))
    return stats['bytes'] / stats['tokens'] if stats['tokens'] else None

