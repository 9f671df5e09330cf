"""Reading files into documents: the readers every corpus of moescale.data is built from.

Pure Python (no TensorFlow, no seqio). A *document* is a `str`, or `bytes` for byte-level
corpora such as enwik8; each reader takes a file and yields its documents in file order,
lazily, so that large files can be streamed. Which files make which split is `corpus`'s
business; the helpers here find files and check that they exist, naming what they were for.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import json
import lzma
import os
import pathlib
import re
from typing import Iterator, Sequence

Document = str | bytes

TEXT_UNITS = ('paragraph', 'line', 'file')


# ------------------------------------------------------------------ files


def require_file(path: str | os.PathLike, what: str) -> str:
  """Returns `path` as str, or raises FileNotFoundError naming it and `what`."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f'{what}: expected a file at {path!r}, but '
        + ('it is a directory.' if os.path.isdir(path) else 'it does not exist.'))
  return path


def expand_files(patterns: str | os.PathLike | Sequence[str | os.PathLike],
                 what: str) -> list[str]:
  """Expands file names / glob patterns (sorted per pattern), all must exist."""
  if isinstance(patterns, (str, os.PathLike)):
    patterns = [patterns]
  files = []
  for pattern in patterns:
    pattern = os.fspath(pattern)
    if glob.has_magic(pattern):
      matches = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
      if not matches:
        raise FileNotFoundError(
            f'{what}: the pattern {pattern!r} matches no file.')
      files.extend(matches)
    else:
      files.append(require_file(pattern, what))
  if not files:
    raise FileNotFoundError(f'{what}: no files given.')
  return files


def open_text(path: str):
  """Opens a text file as UTF-8, decompressing .gz / .bz2 / .xz by suffix."""
  opener = {'.gz': gzip.open, '.bz2': bz2.open, '.xz': lzma.open}.get(
      pathlib.Path(path).suffix, open)
  return opener(path, 'rt', encoding='utf-8', newline='')


# --------------------------------------------------------- document readers


def read_text_documents(path: str, unit: str = 'paragraph') -> Iterator[str]:
  """Yields the documents of a plain-text file.

  Args:
    path: a UTF-8 text file (optionally .gz / .bz2 / .xz).
    unit: what a document is. 'paragraph': a run of non-blank lines (blank
      lines separate documents and are not part of any); 'line': every
      non-blank line (one-document-per-line exports such as the Pile's or
      C4's text dumps); 'file': the whole file.

  Yields:
    Non-empty documents; a 'paragraph' keeps its inner newlines and no
    trailing one, a 'line' has no newline.
  """
  if unit not in TEXT_UNITS:
    raise ValueError(f'unit={unit!r}; expected one of {TEXT_UNITS}.')
  with open_text(path) as f:
    if unit == 'file':
      text = f.read()
      if text:
        yield text
      return
    paragraph = []
    for line in f:
      line = line.rstrip('\r\n')
      if unit == 'line':
        if line.strip():
          yield line
      elif line.strip():
        paragraph.append(line)
      elif paragraph:
        yield '\n'.join(paragraph)
        paragraph = []
    if paragraph:
      yield '\n'.join(paragraph)


def read_jsonl_documents(path: str, text_key: str = 'text') -> Iterator[str]:
  """Yields `record[text_key]` of every JSON line (one document per line)."""
  with open_text(path) as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      record = json.loads(line)
      if text_key not in record:
        raise KeyError(f'{path}:{lineno}: no key {text_key!r} in the JSON '
                       f'record (keys: {sorted(record)}).')
      if record[text_key]:
        yield record[text_key]


# A WikiText article starts at a level-1 heading line " = Title = ".
_WIKITEXT_TITLE = re.compile(r'^ = [^=].* = $')


def read_wikitext_articles(path: str) -> Iterator[str]:
  """Yields the articles of a WikiText raw file, one document per article.

  An article runs from its level-1 heading line (" = Title = ") to the line
  before the next one; text before the first heading belongs to the first
  article. The articles concatenated give back the file exactly.
  """
  with open_text(path) as f:
    article = []
    for line in f:
      if _WIKITEXT_TITLE.match(line.rstrip('\r\n')) and any(
          l.strip() for l in article):
        yield ''.join(article)
        article = []
      article.append(line)
    if any(l.strip() for l in article):
      yield ''.join(article)


def read_byte_blocks(path: str, start: int, stop: int,
                     block_bytes: int) -> Iterator[bytes]:
  """Yields bytes [start, stop) of a file in blocks of `block_bytes`."""
  with open(path, 'rb') as f:
    f.seek(start)
    position = start
    while position < stop:
      block = f.read(min(block_bytes, stop - position))
      if not block:
        raise EOFError(f'{path} ended at byte {position}, expected {stop}.')
      position += len(block)
      yield block
