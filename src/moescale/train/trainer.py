"""The training loop: sharded state, resume, periodic eval / checkpoints / metrics.

Plain Python: `train(model_fn, data, TrainConfig(...))` works without gin; gin only binds
these constructors at the edge (`moescale.gin_config`).

`data` is anything with two methods (the seqio pipeline in `moescale.data` is one; tests use a
synthetic one):
    data.train_iterator(batch_size, shard_id, num_shards, seed, position) -> iterator of
        host-local numpy batches, with `.position()` -> JSON-able dict to resume from
    data.eval_iterators(batch_size, shard_id, num_shards) -> {split name: iterable of batches}
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, Protocol

import jax
import numpy as np
from flax import nnx

from moescale import sharding as shd
from moescale.layers import expert_parallel
from moescale.train import checkpoint as ckpt_lib
from moescale.train import metrics as metrics_lib
from moescale.train import optim
from moescale.train import step as step_lib

log = logging.getLogger(__name__)


class DataSource(Protocol):
  def train_iterator(self, batch_size: int, shard_id: int, num_shards: int, seed: int,
                     position: dict | None): ...

  def eval_iterators(self, batch_size: int, shard_id: int, num_shards: int) -> dict: ...


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh axis sizes; one may be -1 (the rest of the devices). See `moescale.sharding`.

  expert_exchange: how tokens reach the experts of other devices when expert > 1: 'ring'
  (all-gather + reduce-scatter, dropless) or 'all_to_all' (send buffers per destination;
  dropless by default, or bounded by expert_capacity_factor, which then drops what overflows).
  See `moescale.layers.expert_parallel`.

  num_devices: use only the first N of this process's devices (None: all of them). For
  single-process runs: a smaller mesh than the machine offers (e.g. one of the fake CPU
  devices the tests create, whose 8-way split of a tiny model costs more than it shares:
  the tiny run's step took 0.92 s on 8 fake devices, 0.34-0.44 s on one, on 2 cores).
  """
  data: int = -1
  fsdp: int = 1
  expert: int = 1
  tensor: int = 1
  expert_exchange: str = expert_parallel.DEFAULT_EXCHANGE
  expert_capacity_factor: float | None = None
  num_devices: int | None = None

  def __post_init__(self):
    expert_parallel.check_exchange(self.expert_exchange, self.expert_capacity_factor)
    if self.num_devices is not None and (not isinstance(self.num_devices, int)
                                         or self.num_devices < 1):
      raise ValueError(f'MeshConfig.num_devices={self.num_devices!r} must be a positive int '
                       'or None (all devices)')

  def make(self, devices=None):
    devices = list(jax.devices() if devices is None else devices)
    if self.num_devices is not None:
      if self.num_devices > len(devices):
        raise ValueError(f'MeshConfig.num_devices={self.num_devices} but only {len(devices)} '
                         f'devices are available; valid: 1..{len(devices)} or None')
      if jax.process_count() > 1 and self.num_devices != len(devices):
        raise ValueError(f'MeshConfig.num_devices={self.num_devices} is for single-process '
                         f'runs; this run has {jax.process_count()} processes: use None')
      devices = devices[:self.num_devices]
    return shd.make_mesh(self.data, self.fsdp, self.expert, self.tensor, devices=devices)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  model_dir: str
  train_steps: int
  batch_size: int = 8                  # global, in sequences
  seed: int = 0
  log_period: int = 10
  eval_period: int = 0                 # 0: evaluate only at the end
  eval_steps: int = 10                 # batches per eval split (None: whole split)
  # Also evaluate the starting state (t5x's run_eval_before_training): the step-0 point of
  # every eval curve, without a separate TRAIN_STEPS=0 run that compiles and loads it all again.
  eval_before_training: bool = False
  checkpoint_period: int = 0           # 0: only the final checkpoint
  keep_checkpoints: int = 3
  mesh: MeshConfig = MeshConfig()
  optimizer: optim.OptimizerConfig = optim.OptimizerConfig()
  step: step_lib.StepConfig = step_lib.StepConfig()
  rules: tuple = tuple(shd.DEFAULT_RULES)
  tensorboard: bool = True
  progress: bool = True

  def __post_init__(self):
    if self.train_steps < 0:
      raise ValueError(f'train_steps={self.train_steps} must be >= 0')
    if self.batch_size < 1:
      raise ValueError(f'batch_size={self.batch_size} must be >= 1')
    if self.batch_size % self.step.microbatches:
      raise ValueError(f'batch_size={self.batch_size} is not divisible by grad_accum_steps='
                       f'{self.step.grad_accum_steps} x parallel_microbatches='
                       f'{self.step.parallel_microbatches}')


def _host_scalars(metrics: dict) -> dict:
  return {k: np.asarray(jax.device_get(v)) for k, v in metrics.items()}


def evaluate(eval_fn, state, data: DataSource, cfg: TrainConfig, mesh) -> dict[str, float]:
  """{'<split>/eval_loss', '<split>/perplexity', '<split>/bits_per_token' (and bits_per_byte
  where the source knows bytes per token)} over at most cfg.eval_steps batches per split."""
  out = {}
  per_host = cfg.batch_size // jax.process_count()
  iters = data.eval_iterators(per_host, jax.process_index(), jax.process_count())
  for split, batches in iters.items():
    xent, weight = 0.0, 0.0
    for i, batch in enumerate(batches):
      if cfg.eval_steps and i >= cfg.eval_steps:
        break
      r = eval_fn(state.params, state.rest, shd.host_local_to_global(batch, mesh))
      xent += float(r['xent_sum'])
      weight += float(r['weight'])
    if weight == 0:
      continue
    loss = xent / weight
    out[f'{split}/eval_loss'] = loss
    out[f'{split}/perplexity'] = float(np.exp(min(loss, 50.0)))
    out[f'{split}/bits_per_token'] = loss / np.log(2)
    bytes_per_token = getattr(data, 'bytes_per_token', lambda s: None)(split)
    if bytes_per_token:
      out[f'{split}/bits_per_byte'] = loss / np.log(2) / bytes_per_token
  return out


def train(model_fn: Callable[..., nnx.Module], data: DataSource, cfg: TrainConfig,
          flops_per_token: float | None = None) -> dict[str, Any]:
  """Trains (or resumes) in cfg.model_dir; returns a summary of the run.

  flops_per_token: forward FLOPs per token of the model (from `moescale.accounting`), used for
  the logged `train_flops` (3x forward) and MFU against this machine's measured peak.
  """
  mesh = cfg.mesh.make()
  if cfg.batch_size % (mesh.shape['data'] * mesh.shape['fsdp'] * mesh.shape['expert']):
    raise ValueError(f'batch_size={cfg.batch_size} must divide by the data-parallel mesh size '
                     f'{dict(mesh.shape)}')
  _, abs_params, _ = step_lib.abstract_model(model_fn, cfg.seed)
  tx, schedule = optim.make_optimizer(cfg.optimizer, cfg.train_steps, abs_params)
  graphdef, state, state_sh = step_lib.create_train_state(model_fn, tx, cfg.seed, mesh, cfg.rules)

  checkpointer = ckpt_lib.Checkpointer(cfg.model_dir, keep=cfg.keep_checkpoints)
  position = None
  if checkpointer.latest_step() is not None:
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            state, state_sh)
    state, meta = checkpointer.restore(abstract)
    position = meta.get('data_position')
    log.info('resumed from step %d in %s', int(state.step), checkpointer.directory)
  start = int(state.step)

  train_fn = step_lib.jit_train_step(step_lib.make_train_step(graphdef, tx, schedule, cfg.step),
                                     state_sh, mesh)
  eval_fn = step_lib.jit_eval_step(step_lib.make_eval_step(graphdef), state_sh, mesh)
  per_host = cfg.batch_size // jax.process_count()
  it = data.train_iterator(per_host, jax.process_index(), jax.process_count(), cfg.seed, position)
  writer = metrics_lib.MetricsWriter(cfg.model_dir, cfg.train_steps, start,
                                     tensorboard=cfg.tensorboard, progress=cfg.progress)
  peak = metrics_lib.run_peak_flops() if flops_per_token else None

  summary: dict[str, Any] = {'start_step': start}
  window_t0, window_tokens, window_steps, step_times = time.perf_counter(), 0, 0, []
  last = None
  exchange = expert_parallel.configure(cfg.mesh.expert_exchange, cfg.mesh.expert_capacity_factor)
  with shd.activation_sharding(mesh, cfg.rules), jax.set_mesh(mesh), exchange:
    if cfg.eval_before_training and start < cfg.train_steps:
      writer.write(start, evaluate(eval_fn, state, data, cfg, mesh))
    for step in range(start, cfg.train_steps):
      batch = shd.host_local_to_global(next(it), mesh)
      state, last = train_fn(state, batch)
      window_tokens += int(np.prod(batch['decoder_input_tokens'].shape))
      window_steps += 1
      done = step + 1
      if done % cfg.log_period == 0 or done == cfg.train_steps:
        scalars = _host_scalars(last)  # blocks: the window's time is real compute time
        dt = time.perf_counter() - window_t0
        step_time = dt / window_steps
        if step > start or window_steps > 1:
          step_times.append(step_time)
        tps = window_tokens / dt
        scalars.update(tokens_per_second=tps, step_time=step_time)
        if flops_per_token:
          scalars['train_flops'] = 3.0 * flops_per_token * window_tokens / window_steps
          scalars['mfu'] = 3.0 * flops_per_token * tps / peak
        writer.write(done, scalars)
        writer.progress(done, float(scalars['loss']), tps)
        window_t0, window_tokens, window_steps = time.perf_counter(), 0, 0
      if cfg.eval_period and done % cfg.eval_period == 0 and done != cfg.train_steps:
        writer.write(done, evaluate(eval_fn, state, data, cfg, mesh))
      if cfg.checkpoint_period and done % cfg.checkpoint_period == 0:
        checkpointer.save(done, state, {'data_position': it.position()})
    final = int(state.step)
    if last is not None or start == cfg.train_steps:
      ev = evaluate(eval_fn, state, data, cfg, mesh)
      writer.write(final, ev)
      summary.update(ev)
    if checkpointer.latest_step() != final:
      checkpointer.save(final, state, {'data_position': it.position()}, force=True)
  checkpointer.wait()
  checkpointer.close()
  writer.close()
  if last is not None:
    summary['loss'] = float(np.asarray(last['loss']))
  summary.update(final_step=final, median_step_time=float(np.median(step_times)) if step_times
                 else None, state=state, mesh=mesh)
  return summary
