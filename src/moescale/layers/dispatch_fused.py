"""The 'fused' backend: a loop over expert-homogeneous row blocks that gathers and combines
its tokens itself (the CPU default).

Assignments are sorted by expert; each expert's group is padded to a multiple of a small
`granule` and cut into blocks of at most `block_size` rows (`dispatch_ops.blocked_layout`), so
every block belongs to one expert and the padding stays below one granule per expert. No
permuted row buffer ever exists: each block gathers its tokens' rows of x and scatter-adds its
weighted output straight into y:

    xb = x[token[blk]]                                    [rows, d]   (gather, in the loop)
    y[token[blk]] += w[blk] * (act(xb @ w_in[e] + b_in[e]) @ w_out[e] + b_out[e])

Why: on XLA:CPU every fresh large buffer costs its page faults on every call, and the permute /
combine form allocates several [t*k, d] buffers (rows, expert outputs, their cotangents): at
top_k 4 each is 4x the size of x. Here the only large buffers are y, the saved
pre-activations [t*k, f] and, in the backward, dx: what a dense layer of d_ff = k*f allocates.

Blocks of one size run in one loop (a loop per size class, granule to block_size): each body
has static shapes, so unlike a `lax.switch` over sizes nothing is padded to a common shape and
no row of a neighbouring block is touched. Blocks run one after another and the scatter-adds
claim no unique indices, so even a token routed twice to one expert is summed correctly.

Backward, per block (dh = dy[token] @ w_out[e].T, the unweighted hidden cotangent):
    dweight[row] = <h, dh> (+ <dy[token], b_out[e]>)     (so the outputs need not be kept)
    dpre = act'(pre) * w * dh;  dx[token] += dpre @ w_in[e].T
    dw_in[e] += (dpre.T @ xb).T   dw_out[e] += (w * h).T @ dy[token]
`dpre.T @ xb` ([f, r] x [r, d]), transposed per block, runs faster on XLA:CPU than `xb.T @ dpre`
at small f. The VJP is written by hand: autodiff of the loop would stack one copy of the expert
weights per iteration (the grouped-matmul OOM MaxText users report); here the gradients
accumulate straight into [E, ...] buffers.

What runs the loop is a kernel strategy (`kernel_registry`, op 'moe_ffn'): `XlaLoop` here (any
dtype, activation and platform), or a provider's (moescale.cpu runs it as one C++ kernel).

Einsum letters: r rows of a block, e expert, d d_model, f expert_size.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from moescale import kernel_registry
from moescale.layers import dispatch_ops, dispatch_types

Array = jax.Array


class Schedule(NamedTuple):
  """Rows and blocks of a blocked layout, blocks grouped by size (all int32, a pytree).

  token: [R] token of each row (num_tokens for padding: gathers read 0, scatters drop).
  pair: [R] flat pair token*k + j of each row (t*k for padding).  row_of: [t, k] (R if dropped).
  expert, offset: [max_blocks] of the blocks sorted by size class; class_start: [classes + 1],
  the blocks of size (c + 1) * granule are class_start[c] .. class_start[c + 1] - 1.
  """
  token: Array
  pair: Array
  row_of: Array
  expert: Array
  offset: Array
  class_start: Array


def schedule(layout: dispatch_ops.RowLayout, plan: dispatch_ops.BlockPlan, k: int,
             num_classes: int) -> Schedule:
  """The `Schedule` of a blocked layout whose blocks have (size_class + 1) * granule rows."""
  max_blocks = plan.expert.shape[0]
  size_class = jnp.where(jnp.arange(max_blocks) < plan.count, plan.size_class, num_classes)
  order = jnp.argsort(size_class, stable=True)
  starts = jnp.searchsorted(size_class[order], jnp.arange(num_classes + 1), side='left')
  return Schedule(layout.pair_of_row // k, layout.pair_of_row, layout.row_of,
                  plan.expert[order], plan.offset[order], starts.astype(jnp.int32))


def _class_loops(sched: Schedule, granule: int, block_size: int, body, init):
  """For each size class c, for each of its blocks i: carry = body(size_c)(i, carry).

  One loop per size, each with static shapes: no `lax.switch`, so results need no padding to a
  common shape (a copy per block) and no masking of rows that belong to the next block.
  """
  carry = init
  for c in range(block_size // granule):
    carry = lax.fori_loop(sched.class_start[c], sched.class_start[c + 1],
                          body((c + 1) * granule), carry)
  return carry


def _expert(a: Array | None, e: Array):
  return None if a is None else lax.dynamic_index_in_dim(a, e, keepdims=False)


def _add_to_expert(buf: Array | None, e: Array, value: Array | None):
  if buf is None:
    return None
  cur = lax.dynamic_index_in_dim(buf, e, keepdims=False)
  return lax.dynamic_update_index_in_dim(buf, cur + value.astype(buf.dtype), e, 0)


def _gather(a: Array, token: Array) -> Array:
  # Out-of-range indices read zeros. With nothing to read (t = 0 tokens) every index is out of
  # range, and a gather from an empty axis does not compile: build the zeros here.
  if a.shape[0] == 0:
    return jnp.zeros(token.shape + a.shape[1:], a.dtype)
  return a.at[token].get(mode='fill', fill_value=0)


def _nt(a: Array, b: Array) -> Array:
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())))    # a @ b.T


def _tn(a: Array, b: Array) -> Array:
  return lax.dot_general(a, b, (((0,), (0,)), ((), ())))    # a.T @ b


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def fused_ffn(x: Array, weights: Array, experts: dispatch_types.ExpertWeights, sched: Schedule,
              dropout: dispatch_types.ExpertDropout | None,
              activation: Callable[[Array], Array], granule: int, block_size: int) -> Array:
  """x [t, d], weights [t, k] -> y [t, d] float32: every block's FFN output, weighted,
  scatter-added to its tokens. With `dropout`, each row's hidden is masked by its assignment's
  mask, recomputed in the backward from (key, id) rather than kept."""
  return _forward(x, weights, experts, sched, dropout, activation, granule, block_size)[0]


def _mask(dropout, sched: Schedule, off, size: int, width: int, dtype):
  """The dropout scale [size, width] of rows off .. off + size (None without dropout)."""
  if dropout is None:
    return None
  return dropout.scale(lax.dynamic_slice_in_dim(sched.pair, off, size), width, dtype)


def _forward(x, weights, experts, sched, dropout, activation, granule, block_size):
  w_rows = _gather(weights.reshape(-1), sched.pair)                              # [R]
  y = jnp.zeros(x.shape, jnp.float32)
  hidden = jnp.zeros((sched.token.shape[0], experts.w_in.shape[2]), x.dtype)

  def body(size):
    def run(i, carry):
      y, hidden = carry
      e, off = sched.expert[i], sched.offset[i]
      token = lax.dynamic_slice_in_dim(sched.token, off, size)
      w = lax.dynamic_slice_in_dim(w_rows, off, size).astype(jnp.float32)
      pre = _gather(x, token) @ _expert(experts.w_in, e)
      if experts.b_in is not None:
        pre = pre + _expert(experts.b_in, e)
      # Weighted before the out-projection: a [rows, f] product instead of [rows, d].
      h = activation(pre)
      m = _mask(dropout, sched, off, size, h.shape[1], h.dtype)
      h = h if m is None else h * m
      o = (h * w[:, None].astype(pre.dtype)) @ _expert(experts.w_out, e)
      if experts.b_out is not None:
        o = o + w[:, None].astype(o.dtype) * _expert(experts.b_out, e)
      y = y.at[token].add(o.astype(jnp.float32), mode='drop')
      return y, lax.dynamic_update_slice_in_dim(hidden, pre.astype(hidden.dtype), off, 0)
    return run

  y, hidden = _class_loops(sched, granule, block_size, body, (y, hidden))
  return y, hidden, w_rows


def _fused_fwd(x, weights, experts, sched, dropout, activation, granule, block_size):
  y, hidden, w_rows = _forward(x, weights, experts, sched, dropout, activation, granule,
                               block_size)
  return y, (x, weights, w_rows, experts, sched, dropout, hidden)


def _fused_bwd(activation, granule, block_size, res, dy):
  x, weights, w_rows, experts, sched, dropout, hidden = res
  zeros32 = lambda a: None if a is None else jnp.zeros(a.shape, jnp.float32)
  grads0 = tuple(zeros32(a) for a in experts)
  init = (jnp.zeros(x.shape, jnp.float32), jnp.zeros(w_rows.shape, jnp.float32), grads0)
  dy = dy.astype(x.dtype)

  def body(size):
    def run(i, carry):
      dx, dw_rows, g = carry
      e, off = sched.expert[i], sched.offset[i]
      token = lax.dynamic_slice_in_dim(sched.token, off, size)
      w = lax.dynamic_slice_in_dim(w_rows, off, size)[:, None].astype(x.dtype)
      xb, dyb = _gather(x, token), _gather(dy, token)
      h, act_vjp = jax.vjp(activation, lax.dynamic_slice_in_dim(hidden, off, size))
      m = _mask(dropout, sched, off, size, h.shape[1], h.dtype)
      h = h if m is None else h * m                           # the hidden w_out saw
      dh = _nt(dyb, _expert(experts.w_out, e))               # unweighted: dy @ w_out.T
      dw = jnp.sum((h * dh).astype(jnp.float32), axis=-1)     # <output row, dy> = <h, dh>
      if experts.b_out is not None:
        dw = dw + dyb.astype(jnp.float32) @ _expert(experts.b_out, e).astype(jnp.float32)
      dpre, = act_vjp(dh * w if m is None else dh * w * m)
      dx = dx.at[token].add(_nt(dpre, _expert(experts.w_in, e)).astype(dx.dtype), mode='drop')
      g = (_add_to_expert(g[0], e, _tn(dpre, xb).T), _add_to_expert(g[1], e, _tn(h * w, dyb)),
           _add_to_expert(g[2], e, None if g[2] is None else dpre.sum(0)),
           _add_to_expert(g[3], e, None if g[3] is None else (dyb * w).sum(0)))
      return dx, lax.dynamic_update_slice_in_dim(dw_rows, dw, off, 0), g
    return run

  dx, dw_rows, g = _class_loops(sched, granule, block_size, body, init)
  dweights = dw_rows.at[sched.row_of].get(mode='fill', fill_value=0)          # [t, k]
  grads = dispatch_types.ExpertWeights(
      *(None if gi is None else gi.astype(a.dtype) for gi, a in zip(g, experts)))
  return dx.astype(x.dtype), dweights.astype(weights.dtype), grads, None, None


fused_ffn.defvjp(_fused_fwd, _fused_bwd)


SMALL_PROBLEM = 16384  # assignments (tokens * top_k)


def choose_block_size(num_assignments: int, num_experts: int) -> tuple[int, int]:
  """(block_size, granule): blocks of about twice the mean group (at most 1024 rows), 16 sizes.

  Big blocks matter on XLA:CPU (fewer weight slices and accumulator updates per row), the
  granule less; each of the block_size / granule size classes compiles a loop body, so their
  number (16, or 4 for small problems) bounds compile time. Chosen with `moescale bench`.
  """
  mean = max(1, num_assignments // max(1, num_experts))
  block = 16
  while block < min(1024, 2 * mean):
    block *= 2
  # Small problems run in milliseconds and compile in seconds: 4 sizes, not 16, there.
  classes = 16 if num_assignments >= SMALL_PROBLEM else 4
  return block, max(16, block // classes)


class XlaLoop:
  """The loop of this module: any dtype, any activation, any platform."""
  name = 'xla'

  def __call__(self, x, weights, experts, s, activation, sizes, dropout=None):
    t, k = weights.shape
    block, granule = sizes(t * k, experts.num_experts)
    layout, plan = dispatch_ops.blocked_layout(s, (t, k), block, granule)
    sched = schedule(layout, plan, k, block // granule)
    return fused_ffn(x, weights, experts, sched, dropout, activation, granule, block)


XLA = XlaLoop()


class Fused:
  """Sort by expert, loop over blocks gathering and combining in place (the module docstring).

  block_size / granule: the XLA loop's blocks (None: `choose_block_size`); block_size must be a
  multiple of granule. kernels: what runs the loop, 'auto' | 'xla' | a platform's
  (`kernel_registry`). The pre-activations are always kept for the backward ([t*k, f], as a
  dense layer's backward keeps its hidden). Dropless.
  """
  name = 'fused'

  def __init__(self, block_size: int | None = None, granule: int | None = None,
               kernels: str = 'auto'):
    for key, value in (('block_size', block_size), ('granule', granule)):
      if value is not None and value < 1:
        raise ValueError(f'{key}={value!r} must be >= 1 or None')
    if block_size and granule and block_size % granule:
      raise ValueError(f'block_size={block_size} must be a multiple of granule={granule}')
    if kernels not in kernel_registry.NAMES:
      raise ValueError(f"unknown 'fused' dispatch kernels {kernels!r}; valid: "
                       f'{list(kernel_registry.NAMES)}')
    self.block_size, self.granule, self.kernels = block_size, granule, kernels

  def sizes(self, num_assignments: int, num_experts: int) -> tuple[int, int]:
    """(block_size, granule): the constructor's where given, else `choose_block_size`'s,
    adjusted so that block_size stays a multiple of granule."""
    block, granule = choose_block_size(num_assignments, num_experts)
    if self.block_size:
      block, granule = self.block_size, self.granule or math.gcd(self.block_size, granule)
    elif self.granule:
      block, granule = -(-max(block, self.granule) // self.granule) * self.granule, self.granule
    # A block larger than all the rows (tiny or per-device problems) only adds loop bodies.
    # At least one granule: no assignments at all (t = 0) would otherwise give blocks of 0 rows.
    return min(block, max(1, -(-num_assignments // granule)) * granule), granule

  def __call__(self, x, expert_index, weights, experts, activation, capacity=None,
               dropout=None):
    del capacity  # Dropless.
    dispatch_types.check_assignment_shapes(x, expert_index, weights, experts)
    s = dispatch_ops.sort_and_rank(expert_index, experts.num_experts)
    if dropout is not None:
      # Expert dropout (fine-tuning) runs in the XLA loop: a platform's kernel computes the
      # unmasked FFN only, and a second kernel for the rare masked case is not worth its upkeep.
      if self.kernels not in ('auto', 'xla'):
        raise ValueError(f"the {self.kernels!r} moe_ffn kernels have no expert dropout; use "
                         "'fused:kernels=auto' (the XLA loop then) or 'fused:kernels=xla'")
      return XLA(x, weights, experts, s, activation, self.sizes, dropout).astype(x.dtype)
    kernels = kernel_registry.select('moe_ffn', self.kernels, XLA)   # while tracing
    y = kernels(x, weights, experts, s, activation, self.sizes)
    return y.astype(x.dtype)
