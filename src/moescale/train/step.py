"""The jitted pieces of training: sharded init, the loss, the train step, the eval step.

A model is split once into (graphdef, params, rest): `params` are the nnx.Param leaves the
optimiser updates; `rest` is every other Variable (RNG stream counters, BatchNorm statistics),
carried from step to step and checkpointed with the params. The model and the FFN family
inside it are opaque here: the only contract is `model(tokens, ...) -> LMOutput`.

Batches use seqio's decoder feature names:
  decoder_input_tokens, decoder_target_tokens, decoder_loss_weights  [batch, length]
  decoder_segment_ids, decoder_positions                            [batch, length] (packed)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moescale import sharding as shd

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
  Either split is exact for the LM loss (sums over the whole batch's weights); per-batch
  statistics (load-balancing losses, routing metrics, GShard capacity) are per microbatch,
  then averaged, as with any microbatching.
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


def abstract_model(model_fn: Callable[..., nnx.Module], seed: int):
  """(graphdef, abstract params, abstract rest): shapes only, nothing allocated."""
  model = nnx.eval_shape(lambda: model_fn(rngs=nnx.Rngs(seed)))
  return nnx.split(model, nnx.Param, ...)


def create_train_state(model_fn, optimizer: optax.GradientTransformation, seed: int,
                       mesh: Mesh, rules=shd.DEFAULT_RULES):
  """Initialises params and optimizer state directly sharded: each device computes only its
  shards inside one jit, so a model larger than one device's memory can still start."""
  graphdef, abs_params, abs_rest = abstract_model(model_fn, seed)
  param_sh = shd.state_shardings(abs_params, mesh, rules)
  rest_sh = shd.state_shardings(abs_rest, mesh, rules)
  abs_opt = jax.eval_shape(optimizer.init, abs_params)
  replicated = NamedSharding(mesh, P())
  opt_sh = optax.tree_map_params(optimizer, lambda _, s: s, abs_opt, param_sh,
                                 transform_non_params=lambda _: replicated)
  state_sh = TrainState(step=replicated, params=param_sh, rest=rest_sh, opt_state=opt_sh)

  def init():
    _, params, rest = nnx.split(model_fn(rngs=nnx.Rngs(seed)), nnx.Param, ...)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest,
                      opt_state=optimizer.init(params))

  # The out_shardings carry the mesh: no mesh context is needed (the constructors read none).
  state = jax.jit(init, out_shardings=state_sh)()
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


def _forward(graphdef, params, rest, batch: Batch, deterministic: bool):
  model = nnx.merge(graphdef, params, rest)
  out = model(batch['decoder_input_tokens'],
              segment_ids=batch.get('decoder_segment_ids'),
              positions=batch.get('decoder_positions'),
              deterministic=deterministic)
  return out, nnx.state(model, nnx.Not(nnx.Param))


def _micro_loss(cfg: StepConfig):
  """loss(model, batch, total_weight) -> (objective of one microbatch, its logged parts)."""

  def micro_loss(model, batch, total_weight):
    out = model(batch['decoder_input_tokens'],
                segment_ids=batch.get('decoder_segment_ids'),
                positions=batch.get('decoder_positions'),
                deterministic=False)
    loss_sum, weight, xent_sum = cross_entropy(
        out.logits, batch['decoder_target_tokens'], batch['decoder_loss_weights'], cfg.z_loss)
    n = cfg.microbatches  # per-microbatch statistics are averaged over all of them
    loss = loss_sum / total_weight + out.aux_loss / n
    aux = {'xent_sum': xent_sum, 'weight': weight, 'aux_loss': out.aux_loss / n,
           **{f'aux/{k}': v / n for k, v in out.aux_losses.items()},
           **{f'routing/{k}': v / n for k, v in out.metrics.items()}}
    return loss, aux

  return micro_loss


def _parallel_parts(grads_of_one, p: int):
  """grads_of(params, rest, batch, total_weight) summed over p unrolled microbatches.

  Part i takes rows i, i+p, ...: with the batch split over data devices in contiguous blocks,
  every part keeps rows on every device (when each block is a multiple of p).
  """
  if p == 1:
    return grads_of_one

  def grads_of(params, rest, batch, total_weight):
    parts = jax.tree.map(lambda x: x.reshape(x.shape[0] // p, p, *x.shape[1:]), batch)
    total = None
    for i in range(p):  # unrolled: the parts share no data, only `rest` (RNG counters)
      loss, aux, grads, rest = grads_of_one(params, rest, jax.tree.map(lambda x: x[:, i], parts),
                                            total_weight)
      part = (loss, aux, grads)
      total = part if total is None else jax.tree.map(jnp.add, total, part)
    return (*total, rest)

  return grads_of


def _accumulated(grads_of, n: int):
  """grads_of summed over n sequential microbatches (contiguous blocks of rows, a scan)."""
  if n == 1:
    return grads_of

  def accumulated(params, rest, batch, total_weight):
    micro = jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch)

    # params ride in the carry (unchanged) so the model is merged from values of the scan
    # body's own trace; a closed-over outer value makes nnx refuse to extract the graph.
    def body(carry, mb):
      params, grads, loss, aux, rest = carry
      l, a, g, rest = grads_of(params, rest, mb, total_weight)
      return (params, jax.tree.map(jnp.add, grads, g), loss + l,
              jax.tree.map(jnp.add, aux, a), rest), None

    loss, aux, grads, rest = grads_of(params, rest, jax.tree.map(lambda x: x[0], micro),
                                      total_weight)
    (_, grads, loss, aux, rest), _ = jax.lax.scan(
        body, (params, grads, loss, aux, rest), jax.tree.map(lambda x: x[1:], micro))
    return loss, aux, grads, rest

  return accumulated


def make_train_step(graphdef, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, cfg: StepConfig = StepConfig()):
  """train_step(state, batch) -> (state, metrics); pure, to be jitted with shardings."""
  # nnx.value_and_grad (not jax's) so that stateful Variables the forward pass mutates (dropout
  # RNG counters, BatchNorm statistics) are lifted across the grad trace; jax.grad over a
  # merged model raises TraceContextError on the first dropout call (flax 0.12).
  grad_fn = nnx.value_and_grad(_micro_loss(cfg), argnums=nnx.DiffState(0, nnx.Param),
                               has_aux=True)

  def grads_of_one(params, rest, batch, total_weight):
    model = nnx.merge(graphdef, params, rest)
    (loss, aux), grads = grad_fn(model, batch, total_weight)
    return loss, aux, grads, nnx.state(model, nnx.Not(nnx.Param))

  grads_of = _accumulated(_parallel_parts(grads_of_one, cfg.parallel_microbatches),
                          cfg.grad_accum_steps)

  def train_step(state: TrainState, batch: Batch):
    total_weight = jnp.maximum(jnp.sum(batch['decoder_loss_weights'].astype(jnp.float32)), 1.0)
    loss, aux, grads, rest = grads_of(state.params, state.rest, batch, total_weight)
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
    return TrainState(state.step + 1, params, rest, opt_state), metrics

  return train_step


def make_eval_step(graphdef):
  """eval_step(params, rest, batch) -> {'xent_sum', 'weight'} summed over the batch."""

  def eval_step(params, rest, batch: Batch):
    out, _ = _forward(graphdef, params, rest, batch, deterministic=True)
    _, weight, xent_sum = cross_entropy(out.logits, batch['decoder_target_tokens'],
                                        batch['decoder_loss_weights'])
    return {'xent_sum': xent_sum, 'weight': weight}

  return eval_step


def jit_train_step(train_step, state_sh, mesh: Mesh):
  batch_sh = shd.batch_sharding(mesh, 2)
  return jax.jit(train_step, in_shardings=(state_sh, batch_sh),
                 out_shardings=(state_sh, NamedSharding(mesh, P())), donate_argnums=(0,))


def jit_eval_step(eval_step, state_sh, mesh: Mesh):
  batch_sh = shd.batch_sharding(mesh, 2)
  return jax.jit(eval_step, in_shardings=(state_sh.params, state_sh.rest, batch_sh),
                 out_shardings=NamedSharding(mesh, P()))
