"""Capacity backends: every expert gets `capacity` fixed slots (GShard-style dropping).

'slots' gathers each kept assignment into row e*capacity + rank of an [E, C, d] buffer (rank
= its position in the expert's group after the stable sort by expert, i.e. token order), runs
one batched matmul over experts, and gathers the results back: O(t*k*d) data movement.

'onehot' is the GShard / flaxformer formulation, kept only as a benchmark baseline: dispatch
and combine as one-hot einsums over a [t, e, c] mask, whose cost grows with E*C (for fixed
capacity factor, with tokens squared) and whose masks alone can reach gigabytes.

Both require `capacity`: the slots are a static shape. Assignments ranked at or beyond
capacity are dropped (contribute 0), as GShard does; a router that already dropped them
(the normal case) makes that a no-op.

Einsum letters: t tokens, j choice, e expert, c capacity slot, d d_model, f expert_size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moescale.layers import dispatch_ops, dispatch_types


def _require_capacity(name: str, capacity: int | None) -> int:
  if capacity is None or int(capacity) < 1:
    raise ValueError(
        f'dispatch backend {name!r} needs capacity >= 1 (slots per expert), got {capacity!r}; '
        f"pass the router's capacity, or use a dropless backend ('fused', 'ragged')")
  return int(capacity)


def expert_ffn(slots: jax.Array, experts: dispatch_types.ExpertWeights, activation,
               dropout=None, pair_of_slot: jax.Array | None = None) -> jax.Array:
  """[e, c, d] -> [e, c, d]: every expert's FFN on its own slots, one batched matmul each;
  with an ExpertDropout, the hidden of slot (e, c) masked as assignment pair_of_slot[e*C + c]."""
  h = jnp.einsum('ecd,edf->ecf', slots, experts.w_in)
  if experts.b_in is not None:
    h = h + experts.b_in[:, None, :]
  h = activation(h)
  if dropout is not None:
    h = h * dropout.scale(pair_of_slot, h.shape[2], h.dtype).reshape(h.shape)
  out = jnp.einsum('ecf,efd->ecd', h, experts.w_out)
  if experts.b_out is not None:
    out = out + experts.b_out[:, None, :]
  return out


class Slots:
  """Index gather into [E, capacity, d] slots, batched matmul, gather back."""
  name = 'slots'

  def __call__(self, x, expert_index, weights, experts, activation, capacity=None,
               dropout=None):
    dispatch_types.check_assignment_shapes(x, expert_index, weights, experts)
    capacity = _require_capacity(self.name, capacity)
    num_experts = experts.num_experts
    s = dispatch_ops.sort_and_rank(expert_index, num_experts)
    layout = dispatch_ops.slot_layout(s, expert_index.shape, capacity)
    slots = dispatch_ops.permute(x, layout).reshape(num_experts, capacity, x.shape[1])
    out = expert_ffn(slots, experts, activation, dropout, layout.pair_of_row)
    out = out.reshape(num_experts * capacity, -1)
    return dispatch_ops.combine(out, weights, layout).astype(x.dtype)


class OneHot:
  """GShard's one-hot dispatch/combine einsums over [t, e, c]: a benchmark baseline only."""
  name = 'onehot'

  def __call__(self, x, expert_index, weights, experts, activation, capacity=None,
               dropout=None):
    dispatch_types.check_assignment_shapes(x, expert_index, weights, experts)
    capacity = _require_capacity(self.name, capacity)
    num_experts = experts.num_experts
    t, k = expert_index.shape
    s = dispatch_ops.sort_and_rank(expert_index, num_experts)
    rank = jnp.zeros((t * k,), jnp.int32).at[s.order].set(s.rank).reshape(t, k)
    expert = jnp.zeros((t * k,), jnp.int32).at[s.order].set(s.sorted_expert).reshape(t, k)
    # one_hot of an out-of-range id (dropped expert, rank >= capacity) is all zeros.
    mask = (jax.nn.one_hot(expert, num_experts, dtype=x.dtype)[..., None]
            * jax.nn.one_hot(rank, capacity, dtype=x.dtype)[..., None, :])    # [t, j, e, c]
    dispatch_mask = mask.sum(axis=1)                                          # [t, e, c]
    combine_mask = jnp.einsum('tj,tjec->tec', weights.astype(x.dtype), mask)
    slots = jnp.einsum('tec,td->ecd', dispatch_mask, x)
    # The assignment in each slot (for the dropout mask): the slot layout's, the same ranks.
    pair_of_slot = (None if dropout is None else
                    dispatch_ops.slot_layout(s, (t, k), capacity).pair_of_row)
    out = expert_ffn(slots, experts, activation, dropout, pair_of_slot)
    return jnp.einsum('tec,ecd->td', combine_mask, out).astype(x.dtype)
