"""The jitted pieces of training: sharded init, the loss, the train step, the eval step.

A model is split once into (graphdef, params, rest): `params` are the nnx.Param leaves the
optimiser updates; `rest` is every other Variable (RNG stream counters, BatchNorm statistics),
carried from step to step and checkpointed with the params. The model and the FFN family
inside it are opaque here: the only contract is `model(tokens, ...) -> LMOutput`.

Batches use seqio's decoder feature names:
  decoder_input_tokens, decoder_target_tokens, decoder_loss_weights  [batch, length]
  decoder_segment_ids, decoder_positions                            [batch, length] (packed)
  memory_reset                                       [batch] (contiguous streams: 1 = forget)

Transformer-XL memory (a model whose forward returns `LMOutput.memory`) lives in
`TrainState.memory` (moescale.train.memory): row b's memory is the end of row b's previous
segment, so it follows the rows through every microbatch split.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moescale import accounting
from moescale import sharding as shd
from moescale.train import memory as memory_lib

Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """How one optimizer step computes its gradient.

  z_loss: weight of log(Z)² on the output softmax (PaLM).
  grad_accum_steps: sequential microbatches per step (a scan: the batch is split on its
    batch axis, gradients summed, one update). Saves memory.
  parallel_microbatches: independent microbatches per (accumulation) step, unrolled in one
    graph. Costs no memory saving, but XLA:CPU's executor then runs one microbatch's small
    ops (norms, softmax, elementwise) beside another's on its threads, and each working set
    is smaller (docs/performance.md has the bench's MFU at 1, 2 and 4). No use on GPU/TPU,
    where one op already fills the device.
  Either split is exact for the LM loss (sums over the whole batch's weights) and for losses
  defined over the whole batch (σ-MoE's entropy regulariser: a sublayer's `Aux.batch_stats`):
  a forward pre-pass sums every microbatch's statistics (same dropout draws as the gradient
  pass, so the same values), and each microbatch then takes the whole batch's loss gradient
  through its own statistics. That costs one more forward per step, only for such models and
  only when the batch is split. Per-group statistics (load balancing, routing metrics, GShard
  capacity) stay per microbatch, then averaged: fairseq's groups are per GPU anyway.
  """
  z_loss: float = 0.0
  grad_accum_steps: int = 1
  parallel_microbatches: int = 1

  def __post_init__(self):
    for name in ('grad_accum_steps', 'parallel_microbatches'):
      value = getattr(self, name)
      if not (isinstance(value, int) and value >= 1):
        raise ValueError(f'StepConfig.{name}={value!r} must be an integer >= 1')

  @property
  def microbatches(self) -> int:
    """Microbatches per optimizer step; the batch size must be a multiple."""
    return self.grad_accum_steps * self.parallel_microbatches


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
  step: jax.Array
  params: Any
  rest: Any
  opt_state: Any
  memory: Any = None   # Transformer-XL memory (moescale.train.memory); None without


def abstract_model(model_fn: Callable[..., nnx.Module], seed: int):
  """(graphdef, abstract params, abstract rest): shapes only, nothing allocated."""
  return nnx.split(accounting.abstract_model(model_fn, seed), nnx.Param, ...)


def create_train_state(model_fn, optimizer: optax.GradientTransformation, seed: int,
                       mesh: Mesh, rules=shd.DEFAULT_RULES, abstract: bool = False):
  """Initialises params and optimizer state directly sharded: each device computes only its
  shards inside one jit, so a model larger than one device's memory can still start.
  abstract: only the shapes (jax.ShapeDtypeStruct with their shardings), to restore into."""
  graphdef, abs_params, abs_rest = abstract_model(model_fn, seed)
  param_sh = shd.state_shardings(abs_params, mesh, rules)
  rest_sh = shd.state_shardings(abs_rest, mesh, rules)
  abs_opt = jax.eval_shape(optimizer.init, abs_params)
  replicated = NamedSharding(mesh, P())
  # Per-group optimizers (OptimizerConfig.group_lr: optax.multi_transform) hold MaskedNode
  # where a parameter is not theirs: it stays a MaskedNode, not a sharding.
  masked = lambda x: isinstance(x, optax.MaskedNode)
  opt_sh = optax.tree_map_params(optimizer, lambda p, s: p if masked(p) else s, abs_opt,
                                 param_sh, transform_non_params=lambda _: replicated,
                                 is_leaf=masked)
  state_sh = TrainState(step=replicated, params=param_sh, rest=rest_sh, opt_state=opt_sh)

  def init():
    _, params, rest = nnx.split(model_fn(rngs=nnx.Rngs(seed)), nnx.Param, ...)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest,
                      opt_state=optimizer.init(params))

  # The out_shardings carry the mesh: no mesh context is needed (the constructors read none).
  init = jax.jit(init, out_shardings=state_sh)
  state = jax.eval_shape(init) if abstract else init()
  if abstract:
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         state, state_sh)
  return graphdef, state, state_sh


def cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array,
                  z_loss: float = 0.0) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(sum of weighted token losses incl. z-loss, sum of weights, sum of weighted xent)."""
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  xent = log_z - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  total = xent + z_loss * jnp.square(log_z)
  w = weights.astype(jnp.float32)
  return jnp.sum(total * w), jnp.sum(w), jnp.sum(xent * w)


def _train_forward(model, batch):
  return model(batch['decoder_input_tokens'], segment_ids=batch.get('decoder_segment_ids'),
               positions=batch.get('decoder_positions'), deterministic=False,
               **memory_lib.forward_kwargs(batch))


def _micro_loss(cfg: StepConfig):
  """loss(model, batch, shared) -> (objective of one microbatch, (its logged parts, rows)).
  shared: 'total_weight' (the whole batch's loss weights), 'pooled' (the whole batch's
  `LMOutput.batch_stats`, when the batch is split and the model has any)."""

  def micro_loss(model, batch, shared):
    out = _train_forward(model, batch)
    loss_sum, weight, xent_sum = cross_entropy(
        out.logits, batch['decoder_target_tokens'], batch['decoder_loss_weights'], cfg.z_loss)
    n = cfg.microbatches  # per-microbatch statistics are averaged over all of them
    aux_losses = {k: v / n for k, v in out.aux_losses.items()}
    if 'pooled' in shared:
      aux_losses = _whole_batch_losses(model, out, shared['pooled'], aux_losses, n)
    aux_loss = sum(aux_losses.values(), jnp.zeros((), jnp.float32))
    loss = loss_sum / shared['total_weight'] + aux_loss
    aux = {'xent_sum': xent_sum, 'weight': weight, 'aux_loss': aux_loss,
           **{f'aux/{k}': v for k, v in aux_losses.items()},
           **{f'routing/{k}': v / n for k, v in out.metrics.items()}}
    return loss, (aux, memory_lib.next_memory(out, batch))

  return micro_loss


def _whole_batch_losses(model, out, pooled, aux_losses, n):
  """aux_losses (already / n) with this microbatch's batch-level losses replaced by 1/n of the
  whole batch's, L(pooled), whose gradient flows through this microbatch's statistics s:
  L(P + s - sg(s)) has the value L(P) and the gradient dL/dP · ds, so the n microbatches'
  gradients add up to the whole batch's exactly."""
  sg = jax.lax.stop_gradient
  own = model.batch_losses(out.batch_stats)
  mixed = jax.tree.map(lambda p, s: sg(p) + s - sg(s), pooled, out.batch_stats)
  whole = model.batch_losses(mixed)
  out_losses = dict(aux_losses)
  for k in own:
    # value L(P)/n (summing to L(P)); the subtracted constant leaves the gradient whole.
    out_losses[k] = aux_losses[k] - own[k] / n + whole[k] - sg(whole[k]) * (1 - 1 / n)
  return out_losses


def _parallel_parts(grads_of_one, p: int):
  """grads_of(params, rest, batch, shared) summed over p unrolled microbatches.

  Part i takes rows i, i+p, ...: with the batch split over data devices in contiguous blocks,
  every part keeps rows on every device (when each block is a multiple of p).
  """
  if p == 1:
    return grads_of_one

  def grads_of(params, rest, batch, shared):
    parts = jax.tree.map(lambda x: x.reshape(x.shape[0] // p, p, *x.shape[1:]), batch)
    total, rows = None, []
    for i in range(p):  # unrolled: the parts share no data, only `rest` (RNG counters)
      loss, aux, grads, rest, r = grads_of_one(
          params, rest, jax.tree.map(lambda x: x[:, i], parts), shared)
      part = (loss, aux, grads)
      total = part if total is None else jax.tree.map(jnp.add, total, part)
      rows.append(r)
    # Per-row outputs back in the batch's row order (row j·p + i came from part i).
    rows = jax.tree.map(lambda *xs: jnp.stack(xs, 1).reshape(-1, *xs[0].shape[1:]), *rows)
    return (*total, rest, rows)

  return grads_of


def _accumulated(grads_of, n: int):
  """grads_of summed over n sequential microbatches (contiguous blocks of rows, a scan)."""
  if n == 1:
    return grads_of

  def accumulated(params, rest, batch, shared):
    micro = jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch)

    # params ride in the carry (unchanged) so the model is merged from values of the scan
    # body's own trace; a closed-over outer value makes nnx refuse to extract the graph.
    def body(carry, mb):
      params, grads, loss, aux, rest = carry
      l, a, g, rest, r = grads_of(params, rest, mb, shared)
      return (params, jax.tree.map(jnp.add, grads, g), loss + l,
              jax.tree.map(jnp.add, aux, a), rest), r

    loss, aux, grads, rest, first = grads_of(params, rest, jax.tree.map(lambda x: x[0], micro),
                                             shared)
    (_, grads, loss, aux, rest), others = jax.lax.scan(
        body, (params, grads, loss, aux, rest), jax.tree.map(lambda x: x[1:], micro))
    # Per-row outputs back in row order: microbatch i held the i-th contiguous block.
    rows = jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]).reshape(-1, *a.shape[1:]),
                        first, others)
    return loss, aux, grads, rest, rows

  return accumulated


def make_train_step(graphdef, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, cfg: StepConfig = StepConfig()):
  """train_step(state, batch) -> (state, metrics); pure, to be jitted with shardings."""
  # nnx.value_and_grad (not jax's) so that stateful Variables the forward pass mutates (dropout
  # RNG counters, BatchNorm statistics) are lifted across the grad trace; jax.grad over a
  # merged model raises TraceContextError on the first dropout call (flax 0.12).
  grad_fn = nnx.value_and_grad(_micro_loss(cfg), argnums=nnx.DiffState(0, nnx.Param),
                               has_aux=True)

  def grads_of_one(params, rest, batch, shared):
    model = nnx.merge(graphdef, params, rest)
    (loss, (aux, rows)), grads = grad_fn(model, batch, shared)
    return loss, aux, grads, nnx.state(model, nnx.Not(nnx.Param)), rows

  def stats_of_one(params, rest, batch, shared):
    """The forward pass alone: (0, its batch statistics, no gradient, rest, no rows)."""
    model = nnx.merge(graphdef, params, rest)
    out = _train_forward(model, batch)
    return 0.0, out.batch_stats, None, nnx.state(model, nnx.Not(nnx.Param)), None

  split = lambda one: _accumulated(_parallel_parts(one, cfg.parallel_microbatches),
                                   cfg.grad_accum_steps)
  grads_of, stats_of = split(grads_of_one), split(stats_of_one)

  def train_step(state: TrainState, batch: Batch):
    batch = memory_lib.with_memory(batch, state.memory)
    total_weight = jnp.maximum(jnp.sum(batch['decoder_loss_weights'].astype(jnp.float32)), 1.0)
    shared = {'total_weight': total_weight}
    if cfg.microbatches > 1 and _has_batch_stats(stats_of_one, state, batch, cfg.microbatches):
      # The pre-pass starts from the same RNG state as the gradient pass: the same dropout
      # draws, so the pooled statistics are exactly the sum of the gradient pass's.
      shared['pooled'] = stats_of(state.params, state.rest, batch, shared)[1]
    loss, aux, grads, rest, memory = grads_of(state.params, state.rest, batch, shared)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        'loss': aux['xent_sum'] / total_weight,
        'total_loss': loss,
        'learning_rate': schedule(state.step),
        'grad_norm': optax.tree.norm(grads),
        'param_norm': optax.tree.norm(params),
        'tokens': aux['weight'],
        **{k: v for k, v in aux.items() if k not in ('xent_sum', 'weight')},
    }
    return TrainState(state.step + 1, params, rest, opt_state, memory), metrics

  return train_step


def _has_batch_stats(stats_of_one, state, batch, n) -> bool:
  """Whether the model reports any `batch_stats` (decided while tracing, from shapes only)."""
  one = jax.tree.map(lambda x: jax.ShapeDtypeStruct((x.shape[0] // n, *x.shape[1:]), x.dtype),
                     batch)
  stats = jax.eval_shape(lambda p, r, b: stats_of_one(p, r, b, {})[1], state.params,
                         state.rest, one)
  return bool(jax.tree.leaves(stats))


def make_eval_step(graphdef, mem_len: int = 0):
  """eval_step(params, rest, batch) -> {'xent_sum', 'weight'} summed over the batch.

  mem_len > 0 (Transformer-XL): eval_step(params, rest, batch, memory) -> (those sums, the
  memory for the next batch, keeping mem_len tokens per row; see `memory.empty_memory`)."""

  def eval_step(params, rest, batch: Batch, memory=None):
    batch = memory_lib.with_memory(batch, memory)
    model = nnx.merge(graphdef, params, rest)
    out = model(batch['decoder_input_tokens'], segment_ids=batch.get('decoder_segment_ids'),
                positions=batch.get('decoder_positions'), deterministic=True,
                **memory_lib.forward_kwargs(batch), **({'mem_len': mem_len} if mem_len else {}))
    _, weight, xent_sum = cross_entropy(out.logits, batch['decoder_target_tokens'],
                                        batch['decoder_loss_weights'])
    sums = {'xent_sum': xent_sum, 'weight': weight}
    return (sums, memory_lib.next_memory(out, batch)) if mem_len else sums

  return eval_step


def jit_train_step(train_step, state_sh, mesh: Mesh):
  # Every batch array (tokens [batch, length], memory_reset [batch]) splits on its first axis.
  batch_sh = shd.batch_sharding(mesh, 1)
  return jax.jit(train_step, in_shardings=(state_sh, batch_sh),
                 out_shardings=(state_sh, NamedSharding(mesh, P())), donate_argnums=(0,))


def jit_eval_step(eval_step, state_sh, mesh: Mesh, with_memory: bool = False):
  batch_sh = shd.batch_sharding(mesh, 1)
  if not with_memory:
    return jax.jit(eval_step, in_shardings=(state_sh.params, state_sh.rest, batch_sh),
                   out_shardings=NamedSharding(mesh, P()))
  return jax.jit(eval_step, in_shardings=(state_sh.params, state_sh.rest, batch_sh, batch_sh),
                 out_shardings=(NamedSharding(mesh, P()), batch_sh))
