"""Product-key memory against its FLOP-matched and parameter-matched dense FFN.

Times forward + backward (`jax.jit` of `value_and_grad` wrt the parameters and x,
deterministic=True) of the project's `ProductKeyMemory` at d_model 256, 4 heads, num_keys 128
(128**2 = 16384 value rows), knn 32, sparse mode, in Csordás et al.'s configuration: no query
projection and no BatchNorm (every head queries with the input itself, k_dim = d_model), ReLU
scores. Its forward FLOPs per token, from the module's own `cost()`, are sub-key scoring
(2 * heads * num_keys * d_model) plus value reads (2 * heads * knn * d_model): 327,680, which a
dense FFN matches with d_ff = 327680 / (4 * d_model) = 320. Against:

  dense          DenseFFN(d_model, d_ff=320): equal FLOPs (the baseline of the PKM's ratio).
  sparse         the PKM with its default kernels ('auto': moescale's C++ kernels on XLA:CPU,
                 XLA's ops elsewhere; the row's note names them).
  sparse@xla     the same PKM with kernels='xla' (only where 'auto' chose others): what the
                 kernels save.
  param_matched  DenseFFN(d_model, d_ff=num_keys**2): the dense layer with as many value rows
                 (about 2x PKM's parameters, 51x its FLOPs).

Rows: 'dense', 'sparse' (and 'sparse@xla') with `ratio` to 'dense' from one
`timing.interleaved` run; 'param_matched' with `ratio` to 'sparse' (its baseline) from a
second, settled run of those two. The PKM row carries `speedup` = median over rounds of
(param_matched time / PKM time in that round). No gin, seqio or TensorFlow is imported.
"""

from __future__ import annotations

import statistics

import jax
from flax import nnx

from moescale.bench import timing
from moescale import kernel_registry
from moescale.layers import dense, pkm, pkm_ops

D_MODEL, NUM_HEADS, NUM_KEYS, KNN = 256, 4, 128, 32
FULL = {'tokens': (4096, 16384)}
QUICK = {'tokens': (256,)}


def make_pkm(**overrides) -> pkm.ProductKeyMemory:
  kw = dict(num_heads=NUM_HEADS, num_keys=NUM_KEYS, knn=KNN, query_proj=False,
            score_fn='relu', mode='sparse')
  kw.update(overrides)
  return pkm.ProductKeyMemory(D_MODEL, rngs=nnx.Rngs(0), **kw)


def flop_matched_d_ff(layer: pkm.ProductKeyMemory) -> int:
  """d_ff of the dense FFN (two d x d_ff matmuls) with the PKM's forward FLOPs per token."""
  return max(1, round(layer.cost().total_flops / (4 * layer.d_model)))


def bench_pkm(tokens: int, repeats: int, log=None) -> list[dict]:
  layer = make_pkm()
  d_ff = flop_matched_d_ff(layer)
  kernels = kernel_registry.on_host('pkm', layer.kernels, pkm_ops.XLA).name
  layers = {'dense': dense.DenseFFN(D_MODEL, d_ff, rngs=nnx.Rngs(1)),
            'sparse': layer,
            'param_matched': dense.DenseFFN(D_MODEL, NUM_KEYS ** 2, rngs=nnx.Rngs(2))}
  small_rows = ['dense', 'sparse']
  if kernels != 'xla':
    layers['sparse@xla'] = make_pkm(kernels='xla')
    small_rows.append('sparse@xla')
  x = jax.random.normal(jax.random.key(3), (1, tokens, D_MODEL))
  dy = jax.random.normal(jax.random.key(4), (1, tokens, D_MODEL))
  fns = {}
  for backend, module in layers.items():
    fns[backend] = (lambda step=timing.module_step(module): step(x, dy))
  if log:
    log(f'  PKM tokens={tokens}: FLOP-matched d_ff={d_ff}, param-matched d_ff={NUM_KEYS ** 2}')
  # Two interleavings, not one: run right after the parameter-matched layer (gigabytes of
  # activations), the small dense layer measured up to 2x slower, which flatters the ratio.
  # The second one settles each call (see timing.interleaved): the PKM's first call after the
  # big layer measured 1.4x its steady time.
  small = timing.interleaved({k: fns[k] for k in small_rows}, repeats)
  big = timing.interleaved({k: fns[k] for k in ('sparse', 'param_matched')}, repeats,
                           settle=True)
  records = timing.ratio_records('pkm', None, tokens, small, 'dense')
  records += timing.ratio_records('pkm', None, tokens, {'param_matched': big['param_matched'],
                                                         'sparse': big['sparse']}, 'sparse')[:1]
  speedup = statistics.median(p / s for p, s in zip(big['param_matched'], big['sparse']))
  for r in records:
    if r['backend'] == 'sparse':
      r['speedup'] = speedup
      r['note'] = f'kernels={kernels}'
  return records


def run(opts, log) -> list[dict]:
  """The section for `moescale bench`: one cell per token count."""
  tokens_list = opts.tokens or (QUICK if opts.quick else FULL)['tokens']
  if log:
    log(f'PKM: d_model={D_MODEL} heads={NUM_HEADS} num_keys={NUM_KEYS} knn={KNN}, sparse, '
        'no query projection, relu; ratios to the FLOP-matched dense FFN, speedup over the '
        'parameter-matched one')
  records = []
  for tokens in tokens_list:
    rows = bench_pkm(tokens, opts.repeats, log)
    records += rows
    if log:
      log(timing.format_table(rows).split('\n', 1)[1])
  return records
