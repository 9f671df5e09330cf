"""Reading the files of a task's public release: finding them, and their records by line.

Pure Python. Every error says what to fix: a missing file names the path looked for and the
files the format expects; a malformed record names the file, the line and the field.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from typing import Any, Iterator, Mapping, Sequence

from moescale.data.readers import open_text


def find_file(directory: str | os.PathLike, names: Sequence[str], fmt: str,
              expected: str) -> str:
  """The path of the first of `names` (relative to `directory`) that is a file.

  Raises:
    FileNotFoundError: none is; it names the paths looked for and `expected`, the files of
      the `fmt` release.
  """
  paths = [os.path.join(directory, name) for name in names]
  for path in paths:
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(
      f'{fmt}: no file {" or ".join(repr(p) for p in paths)}; the {fmt} format expects '
      f'{expected} in the directory.')


@dataclasses.dataclass(frozen=True)
class Where:
  """A line of a file, and how its fields are read with errors that name it."""
  path: str
  line: int

  @property
  def id(self) -> str:
    """The id of an example read from this line: file name and line number."""
    return f'{os.path.basename(self.path)}:{self.line}'

  def error(self, message: str) -> ValueError:
    return ValueError(f'{self.path}, line {self.line}: {message}')

  def field(self, record: Any, key: str, kind: type | tuple[type, ...] = str,
            name: str | None = None) -> Any:
    """record[key] of type `kind`; a dotted key ('question.stem') reads a nested field.

    `name` is the field's name in errors (default: `key`).
    """
    name = name or key
    value = record
    for part in key.split('.'):
      if not isinstance(value, Mapping) or value.get(part) is None:
        raise self.error(f'no field {name!r}.')
      value = value[part]
    # bool is an int to isinstance, but a bool where a number belongs is a malformed record.
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _tuple(kind)):
      raise self.error(f'field {name!r} is {value!r}; expected {_names(kind)}.')
    return value

  def text_list(self, record: Any, key: str) -> list[str]:
    """record[key], a list of at least two strings."""
    values = self.field(record, key, list)
    if len(values) < 2 or not all(isinstance(v, str) for v in values):
      raise self.error(f'field {key!r} is {values!r}; expected a list of two or more strings.')
    return values

  def index(self, record: Any, key: str, values: Sequence[str]) -> int:
    """The position in `values` of record[key], a label written as an int or a string."""
    raw = self.field(record, key, (str, int))
    if str(raw).strip() not in values:
      raise self.error(f'field {key!r} is {raw!r}; expected one of {list(values)}.')
    return list(values).index(str(raw).strip())


def _tuple(kind) -> tuple[type, ...]:
  return kind if isinstance(kind, tuple) else (kind,)


def _names(kind) -> str:
  return ' or '.join(k.__name__ for k in _tuple(kind))


def read_jsonl(path: str) -> Iterator[tuple[Where, dict]]:
  """(where, record) for every non-blank line of a JSON-lines file, each a JSON object."""
  with open_text(path) as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = Where(path, lineno)
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise where.error(f'not valid JSON ({e.msg}).') from None
      if not isinstance(record, dict):
        raise where.error(f'expected a JSON object, got {type(record).__name__}.')
      yield where, record


def read_lines(path: str) -> Iterator[tuple[Where, str]]:
  """(where, line without its newline) for every non-blank line of a text file."""
  with open_text(path) as f:
    for lineno, line in enumerate(f, 1):
      if line.strip():
        yield Where(path, lineno), line.strip()


def read_table(path: str, delimiter: str = ',', quoting: int = csv.QUOTE_MINIMAL,
               ) -> Iterator[tuple[Where, dict[str, str]]]:
  """(where, {column: value}) for every row of a CSV / TSV file with a header line.

  A row's line is the line it ends on (a quoted field may span lines). Columns missing from
  a short row are absent from its dict, so that `Where.field` reports them.
  """
  with open_text(path) as f:
    reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
    header = next(reader, None)
    if header is None:
      raise Where(path, 1).error('empty file; expected a header line.')
    header = [name.strip() for name in header]
    for row in reader:
      if any(cell.strip() for cell in row):
        yield Where(path, reader.line_num), dict(zip(header, row))


def table_columns(path: str, delimiter: str = ',') -> list[str]:
  """The column names of a CSV / TSV file's header line (empty for an empty file)."""
  with open_text(path) as f:
    header = next(csv.reader(f, delimiter=delimiter), [])
  return [name.strip() for name in header]
