"""Evaluation inside a run (and from a checkpoint, `moescale.evaluate.lm`): the loss,
perplexity and bits of every evaluation split, over whole splits or a batch limit, with
Transformer-XL memory carried across the batches of a split where the model has one.

`cfg` is a `trainer.TrainConfig` (batch_size, eval_batch_size, eval_steps, eval_mem_len).
"""

from __future__ import annotations

import jax
import numpy as np

from moescale import sharding as shd
from moescale.train import memory as memory_lib
from moescale.train import step as step_lib


def evaluate(eval_fn, state, data, cfg, mesh,
             memory: memory_lib.MemorySpec | None = None, progress: bool = False
             ) -> dict[str, float]:
  """{'<split>/eval_loss', '<split>/perplexity', '<split>/bits_per_token' (and bits_per_byte
  where the source knows bytes per token)} over at most cfg.eval_steps batches per split.
  With a memory spec, eval_fn carries Transformer-XL memory from batch to batch of a split
  (empty at its start), cfg.eval_mem_len tokens of it."""
  out = {}
  batch_size = cfg.eval_batch_size or cfg.batch_size
  per_host = batch_size // jax.process_count()
  iters = data.eval_iterators(per_host, jax.process_index(), jax.process_count())
  for split, batches in iters.items():
    xent, weight = 0.0, 0.0
    mem = None
    if memory is not None:
      mem = memory_lib.empty_memory(memory, batch_size, _eval_mem_len(cfg, memory),
                                    shd.batch_sharding(mesh, 1))
    if progress:
      import tqdm  # only for interactive evaluations: training logs its own progress
      batches = tqdm.tqdm(batches, desc=split, total=cfg.eval_steps or None, unit='batch')
    for i, batch in enumerate(batches):
      if cfg.eval_steps and i >= cfg.eval_steps:
        break
      batch = shd.host_local_to_global(batch, mesh)
      if mem is None:
        r = eval_fn(state.params, state.rest, batch)
      else:
        r, mem = eval_fn(state.params, state.rest, batch, mem)
      xent += float(r['xent_sum'])
      weight += float(r['weight'])
    if weight == 0:
      continue
    loss = xent / weight
    out[f'{split}/eval_loss'] = loss
    out[f'{split}/perplexity'] = float(np.exp(min(loss, 50.0)))
    out[f'{split}/bits_per_token'] = loss / np.log(2)
    out[f'{split}/eval_tokens'] = weight
    bytes_per_token = getattr(data, 'bytes_per_token', lambda s: None)(split)
    if bytes_per_token:
      out[f'{split}/bits_per_byte'] = loss / np.log(2) / bytes_per_token
  return out


def _eval_mem_len(cfg, spec: memory_lib.MemorySpec | None) -> int:
  if spec is None:
    return 0
  return spec.mem_len if cfg.eval_mem_len is None else cfg.eval_mem_len


def make_eval_fn(graphdef, state_sh, mesh, cfg, spec):
  """(the jitted eval step, the memory spec `evaluate` must carry for it, or None)."""
  mem_len = _eval_mem_len(cfg, spec)
  fn = step_lib.jit_eval_step(step_lib.make_eval_step(graphdef, mem_len), state_sh, mesh,
                              with_memory=mem_len > 0)
  return fn, (spec if mem_len else None)
