"""The 'fused' MoE dispatch as one C++ kernel on XLA:CPU (moe_ffn.cc), forward and backward:
a drop-in for `dispatch_fused.XlaLoop`, registered as the 'moe_ffn' op's 'cpu' kernels.

    y = grouped_ffn(x, weights, experts, sorted_assignments, activation_id)

Same computation as dispatch_fused's XLA loop, on the sorted rows without block padding: per
expert, gather its tokens' rows of x, two GEMMs through the activation, the weighted output
rows in sorted order; then each token sums its k rows. The backward is the hand-written one of
dispatch_fused (see there), with the pre-activations [t*k, f] kept from the forward.

Why: the XLA loop spends, per block, a while-loop iteration with dynamic slices of the expert
weights and a scatter-add into [t, d]; at hundreds of experts that is hundreds of small steps a
pass. Here the experts are tasks shared by the threads (so one call uses every core, as XLA's
dense matmul does), each expert's weights are read once per 512 rows, and no two threads
write one row (the combine is a separate pass per token, in a fixed order).

Memory: besides y and the pre-activations, each call writes its expert outputs (forward) or
row cotangents (backward) as [t*k, d] scratch results, which XLA frees as soon as the call
returns; the combine pass reads them so that no two threads add into one token's row.

Only float32 and the four named activations (layers.common: relu, gelu, gelu_tanh, silu) run
here; `CpuKernels` sends everything else to the XLA loop. docs/performance.md has the
measurements.

Einsum letters: t tokens, k choices, n = t*k rows (sorted pairs), e expert, d d_model,
f expert_size.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from moescale.cpu import build
from moescale.layers import common, dispatch_fused, dispatch_ops, dispatch_types

Array = jax.Array

# The ids kernels/activations.h gives the activations of layers.common.
ACTIVATION_IDS = {'relu': 0, 'gelu': 1, 'gelu_tanh': 2, 'silu': 3}


def _rows(s: dispatch_ops.SortedAssignments, k: int) -> tuple[Array, Array, Array, Array]:
  """The sorted rows a call runs on (all int32): token [n], group_start [e + 1] (rows from
  group_start[e] on were dropped), and the sorted layout's row_of [t, k] and pair_of_row [n]
  (n for a dropped pair / row)."""
  layout = dispatch_ops.sorted_layout(s, (s.order.shape[0] // k, k))
  group_start = jnp.concatenate(
      [jnp.zeros((1,), jnp.int32), jnp.cumsum(s.group_sizes).astype(jnp.int32)])
  return layout.pair_of_row // k, group_start, layout.row_of, layout.pair_of_row


def _biases(experts: dispatch_types.ExpertWeights) -> tuple[Array, Array]:
  e, d, f = experts.w_in.shape
  b_in = experts.b_in if experts.b_in is not None else jnp.zeros((e, 0), jnp.float32)
  b_out = experts.b_out if experts.b_out is not None else jnp.zeros((e, 0), jnp.float32)
  return b_in, b_out


def _forward(x, w_rows, experts, token, group_start, row_of, activation_id):
  t, d = x.shape
  n, f = token.shape[0], experts.w_in.shape[2]
  out = (jax.ShapeDtypeStruct((t, d), jnp.float32), jax.ShapeDtypeStruct((n, f), jnp.float32),
         jax.ShapeDtypeStruct((n, d), jnp.float32))
  b_in, b_out = _biases(experts)
  y, pre, _ = jax.ffi.ffi_call(build.MOE_FFN, out, vmap_method='sequential')(
      x, experts.w_in, experts.w_out, b_in, b_out, token, w_rows, group_start, row_of,
      activation=np.int32(activation_id))
  return y, pre


def _row_weights(weights: Array, pair_of_row: Array) -> Array:
  """[n] float32: the combine weight of each row's pair (0 for a dropped row)."""
  return jnp.asarray(weights).reshape(-1).at[pair_of_row].get(mode='fill', fill_value=0).astype(
      jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _grouped_ffn(x, weights, experts, token, group_start, row_of, pair_of_row, activation_id):
  w_rows = _row_weights(weights, pair_of_row)
  return _forward(x, w_rows, experts, token, group_start, row_of, activation_id)[0]


def _grouped_ffn_fwd(x, weights, experts, token, group_start, row_of, pair_of_row,
                     activation_id):
  w_rows = _row_weights(weights, pair_of_row)
  y, pre = _forward(x, w_rows, experts, token, group_start, row_of, activation_id)
  return y, (x, weights, w_rows, experts, token, group_start, row_of, pre)


def _grouped_ffn_bwd(activation_id, res, dy):
  x, weights, w_rows, experts, token, group_start, row_of, pre = res
  t, d = x.shape
  e, _, f = experts.w_in.shape
  n = token.shape[0]
  b_in, b_out = _biases(experts)
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  out = (f32(t, d), f32(n), f32(e, d, f), f32(e, f, d), f32(*b_in.shape), f32(*b_out.shape),
         f32(n, d))
  dx, drow, dw_in, dw_out, db_in, db_out, _ = jax.ffi.ffi_call(
      build.MOE_FFN_GRAD, out, vmap_method='sequential')(
          x, dy.astype(jnp.float32), experts.w_in, experts.w_out, b_in, b_out, token, w_rows,
          group_start, row_of, pre, activation=np.int32(activation_id))
  # A pair's gradient is its row's (a dropped pair's row_of is n: 0).
  dweights = drow.at[row_of].get(mode='fill', fill_value=0).astype(weights.dtype)
  grads = dispatch_types.ExpertWeights(
      dw_in, dw_out, None if experts.b_in is None else db_in,
      None if experts.b_out is None else db_out)
  return dx, dweights, grads, None, None, None, None


_grouped_ffn.defvjp(_grouped_ffn_fwd, _grouped_ffn_bwd)


def grouped_ffn(x: Array, weights: Array, experts: dispatch_types.ExpertWeights,
                s: dispatch_ops.SortedAssignments, activation_id: int) -> Array:
  """x [t, d], weights [t, k] float32, the experts' float32 weights, their sort -> y [t, d]
  float32: sum_j weights[t, j] FFN_{expert of (t, j)}(x[t]) over the kept pairs."""
  return _grouped_ffn(x, weights, experts, *_rows(s, weights.shape[1]), activation_id)


class CpuKernels(dispatch_fused.XlaLoop):
  """The fused dispatch as `grouped_ffn` for float32 and the named activations of
  layers.common; the XLA loop for anything else, call by call."""
  name = 'cpu'

  def __call__(self, x, weights, experts, s, activation, sizes):
    act = common.activation_name(activation)
    dtypes = {jnp.dtype(a.dtype) for a in (x, weights, *experts) if a is not None}
    if act is None or dtypes != {jnp.dtype(jnp.float32)}:
      return super().__call__(x, weights, experts, s, activation, sizes)
    return grouped_ffn(x, weights, experts, s, ACTIVATION_IDS[act])


CPU = CpuKernels()
