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
import os
import time
from typing import Any, Callable, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moescale import sharding as shd
from moescale.train import checkpoint as ckpt_lib
from moescale.train.evaluation import evaluate, make_eval_fn  # noqa: F401  (re-exported)
from moescale.train import guard
from moescale.train import memory as memory_lib
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
  """Mesh axis sizes; one may be -1 (the rest of the devices). See `moescale.sharding`. How
  tokens cross the expert axis is the MoE family's own setting (its `expert_exchange`).

  num_devices: use only the first N of this process's devices (None: all of them). For
  single-process runs: a smaller mesh than the machine offers (e.g. one of the fake CPU
  devices the tests create, whose 8-way split of a tiny model costs more than it shares).
  """
  data: int = -1
  fsdp: int = 1
  expert: int = 1
  tensor: int = 1
  num_devices: int | None = None

  def __post_init__(self):
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
  eval_batch_size: int | None = None   # global, in sequences (None: batch_size)
  # Transformer-XL memory kept at evaluation, in tokens (None: the model's mem_len; 0: none).
  # Csordás et al. test with 4 segments after training with one.
  eval_mem_len: int | None = None
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
    if self.eval_batch_size is not None and self.eval_batch_size < 1:
      raise ValueError(f'eval_batch_size={self.eval_batch_size} must be >= 1 or None')
    if self.eval_mem_len is not None and self.eval_mem_len < 0:
      raise ValueError(f'eval_mem_len={self.eval_mem_len} must be >= 0 or None')
    if self.batch_size % self.step.microbatches:
      raise ValueError(f'batch_size={self.batch_size} is not divisible by grad_accum_steps='
                       f'{self.step.grad_accum_steps} x parallel_microbatches='
                       f'{self.step.parallel_microbatches}')


def _host_scalars(metrics: dict) -> dict:
  return {k: np.asarray(jax.device_get(v)) for k, v in metrics.items()}


@dataclasses.dataclass
class TrainSummary:
  """What `train` returns. Printed, it shows the run's figures and where it wrote them; the
  trained state and the mesh are attributes (`summary.state.params`), never printed.
  `summary['loss']`, `summary['validation/eval_loss']` read a figure like a dict.

  loss: the last logged training loss (None if nothing was left to train);
  median_step_time: seconds, the first step (compilation) left out;
  evals: the final evaluation, '<split>/eval_loss', '/perplexity', '/bits_per_token', ...
  """
  model_dir: str
  start_step: int
  final_step: int
  loss: float | None
  median_step_time: float | None
  evals: dict[str, float]
  state: step_lib.TrainState = dataclasses.field(repr=False)
  mesh: Any = dataclasses.field(repr=False)
  preempted: bool = False   # stopped by a preemption notice, checkpointed at final_step

  @property
  def paths(self) -> dict[str, str]:
    """Where the run wrote: metrics.jsonl, checkpoints/, tensorboard/ (and config.gin)."""
    names = {'metrics': 'metrics.jsonl', 'checkpoints': 'checkpoints',
             'tensorboard': 'tensorboard', 'config': 'config.gin'}
    return {k: os.path.join(self.model_dir, v) for k, v in names.items()
            if os.path.exists(os.path.join(self.model_dir, v))}

  def figures(self) -> dict[str, Any]:
    """Every figure by name: steps, loss, step time, the final evaluation."""
    out = {'start_step': self.start_step, 'final_step': self.final_step}
    if self.preempted:
      out['preempted'] = True
    if self.loss is not None:
      out['loss'] = self.loss
    out['median_step_time'] = self.median_step_time
    return {**out, **self.evals}

  def __getitem__(self, key: str):
    return self.figures()[key]

  def __contains__(self, key: str) -> bool:
    return key in self.figures()

  def get(self, key: str, default=None):
    return self.figures().get(key, default)

  def __str__(self) -> str:
    rows = [(k, f'{v:.4f}' if isinstance(v, float) else str(v))
            for k, v in self.figures().items()] + list(self.paths.items())
    width = max(len(k) for k, _ in rows)
    return '\n'.join(f'{k:<{width}}  {v}' for k, v in rows)


class BuiltState(NamedTuple):
  """What a run's configuration makes before any step: see `build_state`."""
  graphdef: Any
  state: step_lib.TrainState
  state_sh: Any
  optimizer: Any
  schedule: Any
  memory: memory_lib.MemorySpec | None


def build_state(model_fn, cfg: TrainConfig, mesh, abstract: bool = False) -> BuiltState:
  """The train state of a run as its config defines it (optimizer, schedule, Transformer-XL
  memory), initialised and sharded, or only its shapes (abstract=True: to restore a checkpoint
  into, as `moescale.evaluate` does)."""
  _, abs_params, _ = step_lib.abstract_model(model_fn, cfg.seed)
  tx, schedule = optim.make_optimizer(cfg.optimizer, cfg.train_steps, abs_params)
  graphdef, state, state_sh = step_lib.create_train_state(model_fn, tx, cfg.seed, mesh,
                                                          cfg.rules, abstract=abstract)
  memory = memory_lib.memory_spec(graphdef, state.params, state.rest)
  if memory is not None:  # Transformer-XL: the memory is part of the state (and checkpoint)
    state, state_sh = memory_lib.attach(state, state_sh, memory, cfg.batch_size, mesh,
                                        abstract)
  return BuiltState(graphdef, state, state_sh, tx, schedule, memory)


def check_mesh(model_fn, cfg: TrainConfig, devices=None):
  """cfg's mesh over `devices` (default: this process's), refused (ValueError) where it does
  not fit the devices, the batch or the experts: before anything is written to the run
  directory (or compiled, by `moescale plan`)."""
  mesh = cfg.mesh.make(devices)
  shards = mesh.shape['data'] * mesh.shape['fsdp'] * mesh.shape['expert']
  if cfg.batch_size % shards:
    raise ValueError(f'batch_size={cfg.batch_size} must be a multiple of {shards}, the batch '
                     f'shards (data x fsdp x expert) of the mesh {dict(mesh.shape)}')
  _check_expert_axis(step_lib.abstract_model(model_fn, cfg.seed)[1], mesh)
  return mesh


def _check_expert_axis(abs_params, mesh) -> None:
  """Refuses an expert mesh axis that does not divide the experts. state_shardings would
  replicate them over it (as it does for small test models on big meshes), so the run would
  train with none of the expert parallelism asked for, and say nothing."""
  size = dict(mesh.shape).get('expert', 1)
  if size == 1:
    return
  for path, var in nnx.to_flat_state(abs_params):
    names = var.get_metadata().get('out_sharding') or ()
    for name, dim in zip(names, var.get_value().shape):
      if name == 'expert' and dim % size:
        devices = mesh.devices.size
        valid = [n for n in range(1, dim + 1) if dim % n == 0 and devices % n == 0]
        raise ValueError(
            f'{dim} experts (in {"/".join(map(str, path))}) do not divide over the expert mesh '
            f'axis of size {size} (MeshConfig.expert, EXPERT_PARALLELISM): valid sizes divide '
            f'both the experts and the {devices} devices: {valid}')


def _restore(checkpointer, state, state_sh):
  """(state, data position) from the latest complete checkpoint, or as given if none."""
  if checkpointer.latest_step() is None:
    return state, None
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          state, state_sh)
  state, meta, _ = checkpointer.restore_latest(abstract)   # skips damaged steps, warning
  log.info('resumed from step %d in %s', int(state.step), checkpointer.directory)
  return state, meta.get('data_position')


class _Window:
  """Tokens and wall time since the last log: throughput, step time, MFU."""

  def __init__(self, flops_per_token: float | None):
    self.flops_per_token = flops_per_token
    self.peak = metrics_lib.run_peak_flops() if flops_per_token else None
    self.step_times: list[float] = []
    self.reset()

  def reset(self):
    self.t0, self.tokens, self.steps = time.perf_counter(), 0, 0

  def add(self, tokens: int):
    self.tokens += tokens
    self.steps += 1

  def scalars(self, first_window: bool) -> dict[str, float]:
    dt = time.perf_counter() - self.t0
    step_time = dt / self.steps
    if not (first_window and self.steps == 1):  # a lone first step is mostly compilation
      self.step_times.append(step_time)
    out = {'tokens_per_second': self.tokens / dt, 'step_time': step_time}
    if self.flops_per_token:
      out['train_flops'] = 3.0 * self.flops_per_token * self.tokens / self.steps
      out['mfu'] = 3.0 * self.flops_per_token * out['tokens_per_second'] / self.peak
    self.reset()
    return out


def train(model_fn: Callable[..., nnx.Module], data: DataSource, cfg: TrainConfig,
          flops_per_token: float | None = None, init_from=None) -> TrainSummary:
  """Trains (or resumes) in cfg.model_dir; returns a `TrainSummary` of the run.

  flops_per_token: forward FLOPs per token of the model (from `moescale.accounting`), used for
  the logged `train_flops` (3x forward) and MFU against this machine's measured peak.
  init_from: (params, rest) to start from instead of a fresh initialisation, when model_dir
  has no checkpoint yet (fine-tuning a pretrained model; the optimizer state starts fresh), or
  a function (fresh params, fresh rest) -> (params, rest) that fills in part of them.
  """
  mesh = check_mesh(model_fn, cfg)
  with guard.RunLock(cfg.model_dir), guard.Preemption() as preempted:
    guard.check_vocabulary(cfg.model_dir, data)
    return _train(model_fn, data, cfg, mesh, flops_per_token, init_from, preempted)


def _train(model_fn, data, cfg: TrainConfig, mesh, flops_per_token, init_from,
           preempted: guard.Preemption) -> TrainSummary:
  built = build_state(model_fn, cfg, mesh)
  graphdef, state, state_sh, memory = built.graphdef, built.state, built.state_sh, built.memory
  checkpointer = ckpt_lib.Checkpointer(cfg.model_dir, keep=cfg.keep_checkpoints)
  if init_from is not None and checkpointer.latest_step() is None:
    start = (init_from(state.params, state.rest) if callable(init_from) else init_from)
    # Copies: the train step donates its state, and the caller's arrays must survive it.
    params, rest = jax.device_put(jax.tree.map(jnp.copy, tuple(start)),
                                  (state_sh.params, state_sh.rest))
    state = dataclasses.replace(state, params=params, rest=rest)
  state, position = _restore(checkpointer, state, state_sh)
  start = int(state.step)
  train_fn = step_lib.jit_train_step(step_lib.make_train_step(graphdef, built.optimizer,
                                                             built.schedule, cfg.step),
                                     state_sh, mesh)
  eval_fn, eval_memory = make_eval_fn(graphdef, state_sh, mesh, cfg, memory)
  per_host = cfg.batch_size // jax.process_count()
  it = data.train_iterator(per_host, jax.process_index(), jax.process_count(), cfg.seed, position)
  if memory is not None:
    it = memory_lib.CheckedStream(it, memory)
  writer = metrics_lib.MetricsWriter(cfg.model_dir, cfg.train_steps, start,
                                     tensorboard=cfg.tensorboard, progress=cfg.progress)
  window = _Window(flops_per_token)
  evaluate_now = lambda: evaluate(eval_fn, state, data, cfg, mesh, eval_memory)
  last, evals, stopped = None, {}, False
  last_good, checked = checkpointer.latest_step(), start
  skipping = optim.skipped_steps(state.opt_state) is not None   # skip_nonfinite is on

  def check_finite(done, scalars):
    nonlocal checked
    try:
      guard.check_finite(done, checked, scalars, state.params, skipping, last_good)
    except guard.NonFiniteError:
      checkpointer.wait()     # the saves in flight (of good states) complete
      checkpointer.close()
      raise
    checked = done
  try:  # the bar and the event files end on every way out (an error then prints cleanly)
    with shd.use_mesh(mesh, cfg.rules):
      if cfg.eval_before_training and start < cfg.train_steps:
        writer.write(start, evaluate_now())
      for step in range(start, cfg.train_steps):
        batch = shd.host_local_to_global(next(it), mesh)
        state, last = train_fn(state, batch)
        window.add(int(np.prod(batch['decoder_input_tokens'].shape)))
        done = step + 1
        saving = cfg.checkpoint_period and done % cfg.checkpoint_period == 0
        if done % cfg.log_period == 0 or done == cfg.train_steps:
          scalars = _host_scalars(last)  # blocks: the window's time is real compute time
          check_finite(done, scalars)
          scalars.update(window.scalars(first_window=step + 1 - window.steps == start))
          # Device-seconds = step_time x devices (analysis.collect); CPU's fake devices count 1.
          scalars['devices'] = metrics_lib.working_devices(mesh)
          skipped = optim.skipped_steps(state.opt_state)
          if skipped is not None:
            scalars['skipped_steps'] = int(skipped)
          writer.write(done, scalars)
          writer.progress(done, float(scalars['loss']), scalars['tokens_per_second'])
        elif saving:   # never checkpoint a bad state
          check_finite(done, _host_scalars({k: last[k] for k in ('loss', 'param_norm')}))
        if cfg.eval_period and done % cfg.eval_period == 0 and done != cfg.train_steps:
          writer.write(done, evaluate_now())
        if saving:
          checkpointer.save(done, state, {'data_position': it.position()})
          last_good = done
        if done < cfg.train_steps and preempted(done):
          # The grace period is short: checkpoint now (below), skip the final evaluation.
          log.warning('preemption notice: stopping at step %d with a checkpoint', done)
          stopped = True
          break
      if not stopped and (last is not None or start == cfg.train_steps):
        evals = evaluate_now()
        writer.write(int(state.step), evals)
      if checkpointer.latest_step() != int(state.step):
        checkpointer.save(int(state.step), state, {'data_position': it.position()}, force=True)
    checkpointer.wait()
  finally:
    writer.close()
  checkpointer.close()
  times = window.step_times
  return TrainSummary(
      model_dir=cfg.model_dir, start_step=start, final_step=int(state.step),
      loss=None if last is None else float(np.asarray(last['loss'])),
      median_step_time=float(np.median(times)) if times else None, evals=evals, state=state,
      mesh=mesh, preempted=stopped)
