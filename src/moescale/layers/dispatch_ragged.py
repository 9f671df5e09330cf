"""The 'ragged' backend: `jax.lax.ragged_dot` on rows sorted by expert (MaxText's dropless path).

Native grouped matmul on GPU and TPU. On XLA:CPU ragged_dot is lowered to a dense masked
matmul over all groups (E times the work), so it is never the CPU choice.

`grouped_matmul` wraps ragged_dot so that it can be vmapped in every argument combination and
through its gradient (jax.jacrev, per-example gradients): ragged_dot itself batches only when
every operand is batched at dimension 0. Its VJP is written out, and both directions broadcast
the unbatched operands under vmap. Outside vmap it is ragged_dot and its usual transpose.

Einsum letters: n sorted rows (t*k), e expert, d d_model, f expert_size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moescale.layers import dispatch_ops, dispatch_types


def _batched_everywhere(fn):
  """`fn` under jax.custom_batching: a vmap broadcasts its unbatched operands to the batch and
  vmaps `fn` with every operand batched at dimension 0 (the only case ragged_dot batches)."""
  wrapped = jax.custom_batching.custom_vmap(fn)

  @wrapped.def_vmap
  def rule(axis_size, in_batched, *args):
    args = [a if b else jnp.broadcast_to(a, (axis_size,) + a.shape)
            for a, b in zip(args, in_batched)]
    return jax.vmap(fn)(*args), True

  return wrapped


_forward = _batched_everywhere(lambda lhs, rhs, sizes: jax.lax.ragged_dot(lhs, rhs, sizes))
# d rhs[e] = lhs[rows of e].T @ g[rows of e]: the transpose of ragged_dot in rhs.
_rhs_grad = _batched_everywhere(lambda lhs, g, rhs, sizes: jax.vjp(
    lambda r: jax.lax.ragged_dot(lhs, r, sizes), rhs)[1](g)[0])


@jax.custom_vjp
def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
  """lhs [n, a] rows sorted by group, rhs [e, a, b], group_sizes [e] -> [n, b]: each group's
  rows times its matrix; rows beyond sum(group_sizes) come out zero (ragged_dot)."""
  return _forward(lhs, rhs, group_sizes)


def _grouped_matmul_fwd(lhs, rhs, group_sizes):
  return _forward(lhs, rhs, group_sizes), (lhs, rhs, group_sizes)


def _grouped_matmul_bwd(res, g):
  lhs, rhs, group_sizes = res
  g = g.astype(lhs.dtype)
  dlhs = _forward(g, jnp.swapaxes(rhs, 1, 2), group_sizes)
  return dlhs, _rhs_grad(lhs, g, rhs, group_sizes), None


grouped_matmul.defvjp(_grouped_matmul_fwd, _grouped_matmul_bwd)


class Ragged:
  """Sort, contiguous groups, two ragged_dots, combine. Dropless; `capacity` is ignored."""
  name = 'ragged'

  def __call__(self, x, expert_index, weights, experts, activation, capacity=None,
               dropout=None):
    del capacity
    dispatch_types.check_assignment_shapes(x, expert_index, weights, experts)
    num_experts = experts.num_experts
    s = dispatch_ops.sort_and_rank(expert_index, num_experts)
    layout = dispatch_ops.sorted_layout(s, expert_index.shape)
    rows = dispatch_ops.permute(x, layout)                                  # [n, d]
    # Dropped pairs sort last, beyond sum(group_sizes): ragged_dot leaves those rows zero.
    h = grouped_matmul(rows, experts.w_in, s.group_sizes)                   # [n, f]
    row_expert = jnp.minimum(s.sorted_expert, num_experts - 1)
    if experts.b_in is not None:
      h = h + jnp.take(experts.b_in, row_expert, axis=0)
    h = activation(h)
    if dropout is not None:
      h = h * dropout.scale(layout.pair_of_row, h.shape[1], h.dtype)
    out = grouped_matmul(h, experts.w_out, s.group_sizes)                  # [n, d]
    if experts.b_out is not None:
      out = out + jnp.take(experts.b_out, row_expert, axis=0)
    return dispatch_ops.combine(out, weights, layout).astype(x.dtype)
