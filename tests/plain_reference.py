"""Plain references for what one training step must compute, written without the trainer's
machinery (no nnx.value_and_grad over a merged model, no microbatch loop of its own, no
sharding): the independent side of the train-step, sharded and multi-process tests.

    objective = Σ w·xent / Σ w  +  z_loss · Σ w·log(Z)² / Σ w  +  Σ_name c_name · aux_name

w are the loss weights (0 on padding), c_name the weight the test gave a family's auxiliary
loss, and aux_name that loss as the sublayers report it unweighted among their metrics, summed
over layers and averaged over microbatches (per-group statistics such as the load-balancing
loss are per microbatch; see moescale.train.step.StepConfig), except the losses the paper
defines over the whole batch (WHOLE_BATCH: σ-MoE's entropy of the batch-mean router
distribution), taken from one forward pass of the whole batch. That needs the σ-MoE layers'
inputs not to depend on the split: no capacity-dropping layer before them and no dropout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


WHOLE_BATCH = ('entropy',)


def microbatch_rows(batch_size: int, grad_accum_steps: int = 1,
                    parallel_microbatches: int = 1) -> list[np.ndarray]:
  """The rows of each microbatch, as StepConfig documents them: contiguous blocks for the
  sequential accumulation, then rows i, i+p, ... of a block for parallel part i."""
  rows = np.arange(batch_size).reshape(grad_accum_steps, -1)
  return [block.reshape(-1, parallel_microbatches)[:, i]
          for block in rows for i in range(parallel_microbatches)]


def token_terms(logits, targets, weights):
  """(Σ w·xent, Σ w·log(Z)², Σ w) of one forward pass, from the log-softmax's definition."""
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.sum(logits * jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype), -1)
  w = weights.astype(jnp.float32)
  return jnp.sum((log_z - picked) * w), jnp.sum(log_z ** 2 * w), jnp.sum(w)


def objective(graphdef, params, rest, batch, aux_weights, z_loss=0.0, grad_accum_steps=1,
              parallel_microbatches=1, deterministic=False):
  """(objective, parts) of `batch` as the docstring above defines it. parts: 'xent', 'z',
  'aux' and 'aux/<name>' (weighted, layers summed, microbatches averaged)."""
  size = batch['decoder_input_tokens'].shape[0]
  parts = microbatch_rows(size, grad_accum_steps, parallel_microbatches)
  total_weight = jnp.maximum(jnp.sum(batch['decoder_loss_weights'].astype(jnp.float32)), 1.0)
  xent = z = 0.0
  weighted: dict[str, jax.Array] = {}
  for rows in parts:
    mb = {k: v[rows] for k, v in batch.items()}
    out = nnx.merge(graphdef, params, rest)(
        mb['decoder_input_tokens'], segment_ids=mb.get('decoder_segment_ids'),
        positions=mb.get('decoder_positions'), deterministic=deterministic)
    x, zz, _ = token_terms(out.logits, mb['decoder_target_tokens'], mb['decoder_loss_weights'])
    xent, z = xent + x / total_weight, z + zz / total_weight
    # The unweighted losses every sublayer reports as metrics ('layer_02/load_balance'),
    # weighted here by the weights the test gave the families.
    for key, value in out.metrics.items():
      name = key.split('/', 1)[1]
      if name in aux_weights and name not in WHOLE_BATCH:
        weighted[name] = weighted.get(name, 0.0) + aux_weights[name] * value / len(parts)
  whole = nnx.merge(graphdef, params, rest)(
      batch['decoder_input_tokens'], segment_ids=batch.get('decoder_segment_ids'),
      positions=batch.get('decoder_positions'), deterministic=deterministic)
  for key, value in whole.metrics.items():
    name = key.split('/', 1)[1]
    if name in aux_weights and name in WHOLE_BATCH:
      weighted[name] = weighted.get(name, 0.0) + aux_weights[name] * value
  aux = sum(weighted.values(), 0.0)
  total = xent + z_loss * z + aux
  return total, {'xent': xent, 'z': z, 'aux': aux,
                 **{f'aux/{k}': v for k, v in weighted.items()}}


def sgd_steps(graphdef, params, rest, batches, aux_weights, learning_rate, z_loss=0.0):
  """Plain gradient descent on `objective`, one batch a step: (params, [per-step records of
  'total_loss', 'loss' and 'grad_norm']). The model must be stateless in training (no dropout,
  no routing noise, no batch statistics): `rest` is never updated."""

  @jax.jit
  def step(params, batch):
    (total, parts), grads = jax.value_and_grad(
        lambda p: objective(graphdef, p, rest, batch, aux_weights, z_loss), has_aux=True)(params)
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
    params = jax.tree.map(lambda p, g: p - learning_rate * g, params, grads)
    return params, {'total_loss': total, 'loss': parts['xent'], 'grad_norm': norm}

  records = []
  for batch in batches:
    params, record = step(params, batch)
    records.append({k: float(v) for k, v in record.items()})
  return params, records


def flat(state) -> dict[str, np.ndarray]:
  """An nnx.State as {'path/to/leaf': numpy array}."""
  return {'/'.join(map(str, p)): np.asarray(v[...] if hasattr(v, 'get_value') else v)
          for p, v in nnx.to_flat_state(state)}


def scanned_from_looped(looped: dict[str, np.ndarray], period: int) -> dict[str, np.ndarray]:
  """Flat parameters of a looped TransformerLM ('blocks/<layer>/...') as those of the same
  model with scan_layers=True ('groups/blocks/<j>/...', stacked over groups: layer =
  group·period + j); other parameters as they are."""
  out, stacks = {}, {}
  for name, value in looped.items():
    parts = name.split('/')
    if parts[0] != 'blocks':
      out[name] = value
      continue
    layer = int(parts[1])
    key = '/'.join(['groups', 'blocks', str(layer % period), *parts[2:]])
    stacks.setdefault(key, {})[layer // period] = value
  for key, by_group in stacks.items():
    out[key] = np.stack([by_group[g] for g in range(len(by_group))])
  return out


def set_params(state, values: dict[str, np.ndarray]):
  """`state` (an nnx.State of Params) with every leaf replaced by values[path], keeping each
  leaf's sharding."""
  for path, var in nnx.to_flat_state(state):
    name = '/'.join(map(str, path))
    old = var[...]
    var[...] = jax.device_put(jnp.asarray(values[name], old.dtype), old.sharding)
  return state
