"""The 'blocked' backend: a loop over expert-homogeneous row blocks (the XLA:CPU default).

Assignments are sorted by expert and each expert's group is padded to a multiple of the
block size B, so every block of B rows belongs to one expert. A loop visits only the used
blocks (a while loop with a traced trip count, so empty experts and the static slack of E
spare blocks cost nothing) and computes

    out[blk] = act(rows[blk] @ w_in[e_blk] + b_in[e_blk]) @ w_out[e_blk] + b_out[e_blk]

reading the expert's weights by dynamic index. The VJP is written by hand: autodiff of the
loop would stack one copy of the expert weights per iteration (the grouped-matmul OOM that
MaxText users report); here the backward loop accumulates dW straight into [E, d, f] buffers.
Whether it recomputes the hidden activations or saves them ([rows, f], the same memory a
dense layer's backward keeps) is `save_hidden`.

Einsum letters: b block, r row within a block (B), e expert, d d_model, f expert_size.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from moescale.layers import dispatch, dispatch_ops

Array = jax.Array


def choose_block_size(num_assignments: int, num_experts: int) -> int:
  """B from the mean group size: big blocks amortise the loop, small ones waste less padding.

  Each expert wastes half a block on average, so B near half the mean group keeps the waste
  near 25% at worst, bounded to [16, 256] where XLA:CPU's per-iteration cost and matmul
  efficiency were measured to balance (see `moescale.bench`).
  """
  mean = max(1, num_assignments // max(1, num_experts))
  b = 16
  while b * 2 <= min(256, mean // 2):
    b *= 2
  return b


def _expert(a: Array | None, e: Array):
  return None if a is None else lax.dynamic_index_in_dim(a, e, keepdims=False)


def _add_to_expert(buf: Array | None, e: Array, value: Array | None):
  if buf is None:
    return None
  cur = lax.dynamic_index_in_dim(buf, e, keepdims=False)
  return lax.dynamic_update_index_in_dim(buf, cur + value.astype(buf.dtype), e, 0)


def _block(a: Array, b: Array) -> Array:
  return lax.dynamic_index_in_dim(a, b, keepdims=False)


def _pre_activation(xb, experts, e):
  h = xb @ _expert(experts.w_in, e)
  if experts.b_in is not None:
    h = h + _expert(experts.b_in, e)
  return h


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def blocked_ffn(rows: Array, experts: dispatch.ExpertWeights, block_expert: Array,
                num_blocks: Array, activation: Callable[[Array], Array],
                save_hidden: bool) -> Array:
  """rows [nb*B, d] -> out [nb*B, d]; block b uses expert block_expert[b]; blocks past
  num_blocks are left zero."""
  return _forward(rows, experts, block_expert, num_blocks, activation, False)[0]


def _forward(rows, experts, block_expert, num_blocks, activation, save_hidden):
  max_blocks = block_expert.shape[0]
  d, f = experts.w_in.shape[1:]
  xs = rows.reshape(max_blocks, -1, d)
  out = jnp.zeros(xs.shape, rows.dtype)
  hidden = jnp.zeros(xs.shape[:2] + (f,), rows.dtype) if save_hidden else None

  def body(b, carry):
    out, hidden = carry
    e = block_expert[b]
    pre = _pre_activation(_block(xs, b), experts, e)
    o = activation(pre) @ _expert(experts.w_out, e)
    if experts.b_out is not None:
      o = o + _expert(experts.b_out, e)
    out = lax.dynamic_update_index_in_dim(out, o.astype(out.dtype), b, 0)
    if hidden is not None:
      hidden = lax.dynamic_update_index_in_dim(hidden, pre.astype(hidden.dtype), b, 0)
    return out, hidden

  out, hidden = lax.fori_loop(0, num_blocks, body, (out, hidden))
  return out.reshape(rows.shape), hidden


def _blocked_fwd(rows, experts, block_expert, num_blocks, activation, save_hidden):
  out, hidden = _forward(rows, experts, block_expert, num_blocks, activation, save_hidden)
  return out, (rows, experts, block_expert, num_blocks, hidden)


def _blocked_bwd(activation, save_hidden, res, dout):
  rows, experts, block_expert, num_blocks, hidden = res
  del save_hidden  # `hidden` is None unless the forward saved it.
  max_blocks = block_expert.shape[0]
  d = rows.shape[1]
  xs = rows.reshape(max_blocks, -1, d)
  dos = dout.reshape(xs.shape)
  f32 = lambda a: None if a is None else jnp.zeros(a.shape, jnp.float32)
  grads0 = dispatch.ExpertWeights(*(f32(a) for a in experts))

  def body(b, carry):
    drows, g = carry
    e = block_expert[b]
    xb, do = _block(xs, b), _block(dos, b)
    pre = _pre_activation(xb, experts, e) if hidden is None else _block(hidden, b)
    h, act_vjp = jax.vjp(activation, pre)
    w_in, w_out = _expert(experts.w_in, e), _expert(experts.w_out, e)
    dpre, = act_vjp(do @ w_out.T)
    drows = lax.dynamic_update_index_in_dim(drows, (dpre @ w_in.T).astype(drows.dtype), b, 0)
    g = dispatch.ExpertWeights(
        _add_to_expert(g.w_in, e, xb.T @ dpre),
        _add_to_expert(g.w_out, e, h.T @ do),
        _add_to_expert(g.b_in, e, None if g.b_in is None else dpre.sum(0)),
        _add_to_expert(g.b_out, e, None if g.b_out is None else do.sum(0)))
    return drows, g

  drows, grads = lax.fori_loop(0, num_blocks, body, (jnp.zeros_like(xs), grads0))
  grads = dispatch.ExpertWeights(
      *(None if g is None else g.astype(a.dtype) for g, a in zip(grads, experts)))
  return drows.reshape(rows.shape), grads, None, None


blocked_ffn.defvjp(_blocked_fwd, _blocked_bwd)


class Blocked:
  """Sort, pad groups to blocks of `block_size` rows (None: `choose_block_size`), loop.

  save_hidden: keep the [rows, expert_size] pre-activations for the backward instead of
  recomputing them per block (one matmul of three saved, the memory a dense layer keeps).
  """
  name = 'blocked'

  def __init__(self, block_size: int | None = None, save_hidden: bool = True):
    if block_size is not None and block_size < 1:
      raise ValueError(f'block_size={block_size!r} must be >= 1 or None')
    self.block_size = block_size
    self.save_hidden = save_hidden

  def __call__(self, x, expert_index, weights, experts, activation, capacity=None):
    del capacity  # Dropless: the loop bound comes from the actual group sizes.
    dispatch.check_assignment_shapes(x, expert_index, weights, experts)
    t, k = expert_index.shape
    num_experts = experts.num_experts
    block = self.block_size or choose_block_size(t * k, num_experts)
    s = dispatch_ops.sort_and_rank(expert_index, num_experts)
    layout, block_expert, num_blocks = dispatch_ops.blocked_layout(s, (t, k), block)
    rows = dispatch_ops.permute(x, layout)
    out = blocked_ffn(rows, experts, block_expert, num_blocks, activation, self.save_hidden)
    return dispatch_ops.combine(out, weights, layout).astype(x.dtype)
