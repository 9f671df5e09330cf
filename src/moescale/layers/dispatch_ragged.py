"""The 'ragged' backend: `jax.lax.ragged_dot` on rows sorted by expert (MaxText's dropless path).

Native grouped matmul on GPU and TPU. On XLA:CPU ragged_dot is lowered to a dense masked
matmul over all groups (E times the work), so it is never the CPU default.

Einsum letters: n sorted rows (t*k), e expert, d d_model, f expert_size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moescale.layers import dispatch_ops, dispatch_types


class Ragged:
  """Sort, contiguous groups, two ragged_dots, combine. Dropless; `capacity` is ignored."""
  name = 'ragged'

  def __call__(self, x, expert_index, weights, experts, activation, capacity=None):
    del capacity
    dispatch_types.check_assignment_shapes(x, expert_index, weights, experts)
    num_experts = experts.num_experts
    s = dispatch_ops.sort_and_rank(expert_index, num_experts)
    layout = dispatch_ops.sorted_layout(s, expert_index.shape)
    rows = dispatch_ops.permute(x, layout)                                  # [n, d]
    # Dropped pairs sort last, beyond sum(group_sizes): ragged_dot leaves those rows zero.
    h = jax.lax.ragged_dot(rows, experts.w_in, s.group_sizes)               # [n, f]
    row_expert = jnp.minimum(s.sorted_expert, num_experts - 1)
    if experts.b_in is not None:
      h = h + jnp.take(experts.b_in, row_expert, axis=0)
    out = jax.lax.ragged_dot(activation(h), experts.w_out, s.group_sizes)  # [n, d]
    if experts.b_out is not None:
      out = out + jnp.take(experts.b_out, row_expert, axis=0)
    return dispatch_ops.combine(out, weights, layout).astype(x.dtype)
