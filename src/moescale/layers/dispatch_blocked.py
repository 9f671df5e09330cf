"""The 'blocked' backend: a loop over expert-homogeneous row blocks (see also 'fused').

Assignments are sorted by expert; each expert's group is padded to a multiple of a small
`granule` G and cut into blocks of at most `block_size` B rows (full blocks, then one
remainder block), so every block belongs to one expert (`dispatch_ops.blocked_layout`). A
loop visits only the used blocks (a while loop with a traced trip count, so empty experts and
the static slack cost nothing) and computes

    out[blk] = act(rows[blk] @ w_in[e_blk] + b_in[e_blk]) @ w_out[e_blk] + b_out[e_blk]

reading the expert's weights by dynamic index. A block's row count is static per `lax.switch`
branch, one branch per multiple of G up to B. Why not plain padding to a multiple of B: on
XLA:CPU each block costs a fixed re-read of the expert's weights and gradients, so blocks must
be big, yet padding to big blocks wastes up to B rows per expert (50% of the FLOPs at 512
experts x 64 rows); remainder blocks sized to the granule keep both small. G == B is plain
padding.

The VJP is written by hand: autodiff of the loop would stack one copy of the expert weights per
iteration (the grouped-matmul OOM MaxText users report); here the backward loop accumulates dW
straight into [E, d, f] buffers. `save_hidden` keeps the pre-activations ([rows, f], the
memory a dense layer's backward keeps too) instead of recomputing them per block.

Einsum letters: r rows of a block, e expert, d d_model, f expert_size.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from moescale.layers import dispatch_ops, dispatch_types

Array = jax.Array


def choose_block_size(num_assignments: int, num_experts: int) -> tuple[int, int]:
  """(block_size, granule) for a problem size, measured on XLA:CPU with `moescale.bench`.

  Measured (16k tokens, top-2, fwd+bwd, CPU time vs the FLOP-matched dense layer): padding
  to plain blocks of 64 gave 1.5x / 2.2x at 64 / 512 experts, 128 rows 1.4x / 2.7x; blocks of
  256 with a granule of 16 gave 1.15x / 1.8x. Granule 8 and blocks of 128 or 512 were within
  noise of that. Blocks shrink only for tiny groups, where they cut the switch's branches
  (compile time) and change nothing else: one block per expert either way.
  """
  mean = max(1, num_assignments // max(1, num_experts))
  block = 16
  while block < min(256, 4 * mean):
    block *= 2
  return block, 16


def _expert(a: Array | None, e: Array):
  return None if a is None else lax.dynamic_index_in_dim(a, e, keepdims=False)


def _add_to_expert(buf: Array | None, e: Array, value: Array | None):
  if buf is None:
    return None
  cur = lax.dynamic_index_in_dim(buf, e, keepdims=False)
  return lax.dynamic_update_index_in_dim(buf, cur + value.astype(buf.dtype), e, 0)


def _pre_activation(xb, experts, e):
  h = xb @ _expert(experts.w_in, e)
  if experts.b_in is not None:
    h = h + _expert(experts.b_in, e)
  return h


def _pad_rows(a: Array | None, rows: int) -> Array | None:
  return None if a is None else jnp.pad(a, ((0, rows - a.shape[0]), (0, 0)))


def _switch_loop(plan, granule, block_size, branch, apply, init):
  """for b < plan.count: carry = apply(carry, b, switch(size_class[b], branch(size))).

  The switch only *computes* a block (results padded to block_size rows, one shape for all
  branches); the in-place buffer updates happen outside it, because XLA:CPU copies every
  loop-carried buffer that flows through a conditional, once per iteration.
  """
  branches = [branch(size) for size in range(granule, block_size + 1, granule)]

  def body(b, carry):
    result = lax.switch(plan.size_class[b], branches, plan.offset[b], plan.expert[b])
    return apply(carry, b, result)

  return lax.fori_loop(0, plan.count, body, init)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def blocked_ffn(rows: Array, experts: dispatch_types.ExpertWeights, plan: dispatch_ops.BlockPlan,
                activation: Callable[[Array], Array], granule: int, block_size: int,
                save_hidden: bool) -> Array:
  """rows [R, d] -> out [R, d]: each planned block through its expert's FFN; rows outside
  every used block are left zero."""
  return _forward(rows, experts, plan, activation, granule, block_size, False)[0]


def _forward(rows, experts, plan, activation, granule, block_size, save_hidden):
  num_rows, f = rows.shape[0], experts.w_in.shape[2]
  # block_size rows of slack: a block's padded write may run past the last used row.
  slack = num_rows + block_size
  out = jnp.zeros((slack, rows.shape[1]), rows.dtype)
  hidden = jnp.zeros((slack, f), rows.dtype) if save_hidden else None

  def branch(size):
    def run(off, e):
      pre = _pre_activation(lax.dynamic_slice_in_dim(rows, off, size), experts, e)
      o = activation(pre) @ _expert(experts.w_out, e)
      if experts.b_out is not None:
        o = o + _expert(experts.b_out, e)
      return _pad_rows(o, block_size), _pad_rows(pre if save_hidden else None, block_size)
    return run

  def apply(carry, b, result):
    # Blocks run in increasing row order, so rows a padded write spills into belong to a
    # later block (or the slack) and are overwritten with their own values in turn.
    out, hidden = carry
    off = plan.offset[b]
    out = lax.dynamic_update_slice_in_dim(out, result[0].astype(out.dtype), off, 0)
    if hidden is not None:
      hidden = lax.dynamic_update_slice_in_dim(hidden, result[1].astype(hidden.dtype), off, 0)
    return out, hidden

  out, hidden = _switch_loop(plan, granule, block_size, branch, apply, (out, hidden))
  return out[:num_rows], hidden


def _blocked_fwd(rows, experts, plan, activation, granule, block_size, save_hidden):
  out, hidden = _forward(rows, experts, plan, activation, granule, block_size, save_hidden)
  return out, (rows, experts, plan, hidden)


def _blocked_bwd(activation, granule, block_size, save_hidden, res, dout):
  rows, experts, plan, hidden = res
  del save_hidden  # `hidden` is None unless the forward saved it.
  num_rows = rows.shape[0]
  zeros32 = lambda a: None if a is None else jnp.zeros(a.shape, jnp.float32)
  grads0 = dispatch_types.ExpertWeights(*(zeros32(a) for a in experts))
  drows0 = jnp.zeros((num_rows + block_size, rows.shape[1]), rows.dtype)

  def branch(size):
    def run(off, e):
      xb = lax.dynamic_slice_in_dim(rows, off, size)
      do = lax.dynamic_slice_in_dim(dout, off, size)
      pre = (_pre_activation(xb, experts, e) if hidden is None
             else lax.dynamic_slice_in_dim(hidden, off, size))
      h, act_vjp = jax.vjp(activation, pre)
      w_in, w_out = _expert(experts.w_in, e), _expert(experts.w_out, e)
      dpre, = act_vjp(do @ w_out.T)
      return (_pad_rows(dpre @ w_in.T, block_size), xb.T @ dpre, h.T @ do,
              None if experts.b_in is None else dpre.sum(0),
              None if experts.b_out is None else do.sum(0))
    return run

  def apply(carry, b, result):
    drows, g = carry
    e = plan.expert[b]
    dx, dw_in, dw_out, db_in, db_out = result
    drows = lax.dynamic_update_slice_in_dim(drows, dx.astype(drows.dtype), plan.offset[b], 0)
    g = dispatch_types.ExpertWeights(
        _add_to_expert(g.w_in, e, dw_in), _add_to_expert(g.w_out, e, dw_out),
        _add_to_expert(g.b_in, e, db_in), _add_to_expert(g.b_out, e, db_out))
    return drows, g

  drows, grads = _switch_loop(plan, granule, block_size, branch, apply, (drows0, grads0))
  grads = dispatch_types.ExpertWeights(
      *(None if g is None else g.astype(a.dtype) for g, a in zip(grads, experts)))
  return drows[:num_rows], grads, None


blocked_ffn.defvjp(_blocked_fwd, _blocked_bwd)


class Blocked:
  """Sort, pad groups to the granule, cut into blocks of <= block_size rows, loop.

  block_size / granule: None picks them with `choose_block_size`. save_hidden: keep the
  [rows, expert_size] pre-activations for the backward instead of recomputing them per block
  (6 matmuls per block instead of 7, for the memory a dense layer's backward keeps anyway;
  measured ~5-10% faster on XLA:CPU). False is the pure recompute form.
  """
  name = 'blocked'

  def __init__(self, block_size: int | None = None, granule: int | None = None,
               save_hidden: bool = True):
    for key, value in (('block_size', block_size), ('granule', granule)):
      if value is not None and value < 1:
        raise ValueError(f'{key}={value!r} must be >= 1 or None')
    if block_size and granule and block_size % granule:
      raise ValueError(f'block_size={block_size} must be a multiple of granule={granule}')
    self.block_size, self.granule = block_size, granule
    self.save_hidden = bool(save_hidden)

  def sizes(self, num_assignments: int, num_experts: int,
            choose=None) -> tuple[int, int]:
    """(block_size, granule): the constructor's where given, else `choose`'s (default
    `choose_block_size`), adjusted so that block_size stays a multiple of granule."""
    block, granule = (choose or choose_block_size)(num_assignments, num_experts)
    if self.block_size:
      block, granule = self.block_size, self.granule or math.gcd(self.block_size, granule)
    elif self.granule:
      block, granule = -(-max(block, self.granule) // self.granule) * self.granule, self.granule
    # A block larger than all the rows (tiny or per-device problems) only adds switch branches.
    # At least one granule: no assignments at all (t = 0) would otherwise give blocks of 0 rows.
    return min(block, max(1, -(-num_assignments // granule)) * granule), granule

  def __call__(self, x, expert_index, weights, experts, activation, capacity=None):
    del capacity  # Dropless: the loop bound comes from the actual group sizes.
    dispatch_types.check_assignment_shapes(x, expert_index, weights, experts)
    t, k = expert_index.shape
    block, granule = self.sizes(t * k, experts.num_experts)
    s = dispatch_ops.sort_and_rank(expert_index, experts.num_experts)
    layout, plan = dispatch_ops.blocked_layout(s, (t, k), block, granule)
    rows = dispatch_ops.permute(x, layout)
    out = blocked_ffn(rows, experts, plan, activation, granule, block, self.save_hidden)
    return dispatch_ops.combine(out, weights, layout).astype(x.dtype)
