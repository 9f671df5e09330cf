"""Whole training steps of small LMs: MFU against this machine's measured peak, and memory.

For each model (the CPU-sized shapes the tiny run and the small pairs ship: d_model 128,
4 layers, 4 heads, byte vocabulary, 128-token sequences, batch 16 = 2048 tokens):

    dense      DenseFFN d_ff 512 in every layer
    topk_moe   the tiny run's model: top-2 of 8 experts (expert_size 256) every other layer
    sigma_moe  σ-MoE (8 x 64, K 2) in every layer, Csordás et al.'s small shape
    pkm        product-key memory (4 heads, 32² values, knn 32) in every layer
    dense@scan, topk_moe@scan   the same two with `scan_layers=True`, the library's default

All but the '@scan' rows run their layers as a Python loop (`scan_layers=False`), as the tiny
run does: at 4 layers compile time is no concern, and the scanned step of a shallow model is
slower on XLA:CPU (the '@scan' rows measure by how much).

one jitted `train_step` (AdamW update included, as the trainer runs it) is timed, interleaved
with the others and settled (an untimed step of the same model right before each timed one:
a trainer runs one step over and over, and the first step after another model's pays for
that model's memory; see `timing.interleaved`). On CPU the step splits its batch into
PARALLEL_MICROBATCHES unrolled microbatches, as gin/runs/tiny.gin does (see
`StepConfig.parallel_microbatches`); elsewhere 1.
Reported per model:

    mfu                model FLOPs / step time / peak FLOP/s. Model FLOPs are
                       `accounting.count(...).train_flops(tokens)` (3x the forward count,
                       attention over the full square as computed); the peak is a square fp32
                       matmul (`peak_matmul` row) timed in the same interleaved rounds, and mfu
                       is the median over rounds of (step FLOP/s / that round's matmul FLOP/s).
                       The trainer logs MFU against the same kind of measured peak.
    peak_memory_bytes  the compiled step's peak: XLA's memory analysis (arguments + outputs +
                       temporaries - donated aliases), None where the backend gives none.
    state_bytes        params + optimizer state (+ other model state): what must stay resident.
    ratio              step time / the dense model's step time in the same round.
"""

from __future__ import annotations

import functools
import math
import statistics
import time

import jax
import numpy as np

from moescale import accounting, sharding as shd
from moescale.bench import timing
from moescale.data.synthetic import SyntheticData
from moescale.layers.dense import DenseFFN
from moescale.model.transformer import TransformerLM
from moescale.train import optim, step as step_lib

SHAPE = dict(vocab_size=264, d_model=128, num_layers=4, num_heads=4, head_dim=32,
             max_length=128, scale_embeddings=True, tie_embeddings=True)
QUICK_SHAPE = dict(SHAPE, d_model=64, num_layers=2, num_heads=2, max_length=32)
BATCH, QUICK_BATCH = 16, 4
PARALLEL_MICROBATCHES = 2  # on CPU, as runs/tiny.gin


def _models(d_model: int) -> dict[str, tuple]:
  """name -> (constructor kwargs for TransformerLM beyond SHAPE, num_experts)."""
  from moescale.layers.pkm import ProductKeyMemory
  from moescale.layers.sigma_moe import SigmaMoE
  from moescale.layers.topk_moe import TopKMoE
  dense = functools.partial(DenseFFN, d_ff=4 * d_model, activation='gelu', use_bias=True)
  topk = dict(ffn=dense, sparse_layers='every_other', sparse_ffn=functools.partial(
      TopKMoE, num_experts=8, expert_size=2 * d_model, top_k=2, capacity_factor=1.0,
      activation='gelu', use_bias=True))
  loop = dict(scan_layers=False)
  return {
      'dense': (dict(ffn=dense, **loop), None),
      'topk_moe': (dict(topk, **loop), 8),
      'sigma_moe': (dict(ffn=functools.partial(SigmaMoE, num_experts=8, expert_size=d_model // 2,
                                               top_k=2), **loop), 8),
      'pkm': (dict(ffn=functools.partial(ProductKeyMemory, num_heads=4, num_keys=32, knn=32,
                                         score_fn='relu'), **loop), None),
      'dense@scan': (dict(ffn=dense, scan_layers=True), None),
      'topk_moe@scan': (dict(topk, scan_layers=True), 8),
  }


class PeakMatmul:
  """A square fp32 matmul of `size`, the MFU denominator's workload, timed warm.

  Each call runs the matmul once untimed and then once timed into `times`; the call's own
  duration, which `timing.interleaved` records, is not used. Why: right after a train step
  its pages and caches are cold, and timed cold it read 77-113 GFLOP/s on the dev VM against
  118 warm, which flattered every MFU (a peak should be the best the machine does).
  """

  def __init__(self, size: int):
    self.flops = 2 * size ** 3
    self._a = jax.random.normal(jax.random.key(0), (size, size))
    self._f = jax.jit(lambda a: a @ a)
    self.times: list[float] = []

  def __call__(self):
    jax.block_until_ready(self._f(self._a))
    start = time.perf_counter()
    out = jax.block_until_ready(self._f(self._a))
    self.times.append(time.perf_counter() - start)
    return out


def _state_bytes(state) -> int:
  return int(sum(x.nbytes for x in jax.tree.leaves(state)))


def _peak_bytes(compiled) -> int | None:
  try:
    ma = compiled.memory_analysis()
  except Exception:  # not every backend reports it; the row then says None
    return None
  if ma is None:
    return None
  return int(ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
             - ma.alias_size_in_bytes)


class _Stepper:
  """Holds one model's train state and advances it a step per call (the state is donated)."""

  def __init__(self, kwargs: dict, shape: dict, batch_size: int, mesh,
               step_cfg: step_lib.StepConfig = step_lib.StepConfig()):
    model_fn = functools.partial(TransformerLM, **shape, **kwargs)
    cfg = optim.OptimizerConfig(learning_rate=1e-3, warmup_steps=1)
    _, abs_params, _ = step_lib.abstract_model(model_fn, 0)
    tx, schedule = optim.make_optimizer(cfg, 100, abs_params)
    graphdef, self.state, state_sh = step_lib.create_train_state(model_fn, tx, 0, mesh)
    self.state_bytes = _state_bytes(self.state)
    data = SyntheticData(vocab_size=shape['vocab_size'], length=shape['max_length'])
    batch = next(data.train_iterator(batch_size))
    self.batch = shd.host_local_to_global(batch, mesh)
    self.tokens = int(np.prod(batch['decoder_input_tokens'].shape))
    self.flops = accounting.count(model_fn, shape['max_length']).train_flops(self.tokens)
    fn = step_lib.jit_train_step(step_lib.make_train_step(graphdef, tx, schedule, step_cfg),
                                 state_sh, mesh)
    # Traced as the trainer traces it: under the mesh and the activation-sharding rules.
    with shd.use_mesh(mesh):
      self.compiled = fn.lower(self.state, self.batch).compile()
    self.peak_bytes = _peak_bytes(self.compiled)

  def __call__(self):
    self.state, metrics = self.compiled(self.state, self.batch)
    return metrics['loss']


def run(opts, log) -> list[dict]:
  shape = QUICK_SHAPE if opts.quick else SHAPE
  batch = QUICK_BATCH if opts.quick else BATCH
  size = 256 if opts.quick else 2048
  mesh = shd.make_mesh(devices=jax.devices()[:1])
  steppers, experts = {}, {}
  models = _models(shape['d_model'])
  if opts.quick:  # compiling a train step dominates a quick run: two models show the format
    models = {k: models[k] for k in ('dense', 'topk_moe')}
  # --quick steps one microbatch: the unrolled ones quadruple a compile that already dominates
  # a quick run (their exactness is tested with the trainer, not here).
  parallel = PARALLEL_MICROBATCHES if jax.default_backend() == 'cpu' and not opts.quick else 1
  step_cfg = step_lib.StepConfig(parallel_microbatches=math.gcd(parallel, batch))
  for name, (kwargs, num_experts) in models.items():
    steppers[name] = _Stepper(kwargs, shape, batch, mesh, step_cfg)
    experts[name] = num_experts
  # The peak matmul is timed in the same rounds as the steps, and each round's MFU uses that
  # round's peak: the machine's speed drifts between runs (dev VM: peak 124-153 GFLOP/s,
  # dense step 224-326 ms), and a ratio taken side by side cancels most of it.
  peak = PeakMatmul(size)
  times = timing.interleaved({'peak_matmul': peak, **steppers}, opts.repeats, settle=True)
  peak_times = peak.times[-opts.repeats:]  # the timed rounds (interleaved also warms up)
  del times['peak_matmul']
  peak_seconds = statistics.median(peak_times)
  records = [timing.record('peak_matmul', 'fp32_square', None, size, peak_seconds, None, None,
                           flops=peak.flops)]
  if log:
    log(f'training steps: d_model={shape["d_model"]} layers={shape["num_layers"]} '
        f'batch={batch}x{shape["max_length"]} in {step_cfg.parallel_microbatches} parallel '
        f'microbatches; peak matmul {peak.flops / peak_seconds / 1e9:.1f} '
        'GFLOP/s')
  for r in timing.ratio_records('train_step', None, batch * shape['max_length'], times, 'dense'):
    s = steppers[r['backend']]
    mfu = statistics.median(s.flops / t / (peak.flops / p)
                            for t, p in zip(times[r['backend']], peak_times))
    r.update(num_experts=experts[r['backend']], flops=s.flops, mfu=mfu,
             state_bytes=s.state_bytes, peak_memory_bytes=s.peak_bytes)
    records.append(r)
  if log:
    log(timing.format_table(records).split('\n', 1)[1])
  return records
