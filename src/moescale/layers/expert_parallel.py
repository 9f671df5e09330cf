"""Expert parallelism: each device of the mesh's `expert` axis computes only its own experts.
(With one expert shard, each device runs its own rows through every expert: what a mesh that
splits only the rows does, see layers/dispatch.py.)

A wrapper around any dispatch backend, run inside `jax.shard_map` (batch rows split over
`shd.BATCH_AXES`, experts over `expert`), with two ways to bring tokens to their experts:

'ring' ("ring of experts"), per device r of P along `expert` (local tokens x_r [t_r, d]):
  1. all-gather the tokens and their routing over `expert`     x_all [P·t_r, d]
  2. keep the assignments that go to experts r·E/P .. (r+1)·E/P - 1, renumbered 0..E/P-1;
     every other assignment becomes the dispatch sentinel (not computed)
  3. the inner backend computes those experts on those rows      y_all [P·t_r, d] (partial)
  4. reduce-scatter over `expert`: each device gets the sum for its own tokens

'all_to_all': sort the local assignments by destination shard into a [P·C, d] send buffer,
  all-to-all it, compute the local experts, all-to-all the results back, combine locally. C
  is the worst case (dropless) or set by a `capacity_factor`, in which case assignments over
  a buffer chunk are dropped. The math, capacity rules and a worked example are in
  expert_exchange.py.

Both need only collectives every XLA backend has (`ragged_all_to_all` does not exist on
XLA:CPU) and each device does 1/P of the expert FLOPs.

Worked example: 8 devices as (data=2, expert=4), 16 experts, 4096 tokens per step, top-2. Each
device holds 512 tokens and experts {4r..4r+3}. Ring: it gathers the 2048 tokens of its expert
group, computes the ~1024 assignments to its 4 experts, and keeps the reduced 512 rows; it
receives 3·512 rows in the gather and 3·512 in the reduce-scatter (3072). All-to-all at
capacity_factor 1.25: 320 rows per chunk, it receives 3·320 rows each way (1920); dropless,
1024 rows per chunk (6144).

Which is the default, and why 'ring': static shapes make a dropless all-to-all size every chunk
for the worst case (C = t·k), so it moves k times the ring's rows and holds P·t·k-row buffers
(the ring: P·t). The all-to-all is cheaper only when capacity-bounded, by capacity_factor·k/P,
and then it may drop assignments the router kept, which changes the model: a choice a run
must make explicitly (the family's `expert_exchange='all_to_all'` and
`exchange_capacity_factor`), not a default.

The mesh is JAX's own (`jax.set_mesh`, read while tracing): the families decide the exchange
at construction, the trainer only sets the mesh.
An exact all-to-all that moves only the rows routed needs `ragged_all_to_all` (TPU/GPU).

When the mesh also has `tensor` parallelism on `mlp` (expert_size), each device computes its
slice of the hidden units; the partial outputs are summed over `tensor` and the output bias is
added on tensor rank 0 only.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple


import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moescale import sharding as shd
from moescale.layers import dispatch_types
from moescale.layers import expert_exchange

EXPERT_AXIS = 'expert'
EXCHANGES = ('ring', 'all_to_all')
DEFAULT_EXCHANGE = 'ring'  # Why: see the module docstring.


def check_exchange(exchange: str, capacity_factor: float | None = None) -> None:
  """ValueError for an unknown exchange, or a capacity_factor the exchange cannot honour."""
  if exchange not in EXCHANGES:
    raise ValueError(f'unknown expert exchange {exchange!r}; valid: {list(EXCHANGES)}')
  if exchange != 'all_to_all' and capacity_factor is not None and capacity_factor > 0:
    # Silently ignoring it would make a run believe it drops what it does not.
    raise ValueError(f'capacity_factor={capacity_factor!r} bounds the all_to_all buffers; the '
                     f"{exchange!r} exchange is always dropless: use exchange='all_to_all' or "
                     'capacity_factor=None')


def expert_shards() -> int:
  """Size of the `expert` axis of the mesh JAX is tracing under (1 without one)."""
  mesh = jax.sharding.get_abstract_mesh()
  return 1 if mesh.empty else dict(mesh.shape).get(EXPERT_AXIS, 1)


class ExpertParallel:
  """`ExpertParallel(inner, exchange, capacity_factor)(x, expert_index, weights, experts,
  activation, capacity) -> y` under JAX's current mesh; `.apply(...)` also returns the fraction
  of routed assignments the exchange dropped (0 unless all_to_all with a capacity_factor)."""

  def __init__(self, inner: dispatch_types.DispatchBackend, exchange: str = DEFAULT_EXCHANGE,
               capacity_factor: float | None = None):
    check_exchange(exchange, capacity_factor)
    self.inner = inner
    self.exchange, self.capacity_factor = exchange, capacity_factor
    self.name = f'expert_parallel[{exchange}]({getattr(inner, "name", type(inner).__name__)})'

  @staticmethod
  def _mesh_sizes() -> dict[str, int]:
    mesh = jax.sharding.get_abstract_mesh()
    return {a: dict(mesh.shape).get(a, 1) for a in shd.MESH_AXES}

  def _fits(self, tokens: int, experts: dispatch_types.ExpertWeights) -> bool:
    return (experts.num_experts % self._mesh_sizes()[EXPERT_AXIS] == 0
            and tokens % self._row_shards() == 0)

  def _row_shards(self) -> int:
    return shd.batch_shards()

  def __call__(self, x, expert_index, weights, experts, activation, capacity=None,
               dropout=None):
    return self.apply(x, expert_index, weights, experts, activation, capacity, dropout)[0]

  def apply(self, x, expert_index, weights, experts, activation, capacity=None, dropout=None):
    """(y [t, d], dropped_fraction []) for the backend call's arguments."""
    dispatch_types.check_assignment_shapes(x, expert_index, weights, experts)
    extra = {} if dropout is None else {'dropout': dropout}
    if not self._fits(x.shape[0], experts):
      # Shapes that do not split evenly fall back to GSPMD's choice (correct, not sharded work).
      return (self.inner(x, expert_index, weights, experts, activation, capacity, **extra),
              jnp.zeros(()))
    sizes = self._mesh_sizes()
    num_shards, tensor = sizes[EXPERT_AXIS], sizes['tensor']
    split_hidden = tensor > 1 and experts.w_in.shape[-1] % tensor == 0
    mlp = 'tensor' if split_hidden else None
    rows = P(shd.BATCH_AXES, None)
    specs = dispatch_types.ExpertWeights(
        w_in=P(EXPERT_AXIS, None, mlp), w_out=P(EXPERT_AXIS, mlp, None),
        b_in=None if experts.b_in is None else P(EXPERT_AXIS, mlp),
        b_out=None if experts.b_out is None else P(EXPERT_AXIS, None))
    t_local, k = x.shape[0] // self._row_shards(), expert_index.shape[1]
    buffer = expert_exchange.buffer_capacity(t_local, k, num_shards, self.capacity_factor)
    # A hint, never binding: at most capacity rows of one expert in all, P·C rows received.
    local_capacity = None if capacity is None else capacity * num_shards
    if self.exchange == 'all_to_all' and capacity is not None:
      local_capacity = min(local_capacity, num_shards * buffer)
    c = _Local(self.inner, activation, experts.num_experts, num_shards, split_hidden, buffer,
               local_capacity)
    # One expert shard (the rows split, the experts not): no exchange, every expert local.
    fn = _local if num_shards == 1 else _ring if self.exchange == 'ring' else _all_to_all

    def local(x, expert_index, weights, w, drop):
      if split_hidden and w.b_out is not None:
        # The output bias is added once, on tensor rank 0; the other ranks add partial sums.
        first = jax.lax.axis_index('tensor') == 0
        w = w._replace(b_out=jnp.where(first, w.b_out, jnp.zeros_like(w.b_out)))
      if drop is not None and split_hidden:
        # This device's hidden units are a slice of expert_size: their part of each mask.
        drop = dataclasses.replace(
            drop, unit_offset=jax.lax.axis_index('tensor') * w.w_in.shape[-1])
      y, dropped = fn(c, x, expert_index, weights, w, drop)
      return y, jnp.asarray(dropped, jnp.float32)

    # The dropout key is replicated; its assignment ids are split like the rows they belong to.
    drop_spec = None if dropout is None else _dropout_spec(dropout, rows)
    # mesh=None: the mesh JAX is tracing under (jax.set_mesh).
    return jax.shard_map(local, in_specs=(rows, rows, rows, specs, drop_spec),
                         out_specs=(rows, P()), check_vma=False)(
                             x, expert_index, weights, experts, dropout)


class _Local(NamedTuple):
  """What one device's part of an expert-parallel call knows (all static)."""
  inner: dispatch_types.DispatchBackend
  activation: Callable
  num_experts: int
  num_shards: int
  split_hidden: bool    # expert_size split over 'tensor': partial outputs summed over it
  buffer: int           # the all_to_all's rows per destination
  capacity: int | None  # the inner backend's capacity hint


def _dropout_spec(dropout: dispatch_types.ExpertDropout, rows: P):
  """shard_map's in_spec for an ExpertDropout: key and unit offset replicated, ids as rows."""
  return dataclasses.replace(dropout, key=P(), pair=rows, unit_offset=P())


def _inner(c: _Local, x, expert_index, weights, w, drop):
  extra = {} if drop is None else {'dropout': drop}
  return c.inner(x, expert_index, weights, w, c.activation, c.capacity, **extra)


def _local(c: _Local, x, expert_index, weights, w, drop=None):
  """This device's rows through all the experts (it holds them all): nothing to exchange."""
  y = _inner(c, x, expert_index, weights, w, drop)
  return (jax.lax.psum(y, 'tensor') if c.split_hidden else y), 0.0


def _ring(c: _Local, x, expert_index, weights, w, drop=None):
  """One device of the ring: gather the expert group's tokens, compute the local experts,
  reduce-scatter the partial outputs back to their tokens' devices."""
  local_experts = c.num_experts // c.num_shards
  rank = jax.lax.axis_index(EXPERT_AXIS)
  gather = lambda a: jax.lax.all_gather(a, EXPERT_AXIS, axis=0, tiled=True)
  x_all, idx_all, w_all = gather(x), gather(expert_index), gather(weights)
  local_idx = idx_all - rank * local_experts
  mine = (idx_all < c.num_experts) & (local_idx >= 0) & (local_idx < local_experts)
  local_idx = jnp.where(mine, local_idx, local_experts).astype(expert_index.dtype)
  w_all = jnp.where(mine, w_all, jnp.zeros_like(w_all))
  # The assignment ids travel with their rows: each mask stays that of its assignment.
  drop = None if drop is None else dataclasses.replace(drop, pair=gather(drop.pair))
  y_all = _inner(c, x_all, local_idx, w_all, w, drop)
  if c.split_hidden:
    y_all = jax.lax.psum(y_all, 'tensor')
  return jax.lax.psum_scatter(y_all, EXPERT_AXIS, scatter_dimension=0, tiled=True), 0.0


def _all_to_all(c: _Local, x, expert_index, weights, w, drop=None):
  """One device of the all-to-all exchange (expert_exchange.py): (y, fraction dropped)."""
  y, plan = expert_exchange.exchange_ffn(
      x, expert_index, weights, w, c.activation, c.inner, num_experts=c.num_experts,
      axis=EXPERT_AXIS, capacity=c.buffer, inner_capacity=c.capacity, dropout=drop)
  if c.split_hidden:
    y = jax.lax.psum(y, 'tensor')   # After the combine: t rows, not P·C.
  # Tensor ranks hold copies of the same tokens: count over the batch axes only.
  count = lambda a: jax.lax.psum(jnp.sum(a, dtype=jnp.int32), shd.BATCH_AXES)
  dropped = count(plan.dropped) / jnp.maximum(count(plan.routed), 1)
  return y.astype(x.dtype), dropped
