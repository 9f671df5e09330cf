"""What a forward pass of the LM returns (`LMOutput`), and how it is assembled from the
blocks' auxiliary outputs and the Transformer-XL memory."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from moescale.layers import common


@flax.struct.dataclass
class LMOutput:
  """What one forward pass returns (a pytree: safe to return from `jax.jit`).

  logits: [batch, length, vocab] float32 (float64 if the compute dtype is).
  aux_loss: scalar, the sum of every sublayer's weighted auxiliary losses; add it to the LM loss.
  aux_losses: name -> scalar, those weighted losses summed over layers.
  metrics: 'layer_02/expert_usage' -> array, every sublayer metric by 1-based layer.
  memory: Transformer-XL memory for the next segment (list per layer) or None.
  memory_mask: [batch, mem] bool, which slots of `memory` hold tokens (None with no memory).
  batch_stats: 'layer_02' -> that sublayer's `Aux.batch_stats` (sums over this call's tokens;
    `TransformerLM.batch_losses` turns them, summed over microbatches, into losses).
  hidden: [batch, length, d_model], the final LayerNorm's output the output layer reads (what
    a classification head reads instead: moescale.evaluate.classifier).
  """
  logits: jax.Array
  aux_loss: jax.Array
  aux_losses: dict[str, jax.Array]
  metrics: dict[str, jax.Array]
  memory: list[jax.Array] | None = None
  memory_mask: jax.Array | None = None
  batch_stats: dict[str, dict[str, jax.Array]] = flax.struct.field(default_factory=dict)
  hidden: jax.Array | None = None


def next_memory_mask(memory, memory_mask, shape, mem_len) -> jax.Array:
  """The mask of the memory a call returns: the last mem_len of (memory's mask ++ the current
  tokens, all real). [batch, min(mem_len, mem + length)] bool."""
  batch, length = shape
  current = jnp.ones((batch, length), bool)
  if memory is not None:
    old = (jnp.ones((batch, memory[0].shape[1]), bool) if memory_mask is None
           else memory_mask.astype(bool))
    current = jnp.concatenate([old, current], axis=1)
  return current[:, -mem_len:]


def collect(records: list[tuple[int, common.Aux]]) -> tuple[dict, jax.Array, dict]:
  """Per-layer Aux -> (weighted losses summed over layers, their total, metrics by layer)."""
  aux_losses: dict[str, jax.Array] = {}
  metrics: dict[str, jax.Array] = {}
  for layer, aux in records:
    for name, value in aux.losses.items():
      value = jnp.asarray(value, jnp.float32)
      if value.ndim:
        raise ValueError(f'auxiliary loss {name!r} of layer {layer} must be a scalar, '
                         f'got shape {value.shape}')
      aux_losses[name] = aux_losses.get(name, 0.0) + value
    for name, value in aux.metrics.items():
      metrics[f'layer_{layer:02d}/{name}'] = value
  aux_loss = sum(aux_losses.values(), jnp.zeros((), jnp.float32))
  return aux_losses, aux_loss, metrics
