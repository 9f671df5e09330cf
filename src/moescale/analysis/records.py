"""The records file between `moescale collect` and `moescale speedup`: one row per (run,
evaluation domain), as CSV or JSON lines by the file's suffix.

Plain Python (csv, json): reading or writing a records file imports no JAX, so `moescale
speedup` starts in well under a second. `COLUMNS` is what `collect` writes, in this order
(moescale.analysis.collect defines each); a file written by hand or by other tools needs only
`speedup.REQUIRED`, and any further columns travel through unchanged.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Iterable

COLUMNS = (
    'run', 'family', 'config', 'seed', 'train_task', 'domain', 'step', 'source',
    'params', 'active_params', 'ffn_params', 'ffn_active_params',
    'ffn_param_bytes', 'ffn_active_bytes',
    'forward_flops_per_token', 'ffn_flops_per_token', 'train_flops_per_token', 'convention',
    'tokens', 'train_flops', 'step_seconds', 'train_seconds', 'devices', 'device_seconds',
    'loss', 'perplexity', 'bits_per_token', 'bits_per_byte', 'eval_tokens',
    'run_dir',
)
# Columns that hold text; every other known column is a number (empty: unknown).
TEXT_COLUMNS = frozenset({'run', 'family', 'config', 'train_task', 'domain', 'source',
                          'convention', 'run_dir'})
FORMATS = {'.csv': 'CSV', '.jsonl': 'JSON lines'}


def file_format(path: str) -> str:
  """'.csv' or '.jsonl', from the path's suffix; a ValueError naming the valid ones otherwise."""
  suffix = os.path.splitext(path)[1].lower()
  if suffix not in FORMATS:
    valid = ', '.join(f'{s} ({name})' for s, name in FORMATS.items())
    raise ValueError(f'{path}: unknown records format {suffix or "(no suffix)"!r}; valid: '
                     f'{valid}')
  return suffix


def write_records(records: Iterable[dict], path: str) -> str:
  """Writes records to path (CSV or JSON lines by its suffix); returns path. CSV columns: those
  of `COLUMNS` the records have, in that order, then any others sorted; None is an empty cell."""
  records = list(records)
  suffix = file_format(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w', newline='') as f:
    if suffix == '.jsonl':
      for r in records:
        f.write(json.dumps(r) + '\n')
      return path
    present = {k for r in records for k in r}
    known = [c for c in COLUMNS if c in present]
    writer = csv.DictWriter(f, fieldnames=known + sorted(present - set(COLUMNS)))
    writer.writeheader()
    for r in records:
      writer.writerow({k: '' if v is None else (repr(v) if isinstance(v, float) else v)
                       for k, v in r.items()})
  return path


def read_records(path: str) -> list[dict]:
  """The records of a CSV or JSON-lines file, the known numeric columns as numbers (an empty
  cell or a JSON null: None). A value that is not a number names its line and column."""
  suffix = file_format(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no such records file (moescale collect writes one)')
  with open(path, newline='') as f:
    if suffix == '.csv':
      rows = [(i + 2, row) for i, row in enumerate(csv.DictReader(f))]  # line 1: the header
    else:
      rows = []
      for i, line in enumerate(f, 1):
        if line.strip():
          try:
            rows.append((i, json.loads(line)))
          except json.JSONDecodeError as e:
            raise ValueError(f'{path}:{i}: not a JSON object ({e.msg})') from None
  return [_typed(row, f'{path}:{line}') for line, row in rows]


def _typed(row: dict, where: str) -> dict:
  if not isinstance(row, dict):
    raise ValueError(f'{where}: expected a JSON object per line, got {row!r}')
  out = {}
  for key, value in row.items():
    if key is None:  # csv: more cells than the header has names
      raise ValueError(f'{where}: more values than columns: {value!r}')
    out[key] = value if key in TEXT_COLUMNS or key not in COLUMNS else number(value, key, where)
  return out


def number(value, column: str, where: str) -> float | int | None:
  """value as a number (int where it is integral text), None for ''/None; NaN and inf pass
  (the analysis decides what they mean). A ValueError naming where, column and value else."""
  if value is None or value == '':
    return None
  if isinstance(value, bool):
    raise ValueError(f'{where}: {column}={value!r} is not a number')
  if isinstance(value, (int, float)):
    return value
  try:
    return int(value)
  except (TypeError, ValueError):
    pass
  try:
    return float(value)
  except (TypeError, ValueError):
    raise ValueError(f'{where}: {column}={value!r} is not a number') from None
