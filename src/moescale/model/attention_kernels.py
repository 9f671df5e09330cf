"""What computes the attention core softmax(scale q k^T + mask) v: XLA's ops, or a platform's
kernel (`kernel_registry`, op 'attention'; moescale.cpu has a C++ one for XLA:CPU).

    kernels = get_kernels('auto')                     # or 'xla', 'cpu'
    heads = kernels.attend(q, k, v, segment_ids, scale=..., dropout=..., ...)

The mask (`attention_mask`) is the same whichever computes it.

Einsum letters: b batch, q query positions, t key positions, h heads, k head_dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moescale import kernel_registry
from moescale.layers import common

KERNELS = kernel_registry.NAMES
# Masked scores get a large finite negative number, not -inf: a row is never fully masked (a
# token always sees itself), but a finite fill keeps the backward pass NaN-free even if it were.
_MASKED = -1e30


def attention_mask(segment_ids: jax.Array | None, qlen: int, mlen: int = 0,
                   memory_mask: jax.Array | None = None) -> jax.Array:
  """Which keys each query may see: [batch or 1, 1, qlen, mlen + qlen] bool.

  Causal by index within the row: query i (the i-th current token) sees memory slots 0..mlen-1
  and current tokens 0..i. With segment_ids [batch, qlen] (0 = padding, as seqio packs), a
  current token sees only tokens of its own segment; padding sees only padding, so no real
  token ever attends to padding and no row is empty. The memory (Transformer-XL, unpacked
  streams) precedes the row and is visible to every non-padding query, except the slots that
  memory_mask [batch, mlen] marks False (memory not yet filled: the first segments of a
  stream, or a stream that restarted).
  """
  q_index = jnp.arange(qlen)[:, None]
  k_index = jnp.arange(qlen)[None, :]
  causal = (k_index <= q_index)[None, None]                       # [1, 1, q, q]
  if segment_ids is None:
    current = causal
    mem_visible = jnp.ones((1, 1, qlen, mlen), bool)
  else:
    same = segment_ids[:, :, None] == segment_ids[:, None, :]     # [b, q, q]
    current = causal & same[:, None]
    mem_visible = jnp.broadcast_to((segment_ids != 0)[:, None, :, None],
                                   (segment_ids.shape[0], 1, qlen, mlen))
  if mlen == 0:
    return current
  if memory_mask is not None:
    mem_visible = mem_visible & memory_mask[:, None, None, :]
  current = jnp.broadcast_to(current, mem_visible.shape[:1] + current.shape[1:])
  return jnp.concatenate([mem_visible, current], axis=-1)


def softmax_attend(scores: jax.Array, mask: jax.Array, v: jax.Array, dropout: float,
                   deterministic: bool, rngs: nnx.Rngs | None) -> jax.Array:
  """scores: [b, h, q, t] float32 (already scaled); v: [b, t, h, k] -> [b, q, h, k]."""
  scores = jnp.where(mask, scores, _MASKED)
  probs = jax.nn.softmax(scores, axis=-1)
  probs = common.dropout(probs, dropout, deterministic, rngs)
  return jnp.einsum('bhqt,bthk->bqhk', probs.astype(v.dtype), v)


class XlaAttention:
  """The reference: XLA's einsums, mask and softmax (any dtype, dropout, any platform)."""
  name = 'xla'

  def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None,
             *, scale: float, dropout: float = 0.0, deterministic: bool = True,
             rngs: nnx.Rngs | None = None) -> jax.Array:
    """q, k, v: [b, t, h, k]; segment_ids: [b, t] int or None -> [b, q, h, k] in v's dtype.

    Query i sees key j iff j <= i and (with segment_ids) both are in one segment. Scores and
    softmax in float32 whatever the inputs' dtype.
    """
    scores = jnp.einsum('bqhk,bthk->bhqt', q.astype(jnp.float32), k.astype(jnp.float32))
    mask = attention_mask(segment_ids, q.shape[1])
    return softmax_attend(scores * scale, mask, v, dropout, deterministic, rngs)


XLA = XlaAttention()


def get_kernels(name: str = 'auto', dropping: bool = False) -> XlaAttention:
  """The attention kernels by name ('auto', 'xla' or a platform: `kernel_registry`); call it
  while tracing. With attention dropout in training XLA's ops always run: the dropout draws
  from the module's RNG stream, which must not be drawn inside a platform-dependent branch."""
  return XLA if dropping else kernel_registry.select('attention', name, XLA)
