"""What a pair file binds: `Pair`, two models and the quantity they must agree on.

Plain Python, importing nothing of moescale: `gin_config` registers `Pair` for pair files
(under its public name `moescale.pairs.Pair`) and the rest of `moescale.pairs` checks it,
importing `gin_config` only inside its functions, so neither imports the other at load time.
`to_gin` writes a `Pair` back as a pair file. See `moescale.pairs` for the file format.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

MATCHES = ('train_flops', 'forward_flops', 'total_params', 'active_params')
CONVENTIONS = ('standard', 'recompute', 'artetxe')
SIDES = ('dense', 'sparse')


@dataclasses.dataclass(frozen=True)
class Pair:
  """Two models and the quantity they must agree on (see the module docstring).

  ratio = quantity(sparse) / quantity(dense); the pair holds iff
  |ratio / expected_ratio - 1| <= tolerance.
  """
  dense: Sequence[str]
  sparse: Sequence[str]
  match: str = 'train_flops'
  dense_bindings: Sequence[str] = ()
  sparse_bindings: Sequence[str] = ()
  convention: str = 'standard'
  expected_ratio: float = 1.0
  tolerance: float = 0.01
  name: str = ''
  description: str = ''

  def __post_init__(self):
    for side in SIDES:
      files = getattr(self, side)
      if isinstance(files, str) or not files:
        raise ValueError(f'Pair.{side} must be a non-empty list of gin files, got {files!r}')
      object.__setattr__(self, side, tuple(files))
      bindings = getattr(self, f'{side}_bindings')
      if isinstance(bindings, str):
        raise ValueError(f'Pair.{side}_bindings must be a list of bindings, got {bindings!r}')
      object.__setattr__(self, f'{side}_bindings', tuple(bindings))
    if self.match not in MATCHES:
      raise ValueError(f'Pair.match={self.match!r}; valid: {list(MATCHES)}')
    if self.convention not in CONVENTIONS:
      raise ValueError(f'Pair.convention={self.convention!r}; valid: {list(CONVENTIONS)}')
    if not self.tolerance >= 0:
      raise ValueError(f'Pair.tolerance={self.tolerance!r} must be >= 0')
    if not self.expected_ratio > 0:
      raise ValueError(f'Pair.expected_ratio={self.expected_ratio!r} must be > 0')

  def member(self, side: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return getattr(self, side), getattr(self, f'{side}_bindings')


def to_gin(pair: Pair) -> str:
  """The pair as a pair file's text."""
  lines = []
  if pair.description:
    lines += [f'# {line}'.rstrip() for line in pair.description.splitlines()]
  lines.append(f'Pair.name = {pair.name!r}')
  for side in SIDES:
    files, bindings = pair.member(side)
    lines.append(f'Pair.{side} = {list(files)!r}')
    if bindings:
      lines.append(f'Pair.{side}_bindings = {list(bindings)!r}')
  lines += [f'Pair.match = {pair.match!r}', f'Pair.convention = {pair.convention!r}',
            f'Pair.expected_ratio = {pair.expected_ratio!r}',
            f'Pair.tolerance = {pair.tolerance!r}']
  return '\n'.join(lines) + '\n'
