"""Vocabularies: bytes or SentencePiece, training SentencePiece, bytes per token.

`get_vocabulary` returns seqio vocabularies (it imports seqio, and so
TensorFlow, when called); `train_sentencepiece` only needs the sentencepiece
package. Importing this module imports neither.

Id conventions (seqio's): 0 = padding, 1 = end of sequence (EOS), 2 = unknown.
`ByteVocabulary` maps byte b to id b + 3 (259 ids); SentencePiece models
trained here reserve the same three ids and have no BOS.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import os
import sys
from typing import Any, Iterator, Sequence

import numpy as np

from moescale.data import corpus, readers

BYTES = 'bytes'


def get_vocabulary(spec: Any = BYTES):
  """A seqio vocabulary from a spec.

  Args:
    spec: 'bytes' (seqio.ByteVocabulary), a path to a SentencePiece '.model'
      file (seqio.SentencePieceVocabulary), or a seqio.Vocabulary (returned
      as is).

  Returns:
    A seqio.Vocabulary (SentencePiece models load lazily, on first use).

  Raises:
    FileNotFoundError: if the SentencePiece model file does not exist.
    ValueError: if `spec` is neither.
  """
  from moescale.data import _tf  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  import seqio  # pylint: disable=g-import-not-at-top
  if isinstance(spec, seqio.Vocabulary):
    return spec
  if not isinstance(spec, (str, os.PathLike)):
    raise ValueError(f"vocabulary={spec!r}; expected 'bytes', a path to a "
                     'SentencePiece .model file or a seqio.Vocabulary.')
  spec = os.fspath(spec)
  if spec == BYTES:
    return _byte_vocabulary()
  return _sentencepiece_vocabulary(os.path.abspath(
      readers.require_file(spec, 'SentencePiece vocabulary (a .model file, '
                           "e.g. from `moescale vocab`; or use 'bytes')")))


@functools.lru_cache(maxsize=None)
def _byte_vocabulary():
  import seqio  # pylint: disable=g-import-not-at-top
  return seqio.ByteVocabulary()


@functools.lru_cache(maxsize=None)
def _sentencepiece_vocabulary(path: str):
  import seqio  # pylint: disable=g-import-not-at-top
  return seqio.SentencePieceVocabulary(path)


def vocabulary_spec(vocabulary) -> str:
  """The spec `get_vocabulary` would rebuild `vocabulary` from."""
  import seqio  # pylint: disable=g-import-not-at-top
  if isinstance(vocabulary, seqio.ByteVocabulary) and not vocabulary.extra_ids:
    return BYTES
  if isinstance(vocabulary, seqio.SentencePieceVocabulary):
    return os.path.abspath(vocabulary.sentencepiece_model_file)
  return repr(vocabulary)


def fingerprint(vocabulary) -> dict:
  """What identifies a vocabulary's token ids: {'vocabulary' (its spec), 'vocab_size',
  'sha256'}. The hash is of the SentencePiece model itself (its serialized proto), so a
  different model of the same size, or the same path retrained, hashes differently; the
  byte vocabulary hashes its kind and extra ids."""
  import hashlib
  import seqio  # pylint: disable=g-import-not-at-top
  if isinstance(vocabulary, seqio.SentencePieceVocabulary):
    content = vocabulary.sp_model
  else:
    content = f'{type(vocabulary).__name__}:{vocabulary.extra_ids}'.encode()
  return {'vocabulary': vocabulary_spec(vocabulary), 'vocab_size': int(vocabulary.vocab_size),
          'sha256': hashlib.sha256(content).hexdigest()}


# ------------------------------------------------------------ SentencePiece


# The trainer options behind `lossless=True` (why each: train_sentencepiece's docstring).
_LOSSLESS = dict(normalization_rule_name='identity', remove_extra_whitespaces=False,
                 allow_whitespace_only_pieces=True)


def _lines(documents: Iterator[str]) -> Iterator[str]:
  for document in documents:
    for line in document.splitlines():
      if line.strip():
        yield line


def train_sentencepiece(
    input_files: str | Sequence[str] | None, model_prefix: str, vocab_size: int, *,
    model_type: str = 'unigram', format: str = 'text',  # pylint: disable=redefined-builtin
    text_key: str = 'text', character_coverage: float = 1.0, byte_fallback: bool = True,
    lossless: bool = True, input_sentence_size: int = 2_000_000,
    max_sentence_length: int = 1 << 16, seed: int = 0, num_threads: int | None = None,
    verbose: bool = False, **trainer_options) -> str:
  """Trains a SentencePiece model whose ids fit seqio (pad 0, EOS 1, UNK 2).

  Args:
    input_files: text files or glob patterns (one sentence per line, as the
      trainer reads them); JSON-lines files with `format='jsonl'` (the lines of
      every record's `text_key` field); None: the embedded in-domain corpus
      (State of the Union train split).
    model_prefix: output path without suffix: writes `<prefix>.model` and
      `<prefix>.vocab` (directories are created).
    vocab_size: number of pieces including the 3 special ids (e.g. 8000, as in
      Csordas et al. for WikiText-103).
    model_type: 'unigram' (default), 'bpe', 'char' or 'word'.
    format: 'text' or 'jsonl' (the latter is read here and fed as sentences).
    text_key: JSON field of the text ('jsonl' only).
    character_coverage: share of characters covered by pieces (1.0 for
      English; rarer characters fall back to bytes when `byte_fallback`).
    byte_fallback: encode unknown characters as UTF-8 byte pieces instead of
      UNK, so any text round-trips.
    lossless: decode(encode(text)) == text: no Unicode normalisation
      (SentencePiece's default NFKC rewrites characters), whitespace runs and
      newlines kept (the default collapses them; a newline, never seen by the
      line-based trainer, becomes a byte piece), whitespace-only pieces
      allowed (indentation). Needed for exact bits per byte.
    input_sentence_size: sentences sampled for training (0: all of them).
    max_sentence_length: longer lines (in bytes) are skipped by the trainer.
    seed: seed of the trainer's sampling, for reproducible models.
    num_threads: trainer threads (default: all cores).
    verbose: show the trainer's log (default: silent).
    **trainer_options: any other SentencePiece TrainerSpec field.

  Returns:
    The path of the written `.model` file.
  """
  if vocab_size < 4:
    raise ValueError(f'vocab_size={vocab_size}; needs at least 4 (3 special '
                     'ids + 1 piece).')
  options = dict(
      model_prefix=os.fspath(model_prefix), vocab_size=vocab_size,
      model_type=model_type, character_coverage=character_coverage,
      byte_fallback=byte_fallback, input_sentence_size=input_sentence_size,
      shuffle_input_sentence=True, max_sentence_length=max_sentence_length,
      num_threads=num_threads or os.cpu_count() or 1,
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
      minloglevel=0 if verbose else 2,
  )
  if lossless:
    options.update(_LOSSLESS)
  options.update(trainer_options)
  options.update(_training_input(input_files, format, text_key))
  os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
  _run_trainer(options, seed, verbose)
  return f'{model_prefix}.model'


def _training_input(input_files: str | Sequence[str] | None,
                    format: str,  # pylint: disable=redefined-builtin
                    text_key: str) -> dict[str, Any]:
  """The trainer's input option: files it reads itself ('input'), or sentences read here
  ('sentence_iterator': JSON lines, compressed text, the embedded corpus)."""
  if format not in ('text', 'jsonl'):
    raise ValueError(f"format={format!r}; expected 'text' or 'jsonl'.")
  if input_files is None:
    return {'sentence_iterator': _lines(
        p.read_text(encoding='utf-8') for p in corpus.sotu_split_files('train'))}
  files = readers.expand_files(input_files, 'SentencePiece training input')
  if format == 'jsonl':
    return {'sentence_iterator': _lines(
        doc for f in files for doc in readers.read_jsonl_documents(f, text_key))}
  if any(f.endswith(('.gz', '.bz2', '.xz')) for f in files):
    return {'sentence_iterator': _lines(
        doc for f in files for doc in readers.read_text_documents(f, unit='line'))}
  return {'input': ','.join(files)}


def _run_trainer(options: dict[str, Any], seed: int, verbose: bool) -> None:
  """Runs SentencePiece's trainer with its log on stderr (verbose) or silenced."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  spm.set_random_generator_seed(seed)
  with contextlib.ExitStack() as stack:
    logstream = None if verbose or not _stderr_has_fd() else stack.enter_context(
        open(os.devnull, 'w', encoding='utf-8'))
    spm.SentencePieceTrainer.train(logstream=logstream, **options)


def _stderr_has_fd() -> bool:
  """Whether sys.stderr is backed by a file descriptor.

  SentencePiece silences its trainer by dup2-ing the log stream over sys.stderr's descriptor,
  and fails with "fileno" when there is none (pytest's capsys, some notebooks). Without one the
  log is left alone: minloglevel=2 already keeps the trainer's info lines out of it.
  """
  try:
    sys.stderr.fileno()
  except (io.UnsupportedOperation, AttributeError, ValueError):
    return False
  return True


# ----------------------------------------------------------- bits per byte


def token_byte_lengths(vocabulary) -> np.ndarray:
  """UTF-8 bytes each token id stands for, shape [vocab_size] int32.

  Sum it over a batch's target tokens (`table[targets] * loss_weights`) to
  turn a summed loss into bits per byte. Special ids (pad, EOS, UNK, control)
  count 0 bytes. For SentencePiece it is exact except for the word-start mark
  SentencePiece adds at the start of each document (counted as 1 byte that
  is not in the text); for an exact figure over a split use the byte count of
  `moescale.data.stats.split_stats`.
  """
  import seqio  # pylint: disable=g-import-not-at-top
  size = vocabulary.vocab_size
  table = np.zeros([size], np.int32)
  if isinstance(vocabulary, seqio.ByteVocabulary):
    table[3:3 + 256] = 1
    return table
  if isinstance(vocabulary, seqio.SentencePieceVocabulary):
    sp = vocabulary.tokenizer
    for i in range(sp.get_piece_size()):
      if sp.is_control(i) or sp.is_unknown(i):
        continue
      if sp.is_byte(i):
        table[i] = 1
      else:
        table[i] = len(sp.id_to_piece(i).replace('\u2581', ' ').encode('utf-8'))
    return table
  raise ValueError(f'token_byte_lengths: unsupported vocabulary {vocabulary!r};'
                   ' expected a ByteVocabulary or a SentencePieceVocabulary.')


def bits_per_byte(total_nll_nats: float, num_bytes: int) -> float:
  """Bits per byte from a loss summed over tokens (natural log) and bytes."""
  if num_bytes <= 0:
    raise ValueError(f'num_bytes={num_bytes}; expected > 0.')
  return float(total_nll_nats) / math.log(2.0) / num_bytes
