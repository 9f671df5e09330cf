"""Timing and reporting shared by every benchmark section.

Records (the stable `--json` schema): every row has exactly the keys of `RECORD_KEYS`, plus the
optional keys a section documents (`EXTRA_KEYS`):

    name         the benchmark ('moe_top2', 'sigma_moe', 'pkm', 'dense_ffn', 'train_step', ...)
    backend      the variant timed in that row ('dense', 'fused', 'sparse', 'plain', ...)
    num_experts  experts (or None where it does not apply)
    tokens       tokens per call (batch * length)
    seconds      median seconds of one forward + backward call (None: skipped)
    ratio        median over rounds of (this row's time / the baseline row's time in the same
                 round); None where skipped
    baseline     the `backend` of the row this ratio is against (the same `name` and shape)
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

RECORD_KEYS = ('name', 'backend', 'num_experts', 'tokens', 'seconds', 'ratio', 'baseline')
# Optional keys: 'mfu' (model FLOPs/s / measured peak), 'flops' (model FLOPs of one call),
# 'peak_memory_bytes', 'state_bytes' (params + optimizer state), 'speedup' (a baseline's time /
# this row's time, where the interesting comparison is the other way round), 'note'.
EXTRA_KEYS = ('mfu', 'flops', 'peak_memory_bytes', 'state_bytes', 'speedup', 'note')


def module_step(layer: nnx.Module) -> Callable[[jax.Array, jax.Array], object]:
  """fwd + bwd of a whole sublayer: (x, dy) -> jit(value_and_grad) of <layer(x), dy> wrt
  (its parameters, x), deterministic=True. Non-parameter state (batch statistics) rides along
  unchanged: every call times the same computation."""
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

  def loss(params, x, dy):
    y, _ = nnx.merge(graphdef, params, rest, copy=True)(x, deterministic=True)
    return jnp.vdot(y, dy)
  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  return lambda x, dy: step(params, x, dy)


def interleaved(fns: dict[str, Callable[[], object]], repeats: int,
                settle: bool = False) -> dict[str, list[float]]:
  """Times every thunk once per round, round after round; returns the times per name.

  Interleaving (rather than timing each thunk `repeats` times in a row) makes the per-round
  ratios robust to load from other jobs on a shared machine: both sides of a ratio see the
  same load.

  settle: call each thunk once untimed right before its timed call. For thunks of very
  different sizes: the first call after a much bigger one pays for its aftermath. Measured on
  the dev VM, the PKM at 16k tokens right after its 12 s parameter-matched dense layer took
  1.17 s, the next call 0.85 s, after a 3 s pause 0.93 s, after the small dense layer 0.96 s.
  A training loop runs the same step again and again, so the settled time is the one a user
  sees.
  """
  for fn in fns.values():  # compile, then one warm-up call
    jax.block_until_ready(fn())
    jax.block_until_ready(fn())
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      if settle:
        jax.block_until_ready(fn())
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
  return times


def record(name: str, backend: str, num_experts: int | None, tokens: int,
           seconds: float | None, ratio: float | None, baseline: str | None, **extra) -> dict:
  unknown = set(extra) - set(EXTRA_KEYS)
  if unknown:
    raise ValueError(f'unknown record keys {sorted(unknown)}; valid extras: {EXTRA_KEYS}')
  return {'name': name, 'backend': backend, 'num_experts': num_experts, 'tokens': tokens,
          'seconds': seconds, 'ratio': ratio, 'baseline': baseline, **extra}


def ratio_records(name: str, num_experts: int | None, tokens: int,
                  times: dict[str, list[float]], baseline: str) -> list[dict]:
  """One record per timed thunk, each with its median ratio to `baseline` round by round."""
  base = times[baseline]
  return [record(name, backend, num_experts, tokens, statistics.median(ts),
                 statistics.median(t / b for t, b in zip(ts, base)), baseline)
          for backend, ts in times.items()]


def skipped(name: str, backend: str, num_experts: int | None, tokens: int, baseline: str,
            reason: str) -> dict:
  return record(name, backend, num_experts, tokens, None, None, baseline, note=reason)


def format_table(records: Sequence[dict]) -> str:
  lines = [f'{"benchmark":<11} {"backend":<28} {"experts":>7} {"tokens":>7} '
           f'{"seconds":>9} {"ratio":>7}  {"vs":<12} extra']
  for r in records:
    experts = '-' if r['num_experts'] is None else r['num_experts']
    if r['seconds'] is None:
      sec, ratio = 'skipped', ''
    else:
      sec = f'{r["seconds"]:.4f}'
      ratio = '' if r['ratio'] is None else f'{r["ratio"]:.2f}x'
    extra = ' '.join(_format_extra(k, r[k]) for k in EXTRA_KEYS
                     if r.get(k) is not None and k != 'note')
    if r.get('note'):  # a skipped row's reason, or what a timed row ran (e.g. its kernels)
      extra = r['note'] if r['seconds'] is None else f'{extra} {r["note"]}'.strip()
    lines.append(f'{r["name"]:<11} {r["backend"]:<28} {experts:>7} {r["tokens"]:>7} '
                 f'{sec:>9} {ratio:>7}  {r["baseline"] or "":<12} {extra}'.rstrip())
  return '\n'.join(lines)


def format_value(key: str, value) -> str:
  """One record value as the table and docs/performance.md show it ('' for None)."""
  if value is None:
    return ''
  if key == 'seconds':
    return f'{value:.4f}'
  if key in ('ratio', 'speedup'):
    return f'{value:.2f}x'
  if key == 'mfu':
    return f'{100 * value:.1f}%'
  if key.endswith('bytes'):
    return f'{value / 2**20:.1f}MiB'
  if key == 'flops':
    return f'{value:.3g}'
  return str(value)


def _format_extra(key: str, value) -> str:
  return f'{key.removesuffix("_bytes")}={format_value(key, value)}'
