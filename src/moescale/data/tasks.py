"""seqio Tasks over moescale corpora (imports seqio and TensorFlow).

Every task here reads documents through `DocumentSource` and applies two
preprocessors: seqio's `tokenize` (appending EOS to the whole document when
the task's feature has `add_eos`), then `chunk_targets`, which cuts each
tokenized document into consecutive pieces of at most the target sequence
length. Chunking must happen before the feature converter packs: seqio trims
(silently drops) whatever is longer than the sequence length.

Shuffling is two-level and seeded: `DocumentSource` permutes the documents of
the split with the seed (seqio's shuffle buffer alone, 1,000 examples by
default, would leave an ordered file nearly in order), then the task's
shuffle buffer (10,000 chunks here) mixes the chunks of neighbouring
documents. Splits larger than `max_in_memory_bytes` are streamed instead:
their files are permuted, not their documents.

The seqio registry is global: registering the same name again with the same
configuration returns the existing task; with another configuration it is an
error (use another name, or `unregister` first).

Default tasks (embedded corpus, see `moescale.data.corpus`):
  moescale_sotu    train / validation   State of the Union addresses
  moescale_kjv     validation           King James Bible (out of domain)
  moescale_pydoc   validation           CPython help topics (out of domain)
"""

from __future__ import annotations

import difflib
import functools
import os
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from moescale.data import corpus
from moescale.data import vocab as vocab_lib
from moescale.data._tf import tf
from moescale.data.preprocessors import chunk_targets, tokenize_lines
import seqio  # pylint: disable=g-bad-import-order  (after _tf: it configures TF)

DEFAULT_SHUFFLE_BUFFER = 10_000
MAX_IN_MEMORY_BYTES = 1 << 30
DEFAULT_CORPORA = ('sotu', 'kjv', 'pydoc')
DEFAULT_PREFIX = 'moescale_'

# name -> configuration fingerprint of the tasks this module registered.
_CONFIGS: dict[str, str] = {}


class DocumentSource(seqio.DataSource):
  """A seqio DataSource yielding {'targets': document} (tf.string, UTF-8).

  Documents come from `corpus.Part`s; with `shuffle`, their order is a
  permutation drawn from `seed` (documents of in-memory splits, files of
  streamed ones). Empty documents are skipped.
  """

  def __init__(self, splits: Mapping[str, Sequence[corpus.Part]],
               max_in_memory_bytes: int = MAX_IN_MEMORY_BYTES):
    self._parts = {split: list(parts) for split, parts in splits.items()}
    self._max_in_memory_bytes = max_in_memory_bytes
    self._cache: dict[str, tuple[bytes, ...]] = {}
    super().__init__(splits=list(self._parts), caching_permitted=False)

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return True

  def list_shards(self, split: str) -> Sequence[str]:
    return [p.path for p in self.parts(split)]

  def parts(self, split: str) -> list[corpus.Part]:
    if split not in self._parts:
      raise ValueError(f'split={split!r} is not available; this corpus has '
                       f'{sorted(self._parts)}.')
    return self._parts[split]

  def in_memory(self, split: str) -> bool:
    return corpus.split_nbytes(self.parts(split)) <= self._max_in_memory_bytes

  def documents(self, split: str, shuffle: bool = False,
                seed: int | None = None) -> Iterator[bytes]:
    """The split's non-empty documents as UTF-8 bytes, in (seeded) order."""
    parts = self.parts(split)
    rng = np.random.default_rng(seed) if shuffle else None
    if self.in_memory(split):
      if split not in self._cache:
        self._cache[split] = tuple(
            d for d in (_as_bytes(doc) for part in parts
                        for doc in part.documents()) if d)
      docs = self._cache[split]
      order = rng.permutation(len(docs)) if rng else range(len(docs))
      for i in order:
        yield docs[i]
    else:
      order = rng.permutation(len(parts)) if rng else range(len(parts))
      for i in order:
        for doc in parts[i].documents():
          if doc:
            yield _as_bytes(doc)

  def get_dataset(self, split: str = 'train', shuffle: bool = True,
                  seed: int | None = None,
                  shard_info: seqio.ShardInfo | None = None, *,
                  sequence_length=None, use_cached=False,
                  num_epochs=1) -> tf.data.Dataset:
    del sequence_length, use_cached, num_epochs  # unused, as in seqio.
    self.parts(split)  # fail early on an unknown split.
    ds = tf.data.Dataset.from_generator(
        lambda: self.documents(split, shuffle, seed),
        output_signature=tf.TensorSpec([], tf.string))
    if shard_info and shard_info.num_shards > 1:
      ds = ds.shard(shard_info.num_shards, shard_info.index)
    return ds.map(lambda text: {'targets': text})


def _as_bytes(document: corpus.Document) -> bytes:
  return document.encode('utf-8') if isinstance(document, str) else document


LINE_BREAKS = ('keep', 'eos')


# ------------------------------------------------------------ registration


def _add_task(name: str, splits: Mapping[str, Sequence[corpus.Part]],
              vocabulary: Any, *, add_eos: bool, config: Any,
              shuffle_buffer_size: int = DEFAULT_SHUFFLE_BUFFER,
              max_in_memory_bytes: int = MAX_IN_MEMORY_BYTES,
              line_breaks: str = 'keep') -> seqio.Task:
  """Registers (idempotently) a task reading `splits`."""
  if line_breaks not in LINE_BREAKS:
    raise ValueError(f'line_breaks={line_breaks!r}; valid: {list(LINE_BREAKS)}')
  vocabulary = vocab_lib.get_vocabulary(vocabulary)
  fingerprint = repr((config, vocab_lib.vocabulary_spec(vocabulary), add_eos,
                      shuffle_buffer_size, max_in_memory_bytes, line_breaks))
  if name in seqio.TaskRegistry.names():
    if _CONFIGS.get(name) == fingerprint:
      return seqio.TaskRegistry.get(name)
    raise ValueError(
        f'A seqio task named {name!r} is already registered with another '
        f'configuration (registered: {_CONFIGS.get(name, "by other code")}; '
        f'new: {fingerprint}). Use another name, or '
        'moescale.data.tasks.unregister(name) first.')
  task = seqio.TaskRegistry.add(
      name,
      source=DocumentSource(splits, max_in_memory_bytes),
      output_features={'targets': seqio.Feature(
          vocabulary, add_eos=add_eos, dtype=tf.int32)},
      preprocessors=[
          tokenize_lines if line_breaks == 'eos' else functools.partial(
              seqio.preprocessors.tokenize, copy_pretokenized=False, with_eos=True),
          chunk_targets,
      ],
      shuffle_buffer_size=shuffle_buffer_size)
  _CONFIGS[name] = fingerprint
  return task


def unregister(name: str) -> None:
  """Removes a task from the seqio registry (no-op if absent)."""
  seqio.TaskRegistry.remove(name)
  _CONFIGS.pop(name, None)


def register_default_tasks(vocabulary: Any = vocab_lib.BYTES,
                           suffix: str = '') -> list[str]:
  """Registers moescale_sotu, moescale_kjv, moescale_pydoc (+ suffix).

  Args:
    vocabulary: 'bytes', a SentencePiece .model path or a seqio.Vocabulary.
    suffix: appended to the names, to register the corpus again with another
      vocabulary in the same process (e.g. '_sp8k').

  Returns:
    The task names.
  """
  names = []
  for corpus_name in DEFAULT_CORPORA:
    name = f'{DEFAULT_PREFIX}{corpus_name}{suffix}'
    _add_task(name, corpus.default_corpus_splits(corpus_name), vocabulary,
              add_eos=True, config=('default', corpus_name))
    names.append(name)
  return names


def register_text_task(
    name: str,
    train_files: str | Sequence[str] | None,
    validation_files: str | Sequence[str] | None = None,
    vocabulary: Any = vocab_lib.BYTES,
    format: str = 'text',  # pylint: disable=redefined-builtin
    text_key: str = 'text',
    *,
    test_files: str | Sequence[str] | None = None,
    unit: str = 'paragraph',
    add_eos: bool = True,
    line_breaks: str = 'keep',
    shuffle_buffer_size: int = DEFAULT_SHUFFLE_BUFFER,
    max_in_memory_bytes: int = MAX_IN_MEMORY_BYTES,
) -> seqio.Task:
  """Registers a task over plain-text or JSON-lines files (the Pile, C4, ...).

  Args:
    name: unique task name.
    train_files, validation_files, test_files: file names or glob patterns
      (.gz / .bz2 / .xz are decompressed); a split given None is left out.
    vocabulary: 'bytes', a SentencePiece .model path or a seqio.Vocabulary.
    format: 'text' or 'jsonl' (one JSON record per line).
    text_key: the JSON field holding a document's text ('jsonl').
    unit: what a document is in 'text' files: 'paragraph' (runs of
      non-blank lines), 'line' or 'file'; see corpus.read_text_documents.
    add_eos: end every document with EOS (before chunking).
    line_breaks: 'keep' (newlines are text, tokenized like any character) or 'eos'
      (fairseq's format, as Artetxe et al.'s data: every line ends with EOS instead of a
      newline; see `tokenize_lines`).
    shuffle_buffer_size: chunks in seqio's shuffle buffer.
    max_in_memory_bytes: splits up to this size are read into memory and
      shuffled by document; larger ones are streamed, shuffled by file.

  Raises:
    FileNotFoundError: naming a missing file or a pattern matching nothing.
  """
  split_files = {'train': train_files, 'validation': validation_files,
                 'test': test_files}
  splits = corpus.text_files_splits(split_files, format=format,
                                    text_key=text_key, unit=unit)
  config = ('text', format, text_key if format == 'jsonl' else unit,
            {s: [p.path for p in parts] for s, parts in splits.items()})
  return _add_task(name, splits, vocabulary, add_eos=add_eos, config=config,
                   shuffle_buffer_size=shuffle_buffer_size,
                   max_in_memory_bytes=max_in_memory_bytes, line_breaks=line_breaks)


def register_wikitext103(name: str, data_dir: str | os.PathLike,
                         vocabulary: Any, *, add_eos: bool = True,
                         shuffle_buffer_size: int = DEFAULT_SHUFFLE_BUFFER
                         ) -> seqio.Task:
  """Registers WikiText-103 (raw) from wiki.{train,valid,test}.raw in data_dir.

  Documents are articles (split at level-1 " = Title = " headings); splits
  'train', 'validation', 'test'. Csordas et al. use a SentencePiece
  vocabulary of 8k trained on the train split (`train_sentencepiece`).
  """
  splits = corpus.wikitext103_splits(data_dir)
  config = ('wikitext103', os.path.abspath(data_dir))
  return _add_task(name, splits, vocabulary, add_eos=add_eos, config=config,
                   shuffle_buffer_size=shuffle_buffer_size)


def register_enwik8(name: str, path: str | os.PathLike, *,
                    vocabulary: Any = vocab_lib.BYTES,
                    valid_bytes: int = corpus.ENWIK8_VALID_BYTES,
                    test_bytes: int = corpus.ENWIK8_TEST_BYTES,
                    block_bytes: int = corpus.ENWIK8_BLOCK_BYTES,
                    add_eos: bool = False,
                    shuffle_buffer_size: int = DEFAULT_SHUFFLE_BUFFER
                    ) -> seqio.Task:
  """Registers enwik8 as raw bytes: the standard 90M / 5M / 5M split.

  train = all but the last `valid_bytes + test_bytes`, validation = the next
  `valid_bytes`, test = the last `test_bytes`. Documents are `block_bytes`
  blocks (so training can shuffle them); no EOS by default, so the loss per
  token is the loss per byte (bits per character as reported for enwik8).
  """
  splits = corpus.enwik8_splits(path, valid_bytes=valid_bytes,
                                test_bytes=test_bytes, block_bytes=block_bytes)
  config = ('enwik8', os.path.abspath(path), valid_bytes, test_bytes,
            block_bytes)
  return _add_task(name, splits, vocabulary, add_eos=add_eos, config=config,
                   shuffle_buffer_size=shuffle_buffer_size)


def get_provider(name: str, vocabulary: Any = None):
  """The seqio Task or Mixture `name`; registers the default tasks on demand.

  Args:
    name: a registered task or mixture; 'moescale_sotu', 'moescale_kjv' and
      'moescale_pydoc' are registered here when first asked for.
    vocabulary: if given, the vocabulary the provider must use (and the one
      the default tasks are registered with); a mismatch is an error.
  """
  default_names = [DEFAULT_PREFIX + c for c in DEFAULT_CORPORA]
  if name in default_names and name not in seqio.TaskRegistry.names():
    register_default_tasks(vocab_lib.BYTES if vocabulary is None else vocabulary)
  try:
    provider = seqio.get_mixture_or_task(name)
  except ValueError:
    # The default tasks are registered on first use: listed whether or not they are yet.
    known = sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names())
                   | set(default_names))
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(close)}?" if close else ''
    raise ValueError(
        f'No seqio task or mixture named {name!r}.{hint} Valid: {", ".join(known)}. '
        'Register a corpus of your own with moescale.data.register_text_task / '
        'register_wikitext103 / register_enwik8.') from None
  if vocabulary is not None:
    want = vocab_lib.vocabulary_spec(vocab_lib.get_vocabulary(vocabulary))
    have = vocab_lib.vocabulary_spec(provider.output_features['targets']
                                     .vocabulary)
    if want != have:
      raise ValueError(
          f'{name!r} uses the vocabulary {have!r}, not {want!r}. Register the '
          'corpus under another name with that vocabulary (e.g. '
          "register_default_tasks(vocabulary, suffix='_sp')).")
  return provider


def tokenized_documents(name: str, split: str, vocabulary: Any = None, *, needs: str,
                        shard_info: seqio.ShardInfo | None = None) -> list[np.ndarray]:
  """The documents of a task's split, tokenized by the task's own preprocessing (tokenizer,
  EOS) without chunking or shuffling, in source order: one int32 array each. shard_info: only
  that shard's documents (read before tokenization). needs: what the caller needs one task
  for, said when `name` is a mixture."""
  provider = get_provider(name, vocabulary)
  if not isinstance(provider, seqio.Task):
    raise ValueError(f'{name!r} is a mixture: {needs}')
  if split not in provider.splits:
    raise ValueError(f'{name!r} has no {split!r} split; it has {list(provider.splits)}')
  ds = provider.get_dataset(sequence_length=None, split=split, shuffle=False, num_epochs=1,
                            shard_info=shard_info, try_in_mem_cache=False)
  return [ex['targets'].astype(np.int32) for ex in ds.as_numpy_iterator()]
