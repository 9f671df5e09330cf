"""The all-to-all expert exchange: per-device math of `ExpertParallel(exchange='all_to_all')`.

Inside `jax.shard_map`, device r of P along the `expert` axis holds t local tokens (its rows of
the batch), their routing [t, k], and experts r·L .. (r+1)·L - 1 (L = E / P). It

    1. sorts its t·k (token, choice) assignments by destination shard p = expert // L and
       writes assignment (t, j) to row p·C + rank of a send buffer [P·C, d] (rank = position
       among the assignments for shard p, in (token, choice) order); with it goes the expert id
       within the shard, expert mod L (L marks an empty row)
    2. all_to_all: chunk p goes to shard p; the received [P·C, d] holds, in chunk q, the rows
       device q sent here
    3. the inner backend runs the L local experts on the received rows (k = 1, weight 1: the
       combine weights never leave their device, so their gradient is computed locally)
    4. all_to_all back: row p·C + rank again holds the result for the assignment written there
    5. combine: y[t] = sum_j weights[t, j] · back[row of (t, j)]

Buffers are gathered by index (`dispatch_ops.permute` / `combine`, gather-only VJPs), never
one-hot masks. XLA needs static shapes and XLA:CPU has no `ragged_all_to_all`, so every chunk
has C rows, the buffer size:

    dropless (capacity_factor None or <= 0):  C = t·k, the worst case (every local assignment
        goes to one shard). Exact, but the buffers are P·t·k rows where t·k would do on average.
    capacity-bounded:  C = min(t·k, ceil(capacity_factor · t·k / P)). An assignment ranked >= C
        among its device's assignments to one shard is dropped (contributes 0, as if routed to
        the sentinel); `dropped_fraction` counts those.

Worked example: mesh (data=2, expert=4), 16 experts (4 per shard), 4096 tokens per step, top-2.
Each device holds t = 512 tokens, 1024 assignments. Dropless: C = 1024, send and receive
buffers [4·1024, d], of which ~1024 rows are real. capacity_factor 1.25: C = ceil(1.25·1024/4)
= 320, buffers [1280, d]; if 400 of a device's assignments pick experts 4..7, the last 80 in
token order are dropped. Rows each device receives over both exchanges (its own chunk stays):
2·3·1024 = 6144 dropless, 2·3·320 = 1920 at capacity 1.25; the ring all-gathers 3·512 and
reduce-scatters 3·512 rows = 3072. So the all-to-all moves capacity_factor·k/P of the ring's
traffic when bounded (0.625 here), and k times the ring's when dropless. (The compiled HLO of
this example, d = 64, shows exactly these buffers: all-to-all of 4 x [1024, 64] or 4 x [320, 64]
against the ring's all-gather to [2048, 64] and reduce-scatter to [512, 64].)

Einsum letters: t local tokens, j choice, p destination shard, c buffer row within a chunk,
d d_model.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from moescale.layers import dispatch_ops

Array = jax.Array


def buffer_capacity(tokens: int, top_k: int, num_shards: int,
                    capacity_factor: float | None = None) -> int:
  """C, rows per destination shard in one device's send buffer (see the module docstring).

  >>> buffer_capacity(512, 2, 4), buffer_capacity(512, 2, 4, capacity_factor=1.25)
  (1024, 320)
  """
  n = tokens * top_k
  if capacity_factor is None or capacity_factor <= 0:
    return n
  # 1e-9: float error (1.2 * 2 * 10 / 4 = 6.000...01) must not add a row (as topk_moe does).
  return max(1, min(n, math.ceil(capacity_factor * n / num_shards - 1e-9)))


class SendPlan(NamedTuple):
  """Where each local assignment goes in the send buffer.

  layout: (t, j) -> row p·C + rank of the [P·C, d] buffer; row_of = P·C where not sent.
  local_expert: [P·C] int32, each row's expert within its destination shard; L if empty.
  routed: [t, k] bool, the assignment names a real expert (before the buffer's capacity).
  """
  layout: dispatch_ops.RowLayout
  local_expert: Array
  routed: Array

  @property
  def dropped(self) -> Array:
    """[t, k] bool: routed, but beyond the buffer's capacity."""
    return self.routed & (self.layout.row_of == self.layout.num_rows)


def plan_send(expert_index: Array, num_experts: int, num_shards: int, capacity: int) -> SendPlan:
  """The send buffer's layout for one device's routing [t, k] (ids in [0, E]; E = dropped)."""
  local = num_experts // num_shards
  routed = (expert_index >= 0) & (expert_index < num_experts)
  dest = jnp.where(routed, expert_index // local, num_shards)
  s = dispatch_ops.sort_and_rank(dest, num_shards)   # stable: ranks in (token, choice) order
  layout = dispatch_ops.slot_layout(s, expert_index.shape, capacity)
  local_id = jnp.where(routed, expert_index % local, local).reshape(-1).astype(jnp.int32)
  # Padding rows point past the end (pair t·k) and read the empty-row id L.
  local_expert = jnp.take(local_id, layout.pair_of_row, mode='fill', fill_value=local)
  return SendPlan(layout, local_expert, routed)


def dropped_fraction(expert_index: Array, num_experts: int, num_sources: int, num_shards: int,
                     capacity_factor: float | None) -> Array:
  """Fraction of routed assignments the all-to-all buffers drop, from the global routing.

  expert_index: [T, k], the rows of `num_sources` devices (consecutive blocks of T / num_sources
  rows, as `P(BATCH_AXES)` splits them). Each source device has its own buffers, so the count
  is per (source, destination shard): max(0, assignments - C). A pure function: a caller can
  record it as a metric without the backend's help.
  """
  t, k = expert_index.shape
  rows = t // num_sources
  capacity = buffer_capacity(rows, k, num_shards, capacity_factor)
  routed = (expert_index >= 0) & (expert_index < num_experts)
  dest = jnp.where(routed, expert_index // (num_experts // num_shards), num_shards)
  per_shard = jax.nn.one_hot(dest.reshape(num_sources, rows * k), num_shards,
                             dtype=jnp.int32).sum(axis=1)                    # [sources, P]
  dropped = jnp.maximum(per_shard - capacity, 0).sum()
  return dropped / jnp.maximum(routed.sum(), 1)


def exchange_ffn(x: Array, expert_index: Array, weights: Array, experts, activation: Callable,
                 inner: Callable, *, num_experts: int, axis: str, capacity: int,
                 inner_capacity: int | None, dropout=None) -> tuple[Array, SendPlan]:
  """Steps 1-5 of the module docstring, on one device inside `shard_map` over `axis`.

  x: [t, d] local tokens; expert_index, weights: [t, k] local routing over all `num_experts`;
  experts: this device's ExpertWeights (num_experts / P of them); inner: a dispatch backend.
  Returns y [t, d] float32 (the caller sums tensor-parallel partials, then casts) and the plan.
  """
  num_shards = jax.lax.axis_size(axis)
  plan = plan_send(expert_index, num_experts, num_shards, capacity)
  swap = lambda a: jax.lax.all_to_all(a, axis, split_axis=0, concat_axis=0, tiled=True)
  rows, ids = swap(dispatch_ops.permute(x, plan.layout)), swap(plan.local_expert)
  # Empty rows carry the sentinel (never computed) and weight 0, as routers promise.
  gate = (ids < experts.num_experts).astype(weights.dtype)[:, None]
  extra = {}
  if dropout is not None:
    # Each received row's assignment id (row q·C + c: the id device q wrote there), so that
    # the inner backend masks it as the assignment's own mask: k = 1, one id per row.
    pair = jnp.take(dropout.pair.reshape(-1), plan.layout.pair_of_row, mode='fill',
                    fill_value=0)
    extra['dropout'] = dataclasses.replace(dropout, pair=swap(pair)[:, None])
  out = inner(rows, ids[:, None], gate, experts, activation, inner_capacity, **extra)
  return dispatch_ops.combine(swap(out), weights, plan.layout), plan
