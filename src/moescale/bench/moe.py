"""Top-2 MoE dispatch backends against a FLOP-matched dense FFN; DenseFFN against plain JAX.

Times forward + backward (`jax.jit` of `value_and_grad` wrt x and the expert parameters) of a
top-2 MoE at d_model 256, expert_size 512, against a dense FFN with d_ff = top_k *
expert_size (the same matmul FLOPs per token), in one process. Routing is uniform random
(distinct experts per token, fixed seed), so the numbers measure dispatch, not router quality.
Capacity backends get capacity = ceil(1.0 * tokens * top_k / E), the GShard 'capacity 1.0'
setting the targets name: uniform routing then drops a few percent of the assignments.

A spec ending in '@capacity' (the row 'fused@capacity') is what `TopKMoE(capacity_factor=1.0)`
runs on this platform: inside the timed step, the router's own `topk_moe.assign_slots` drops
the assignments ranked beyond that capacity (first choices before second, token order), then
the backend computes the kept ones. 'slots' reaches the same semantics through a fixed
[E, capacity, d] buffer instead.

Timing is `timing.interleaved`: each round times the dense layer and every backend once, back
to back; `ratio` is the median over rounds of (backend time / dense time in that round).

Also times the project's DenseFFN module against a plain two-matmul function (ratio ~1 means
the module adds nothing). Backends whose estimated cost is prohibitive on this platform
(ragged_dot lowered densely on XLA:CPU, one-hot masks of gigabytes) print 'skipped'.
No gin, seqio or TensorFlow is imported.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from moescale.bench import timing
from moescale.layers import dense, dispatch, topk_moe

D_MODEL, EXPERT_SIZE, TOP_K, CAPACITY_FACTOR = 256, 512, 2, 1.0
FULL = {'experts': (8, 64, 256, 512), 'tokens': (4096, 16384)}
QUICK = {'experts': (8,), 'tokens': (1024,)}
# The XLA:CPU choice first ('fused', dropless and at capacity 1.0; its C++ kernel there), its
# XLA loop, then the slot-buffer capacity paths and ragged_dot.
BACKENDS = ('fused', 'fused@capacity', 'fused:kernels=xla', 'slots', 'ragged', 'onehot')
CAPACITY_SUFFIX = '@capacity'   # the router drops over capacity first (see the docstring)
SLOT_BACKENDS = ('slots', 'onehot')   # need a capacity: their buffers are [E, capacity, ...]
MAX_COST_RATIO = 12.0       # skip a backend estimated at more than this x the dense layer
MAX_BUFFER_BYTES = 1 << 30  # or one whose dispatch buffers exceed 1 GiB


def random_routing(key, tokens: int, num_experts: int, top_k: int):
  """Uniform random distinct experts per token [t, k] int32, and weights [t, k] summing to 1."""
  k_idx, k_w = jax.random.split(key)
  _, index = jax.lax.top_k(jax.random.uniform(k_idx, (tokens, num_experts)), top_k)
  weights = jax.random.uniform(k_w, (tokens, top_k), minval=0.1)
  return index.astype(jnp.int32), weights / weights.sum(-1, keepdims=True)


def capacity_for(tokens: int, num_experts: int, top_k: int = TOP_K) -> int:
  return max(4, math.ceil(CAPACITY_FACTOR * tokens * top_k / num_experts))


def skip_reason(backend: str, num_experts: int, tokens: int, platform: str) -> str | None:
  """Why a backend would be prohibitively slow or large here, or None to run it."""
  dense_flops = 2 * tokens * D_MODEL * TOP_K * EXPERT_SIZE
  if backend == 'ragged' and platform == 'cpu':
    cost = num_experts / TOP_K  # XLA:CPU lowers ragged_dot to a dense matmul per group.
    if cost > MAX_COST_RATIO:
      return f'ragged_dot is dense on XLA:CPU: ~{cost:.0f}x the dense FLOPs'
  if backend == 'onehot':
    mask = tokens * num_experts * capacity_for(tokens, num_experts)
    cost = 1 + 2 * mask * D_MODEL / dense_flops
    if cost > MAX_COST_RATIO or 4 * mask > MAX_BUFFER_BYTES:
      return f'one-hot masks: ~{cost:.0f}x the dense FLOPs, {4 * mask / 2**30:.1f} GiB each'
  return None


def _dense_step():
  def loss(x, w_in, w_out, dy):
    return jnp.vdot(jax.nn.relu(x @ w_in) @ w_out, dy)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def _moe_step(backend: dispatch.DispatchBackend, capacity: int | None, route_capacity: bool):
  def loss(x, experts, index, weights, dy):
    if route_capacity:  # the router's dropping, as TopKMoE does it before any backend
      _, kept = topk_moe.assign_slots(index, jnp.ones(index.shape, bool),
                                      experts.num_experts, capacity)
      index = jnp.where(kept, index, experts.num_experts)
      weights = topk_moe.combine_weights(weights, kept, renormalize=False)
    y = backend(x, index, weights, experts, jax.nn.relu, capacity=capacity)
    return jnp.vdot(y, dy)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def bench_moe(num_experts: int, tokens: int, backends: Sequence[str], repeats: int,
              platform: str, log=None) -> list[dict]:
  keys = jax.random.split(jax.random.key(0), 6)
  d, f = D_MODEL, EXPERT_SIZE
  x = jax.random.normal(keys[0], (tokens, d))
  dy = jax.random.normal(keys[1], (tokens, d))
  w_in = jax.random.normal(keys[2], (d, TOP_K * f)) / d**0.5
  w_out = jax.random.normal(keys[3], (TOP_K * f, d)) / (TOP_K * f)**0.5
  experts = dispatch.ExpertWeights(
      jax.random.normal(keys[4], (num_experts, d, f)) / d**0.5,
      jax.random.normal(keys[5], (num_experts, f, d)) / f**0.5)
  index, weights = random_routing(jax.random.key(1), tokens, num_experts, TOP_K)
  dense_fn = _dense_step()
  fns = {'dense': lambda: dense_fn(x, w_in, w_out, dy)}
  skipped = []
  for spec in backends:
    name, options = parse_backend(spec)
    reason = skip_reason(name, num_experts, tokens, platform)
    if reason:
      skipped.append(timing.skipped('moe_top2', spec, num_experts, tokens, 'dense', reason))
      if log:
        log(f'  skipped {spec} at E={num_experts}, t={tokens}: {reason}')
      continue
    route_capacity = name.endswith(CAPACITY_SUFFIX)
    name = name.removesuffix(CAPACITY_SUFFIX)
    with_capacity = route_capacity or name in SLOT_BACKENDS
    capacity = capacity_for(tokens, num_experts) if with_capacity else None
    step = _moe_step(dispatch.get_backend(name, **options), capacity, route_capacity)
    fns[spec] = (lambda step=step: step(x, experts, index, weights, dy))
  times = timing.interleaved(fns, repeats)
  return timing.ratio_records('moe_top2', num_experts, tokens, times, 'dense') + skipped


def bench_dense_module(tokens: int, repeats: int) -> list[dict]:
  """The project's DenseFFN against the same two matmuls written as a plain function."""
  d_ff = TOP_K * EXPERT_SIZE
  layer = dense.DenseFFN(D_MODEL, d_ff, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(2), (1, tokens, D_MODEL))
  dy = jax.random.normal(jax.random.key(3), (1, tokens, D_MODEL))
  module_fn = timing.module_step(layer)
  plain_fn = _dense_step()
  w_in, w_out = layer.w_in[...], layer.w_out[...]
  # Twice the rounds: two thunks of 0.5 s are cheap, and this ratio's target (1.1x) is closer
  # to the machine's noise than any other (one full bench gave 1.13x, four reruns of the cell
  # 0.92-1.05x, with 5 rounds each).
  times = timing.interleaved({'plain': lambda: plain_fn(x[0], w_in, w_out, dy[0]),
                              'DenseFFN': lambda: module_fn(x, dy)}, 2 * repeats)
  return timing.ratio_records('dense_ffn', None, tokens, times, 'plain')


# 'fused:block_size=64:granule=16' -> ('fused', {'block_size': 64, 'granule': 16}): the same
# specs `dispatch.get_backend` and gin bindings take.
parse_backend = dispatch.parse_spec


def run(opts, log) -> list[dict]:
  """The section for `moescale bench`: every (tokens, experts) cell, then DenseFFN vs plain."""
  experts = opts.experts or (QUICK if opts.quick else FULL)['experts']
  tokens_list = opts.tokens or (QUICK if opts.quick else FULL)['tokens']
  backends = opts.backends or BACKENDS
  platform = jax.default_backend()
  if log:
    log(f'top-2 MoE: d_model={D_MODEL} expert_size={EXPERT_SIZE} top_k={TOP_K}, ratios to a '
        f'dense FFN with d_ff={TOP_K * EXPERT_SIZE}')
  records = []
  for tokens in tokens_list:
    for num_experts in experts:
      rows = bench_moe(num_experts, tokens, backends, opts.repeats, platform, log)
      records += rows
      if log:
        log(timing.format_table(rows).split('\n', 1)[1])
  records += bench_dense_module(max(tokens_list), opts.repeats)
  return records
