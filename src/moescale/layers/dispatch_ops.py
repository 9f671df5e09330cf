"""The math every dispatch backend shares: sort by expert, lay rows out, permute, combine.

Einsum letters: t tokens, j choice (0..k-1), n = t*k flat assignments (pair p = token * k + j),
e expert, r row of the permuted buffer, d d_model.

A backend first decides where each assignment's row lives in a permuted buffer of `num_rows`
rows (a `RowLayout`): sorted and contiguous (ragged), sorted and padded per expert to a block
multiple (fused), or in fixed per-expert capacity slots (slots). Then

    rows = permute(x, layout)              # [num_rows, d]: rows[r] = x[token of row r]
    out  = <grouped FFN on rows>           # [num_rows, d]
    y    = combine(out, weights, layout)   # [t, d]: y[t] = sum_j weights[t,j] * out[row_of[t,j]]

`permute` and `combine` carry hand-written VJPs made of gathers only: their automatic
transposes would be scatter-adds, which XLA:CPU runs as a serial loop. A layout is a
bijection between kept assignments and used rows, so each transpose is a gather through the
inverse map. Padding rows and dropped assignments point out of range and read zeros.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


def sort_assignments(expert_index: Array, num_experts: int) -> tuple[Array, Array]:
  """Stable sort of the flattened (token, choice) pairs by expert.

  Args:
    expert_index: [t, k] int in [0, num_experts]; num_experts (or anything out of range) means
      dropped, and dropped pairs sort last.
    num_experts: E.

  Returns:
    order: [t*k] int32, flat pair indices (token * k + j) sorted by expert, ties in token
      order.
    group_sizes: [E] int32, kept pairs per expert.
  """
  s = sort_and_rank(expert_index, num_experts)
  return s.order, s.group_sizes


def _clean(expert_index: Array, num_experts: int) -> Array:
  # Out-of-range ids (negative, > E) are dropped, as the reference loop would ignore them.
  flat = expert_index.reshape(-1).astype(jnp.int32)
  return jnp.where((flat < 0) | (flat > num_experts), num_experts, flat)


def _group_starts(sorted_expert: Array, num_experts: int) -> Array:
  """[E+1]: first sorted position of each expert; entry E is where the dropped pairs begin."""
  return jnp.searchsorted(sorted_expert, jnp.arange(num_experts + 1, dtype=jnp.int32),
                          side='left').astype(jnp.int32)


class RowLayout(NamedTuple):
  """Where each assignment lives in a permuted row buffer (all int32, a pytree).

  row_of:      [t, k]      row of assignment (t, j); num_rows if dropped (reads zeros).
  pair_of_row: [num_rows]  flat pair token*k + j held by each row; t*k for a padding row.
  """
  row_of: Array
  pair_of_row: Array

  @property
  def num_rows(self) -> int:
    return self.pair_of_row.shape[0]


class SortedAssignments(NamedTuple):
  """The result of one sort, from which every layout is built.

  order: [n] flat pairs sorted by expert; sorted_expert: [n] their experts (E = dropped);
  rank: [n] position of each sorted pair within its expert's group; group_sizes: [E].
  """
  order: Array
  sorted_expert: Array
  rank: Array
  group_sizes: Array


def sort_and_rank(expert_index: Array, num_experts: int) -> SortedAssignments:
  """`sort_assignments` plus each sorted pair's expert and rank within its group."""
  flat = _clean(expert_index, num_experts)
  n = flat.shape[0]
  if n * (num_experts + 1) < 2**31:
    # One unique int32 key per pair, expert * n + pair: a plain sort of the keys is the stable
    # order, several times faster on XLA:CPU than argsort's stable sort of (expert, iota).
    key = jnp.sort(flat * n + jnp.arange(n, dtype=jnp.int32))
    order, sorted_expert = key % n, key // n
  else:
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    sorted_expert = flat[order]
  starts = _group_starts(sorted_expert, num_experts)
  rank = jnp.arange(flat.shape[0], dtype=jnp.int32) - starts[sorted_expert]
  return SortedAssignments(order, sorted_expert, rank, jnp.diff(starts))


def layout_from_destinations(order: Array, dest: Array, shape: tuple[int, int],
                             num_rows: int) -> RowLayout:
  """A layout from each sorted pair's destination row (num_rows = dropped)."""
  t, k = shape
  n = t * k
  row_of = jnp.zeros((n,), jnp.int32).at[order].set(dest, unique_indices=True)
  pair_of_row = jnp.full((num_rows,), n, jnp.int32).at[dest].set(order, mode='drop')
  return RowLayout(row_of.reshape(t, k), pair_of_row)


def sorted_layout(s: SortedAssignments, shape: tuple[int, int]) -> RowLayout:
  """Rows in sorted order, no padding: kept pairs of expert e are contiguous (ragged_dot)."""
  n = s.order.shape[0]
  num_experts = s.group_sizes.shape[0]
  dest = jnp.where(s.sorted_expert < num_experts, jnp.arange(n, dtype=jnp.int32), n)
  return layout_from_destinations(s.order, dest, shape, n)


def slot_layout(s: SortedAssignments, shape: tuple[int, int], capacity: int) -> RowLayout:
  """Row e*capacity + rank: fixed slots per expert; ranks >= capacity are dropped."""
  num_experts = s.group_sizes.shape[0]
  num_rows = num_experts * capacity
  keep = (s.sorted_expert < num_experts) & (s.rank < capacity)
  dest = jnp.where(keep, s.sorted_expert * capacity + s.rank, num_rows)
  return layout_from_destinations(s.order, dest, shape, num_rows)


class BlockPlan(NamedTuple):
  """The blocks of a blocked layout, in expert order (all int32; blocks past `count` unused).

  expert: [max_blocks]   offset: [max_blocks] first row   size_class: [max_blocks], the
  block has (size_class + 1) * granule rows   count: [] blocks in use.
  """
  expert: Array
  offset: Array
  size_class: Array
  count: Array


def blocked_layout(s: SortedAssignments, shape: tuple[int, int], block_size: int,
                   granule: int) -> tuple[RowLayout, BlockPlan]:
  """Sorted rows, each expert's group padded to a multiple of `granule`, cut into blocks.

  An expert with g rows gets floor(g / block_size) full blocks and one remainder block of
  roundup(g mod block_size, granule) rows, so padding wastes less than `granule` rows per
  expert while most rows run in big blocks. granule == block_size is plain padding to a block
  multiple. Static bounds: max(t*k + E*granule, block_size) rows, ceil(t*k / block_size) + E blocks.
  """
  if block_size % granule:
    raise ValueError(f'block_size={block_size} must be a multiple of granule={granule}')
  t, k = shape
  n = t * k
  num_experts = s.group_sizes.shape[0]
  max_blocks = -(-n // block_size) + num_experts
  # At least block_size rows: every switch branch slices a static block_size-or-smaller window.
  num_rows = max(n + num_experts * granule, block_size)
  padded = (s.group_sizes + granule - 1) // granule * granule             # [E]
  row_start = jnp.cumsum(padded).astype(jnp.int32) - padded                # [E]
  dest = jnp.where(s.sorted_expert < num_experts,
                   jnp.take(row_start, s.sorted_expert, mode='clip') + s.rank, num_rows)
  layout = layout_from_destinations(s.order, dest, shape, num_rows)
  blocks = (padded + block_size - 1) // block_size                         # [E]
  block_end = jnp.cumsum(blocks).astype(jnp.int32)
  b = jnp.arange(max_blocks, dtype=jnp.int32)
  expert = jnp.minimum(jnp.searchsorted(block_end, b, side='right'), num_experts - 1)
  i = b - (block_end[expert] - blocks[expert])                             # block within expert
  size = jnp.clip(padded[expert] - i * block_size, granule, block_size)
  plan = BlockPlan(expert.astype(jnp.int32), (row_start[expert] + i * block_size).astype(jnp.int32),
                   (size // granule - 1).astype(jnp.int32), block_end[-1])
  return layout, plan


def _take(a: Array, idx: Array) -> Array:
  # Out-of-range indices (padding, dropped) read zeros. With no rows to read (t = 0 tokens)
  # every index is out of range; jnp.take refuses an empty axis, so build the zeros here.
  if a.shape[0] == 0:
    return jnp.zeros(idx.shape + a.shape[1:], a.dtype)
  return jnp.take(a, idx, axis=0, mode='fill', fill_value=0)


@jax.custom_vjp
def permute(x: Array, layout: RowLayout) -> Array:
  """x: [t, d] -> rows [num_rows, d]; padding rows are zero."""
  k = layout.row_of.shape[1]
  return _take(x, layout.pair_of_row // k)


def _permute_fwd(x, layout):
  return permute(x, layout), (layout, x.shape[0])


def _permute_bwd(res, drows):
  layout, _ = res
  # Each kept assignment's row gets one copy of x[t]: dx[t] = sum_j drows[row_of[t, j]].
  dx = _take(drows, layout.row_of[:, 0]).astype(jnp.float32)
  for j in range(1, layout.row_of.shape[1]):
    dx = dx + _take(drows, layout.row_of[:, j]).astype(jnp.float32)
  return dx.astype(drows.dtype), None


permute.defvjp(_permute_fwd, _permute_bwd)


@jax.custom_vjp
def combine(rows: Array, weights: Array, layout: RowLayout) -> Array:
  """rows [num_rows, d], weights [t, k] -> y [t, d] float32: sum_j weights[t,j] rows[row_of]."""
  y = jnp.zeros((weights.shape[0], rows.shape[1]), jnp.float32)
  for j in range(weights.shape[1]):
    y = y + weights[:, j, None].astype(jnp.float32) * _take(rows, layout.row_of[:, j])
  return y


def _combine_fwd(rows, weights, layout):
  return combine(rows, weights, layout), (rows, weights, layout)


def _combine_bwd(res, dy):
  rows, weights, layout = res
  t, k = weights.shape
  # drows[r] = weight of the pair in row r times dy of its token: gathers, no scatter.
  w_of_row = _take(weights.reshape(-1), layout.pair_of_row).astype(jnp.float32)
  drows = w_of_row[:, None] * _take(dy, layout.pair_of_row // k)
  dweights = jnp.stack(
      [jnp.sum(dy * _take(rows, layout.row_of[:, j]), axis=-1) for j in range(k)], axis=1)
  return drows.astype(rows.dtype), dweights.astype(weights.dtype), None


combine.defvjp(_combine_fwd, _combine_bwd)
