"""σ-MoE against its FLOP-matched and its parameter-matched dense FFN.

Times forward + backward (`jax.jit` of `value_and_grad` wrt x and every parameter,
deterministic=True) of the real `SigmaMoE` module, router and top-k included since they are
part of what the layer costs, at Csordás et al.'s shape (d_model 512, expert_size G = 128,
top_k K = 4), against two `DenseFFN` modules on the same tokens:

  'dense'        d_ff = K·G: the same expert matmul FLOPs per token (the baseline of `ratio`).
  'param_dense'  d_ff = N_E·G: the same expert parameters, the layer σ-MoE approximates. Its
                 time over σ-MoE's is the speedup a user actually gains (ideally N_E / K),
                 reported in the extra key 'speedup' of each σ-MoE row.

Each cell is one `timing.interleaved` call (all rows timed round after round, so the ratios
see the same machine load; each round: dense, the σ-MoE backends, then the parameter-matched
layer, whose GiB-sized buffers are skipped above MAX_PARAM_DENSE_FLOPS; with it, every call
is settled: see `timing.interleaved`). The input is random normal, so routing is whatever the
freshly initialised router picks (Csordás init, columns of equal norm: close to uniform).

Rows: name 'sigma_moe', backend 'dense' | 'param_dense' | <dispatch backend spec>, e.g.
'fused' (the XLA:CPU choice), 'fused:kernels=xla' or 'fused:block_size=1024:granule=64' (see
`moe.parse_backend`). Extra key 'speedup' on the σ-MoE rows; 'note' on a skipped row.
"""

from __future__ import annotations

import statistics

import jax
from flax import nnx

from moescale.bench import moe as moe_bench
from moescale.bench import timing
from moescale.layers import dense, dispatch, sigma_moe

D_MODEL, EXPERT_SIZE, TOP_K = 512, 128, 4
FULL = {'experts': (8, 16, 32, 64, 128), 'tokens': (4096, 16384)}
QUICK = {'experts': (16,), 'tokens': (1024,)}
# The XLA:CPU choice first (its C++ kernel there), then its XLA loop.
BACKENDS = ('fused', 'fused:kernels=xla')
QUICK_BACKENDS = ('fused',)
# Skip the parameter-matched dense layer above this many fwd+bwd matmul FLOPs per call
# (2 TFLOP, i.e. up to 128 experts at 16k tokens: ~15-25 s per call on the 2-core dev VM).
MAX_PARAM_DENSE_FLOPS = 2e12


def param_dense_flops(num_experts: int, tokens: int) -> float:
  """fwd + bwd matmul FLOPs of the parameter-matched dense FFN: 3 x 2 matmuls of t x d x N_E·G."""
  return 3 * 2 * 2 * tokens * D_MODEL * num_experts * EXPERT_SIZE


def bench_sigma(num_experts: int, tokens: int, backends, repeats: int, log=None) -> list[dict]:
  """One cell: σ-MoE per backend, 'dense' (d_ff = K·G) and 'param_dense' (d_ff = N_E·G)."""
  x = jax.random.normal(jax.random.key(0), (1, tokens, D_MODEL))
  dy = jax.random.normal(jax.random.key(1), (1, tokens, D_MODEL))
  flop_dense = timing.module_step(
      dense.DenseFFN(D_MODEL, TOP_K * EXPERT_SIZE, rngs=nnx.Rngs(0)))
  fns = {'dense': lambda: flop_dense(x, dy)}
  for spec in backends:
    name, options = moe_bench.parse_backend(spec)
    layer = sigma_moe.SigmaMoE(D_MODEL, num_experts, EXPERT_SIZE, TOP_K,
                               dispatch=dispatch.get_backend(name, **options),
                               rngs=nnx.Rngs(0))
    fns[spec] = (lambda step=timing.module_step(layer): step(x, dy))
  skipped = []
  flops = param_dense_flops(num_experts, tokens)
  if flops <= MAX_PARAM_DENSE_FLOPS:
    # Timed last in each round, and every call settled (timing.interleaved): its GiB-sized
    # buffers right before a call measurably slow that call on the dev VM, and the next round
    # starts with the dense baseline, whose slowing would flatter every ratio.
    param_dense = timing.module_step(
        dense.DenseFFN(D_MODEL, num_experts * EXPERT_SIZE, rngs=nnx.Rngs(0)))
    fns['param_dense'] = lambda: param_dense(x, dy)
  else:
    reason = f'parameter-matched d_ff={num_experts * EXPERT_SIZE}: {flops:.2g} FLOPs per call'
    skipped.append(timing.skipped('sigma_moe', 'param_dense', num_experts, tokens, 'dense',
                                  reason))
    if log:
      log(f'  skipped param_dense at E={num_experts}, t={tokens}: {reason}')
  times = timing.interleaved(fns, repeats, settle='param_dense' in fns)
  rows = timing.ratio_records('sigma_moe', num_experts, tokens, times, 'dense') + skipped
  for row in rows:
    if row['backend'] not in ('dense', 'param_dense') and 'param_dense' in times:
      row['speedup'] = statistics.median(
          p / s for p, s in zip(times['param_dense'], times[row['backend']]))
  # Rows in reading order: the two dense baselines, then the σ-MoE backends.
  return sorted(rows, key=lambda r: {'dense': 0, 'param_dense': 1}.get(r['backend'], 2))


def run(opts, log) -> list[dict]:
  """The section for `moescale bench`: every (tokens, experts) cell."""
  grid = QUICK if opts.quick else FULL
  experts = opts.experts or grid['experts']
  tokens_list = opts.tokens or grid['tokens']
  backends = opts.backends or (QUICK_BACKENDS if opts.quick else BACKENDS)
  if log:
    log(f'σ-MoE: d_model={D_MODEL} expert_size={EXPERT_SIZE} top_k={TOP_K}, ratios to a dense '
        f'FFN with d_ff={TOP_K * EXPERT_SIZE}; speedup = param-matched dense (d_ff=N_E·G) time '
        f'/ σ-MoE time (ideal N_E/K)')
  records = []
  for tokens in tokens_list:
    for num_experts in experts:
      rows = bench_sigma(num_experts, tokens, backends, opts.repeats, log)
      records += rows
      if log:
        log(timing.format_table(rows).split('\n', 1)[1])
  return records
