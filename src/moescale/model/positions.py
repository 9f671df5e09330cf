"""Position information: absolute sinusoids, learned tables, rotary, and Transformer-XL relative.

Einsum letters: b batch, l length, h heads, k head_dim (kv), d d_model, r relative distance.

Absolute schemes ('sinusoidal', 'learned') are added to the token embeddings and read the
`positions` feature ([batch, length] int, restarting at 0 in every packed segment, as seqio's
decoder feature converter writes it). 'rotary' rotates queries and keys by the same positions.
'relative' (Dai et al. 2019) needs no positions at all: it scores each query-key pair by the
distance between them, so it works unchanged across packed segments and across the memory.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from moescale.layers import common


def sinusoidal_embedding(positions: jax.Array, dim: int, dtype=jnp.float32) -> jax.Array:
  """fairseq's SinusoidalPositionalEmbedding: [sin(p·w_0..w_{n-1}), cos(p·w_0..w_{n-1})].

  positions: [...] int -> [..., dim]. Half sines then half cosines *concatenated* (not
  interleaved), with frequencies w_i = 10000^(-i/(n-1)) for n = dim//2 (fairseq divides by
  n-1, Vaswani et al. by n); an odd dim gets a zero last column, as in fairseq.
  fairseq numbers positions from padding_idx+1 (= 2 with its dictionary); here a segment's
  first token has position 0, so the table is fairseq's shifted by two rows. Nothing in the
  model depends on the offset; it matters only when importing fairseq weights, which use the
  same fixed function anyway.
  """
  half = dim // 2
  scale = math.log(10000.0) / max(half - 1, 1)
  freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -scale)
  args = positions.astype(jnp.float32)[..., None] * freqs
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros(emb.shape[:-1] + (1,), emb.dtype)], axis=-1)
  return emb.astype(dtype)


class LearnedPositions(nnx.Module):
  """A learned table [max_length, d_model] with logical axes ('length', 'embed')."""

  def __init__(self, max_length: int, d_model: int, *, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    common.check_positive(max_length=max_length, d_model=d_model)
    self.max_length = max_length
    # fairseq's LearnedPositionalEmbedding init: N(0, d^-1/2), like the token embeddings.
    self.table = common.param(rngs, common.normal(d_model ** -0.5), (max_length, d_model),
                              ('length', 'embed'), param_dtype)

  def __call__(self, positions: jax.Array) -> jax.Array:
    """positions: [batch, length] int -> [batch, length, d_model]."""
    return jnp.take(self.table[...], positions, axis=0)


def apply_rotary(x: jax.Array, positions: jax.Array, base: float = 10000.0) -> jax.Array:
  """Rotary embedding (Su et al. 2021), GPT-NeoX "rotate half" layout.

  x: [batch, length, heads, head_dim] (head_dim even); positions: [batch, length] int.
  Feature i is paired with feature i + head_dim/2 and the pair is rotated by angle
  p·base^(-2i/head_dim). Computed in float32, returned in x's dtype.
  """
  dim = x.shape[-1]
  if dim % 2:
    raise ValueError(f'rotary positions need an even head_dim, got {dim}')
  half = dim // 2
  inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / dim)
  angles = positions.astype(jnp.float32)[..., None, None] * inv_freq  # [b, l, 1, half]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def relative_sinusoids(klen: int, dim: int, dtype=jnp.float32) -> jax.Array:
  """Transformer-XL's R: [klen, dim] encodings of the distances klen-1, klen-2, ..., 0.

  Row r encodes distance klen-1-r, in the order `rel_shift` expects (Dai et al. 2019, code
  `PositionalEmbedding`: inverse frequencies 10000^(-2i/dim), sines then cosines).
  """
  inv_freq = 1.0 / (10000.0 ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
  distance = jnp.arange(klen - 1, -1, -1, dtype=jnp.float32)
  args = distance[:, None] * inv_freq
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  return emb[:, :dim].astype(dtype)


def rel_shift(x: jax.Array) -> jax.Array:
  """The standard Transformer-XL relative shift (the pad-and-reshape trick).

  x: [..., qlen, klen] whose column r holds the score for distance klen-1-r (for every query
  row alike). Returns [..., qlen, klen] whose entry [i, j] holds the score for distance
  (klen - qlen + i) - j, i.e. query i (the last qlen of klen positions) against key j. Entries
  with j > klen - qlen + i (the future) hold garbage and must be masked by the caller.
  """
  *batch, qlen, klen = x.shape
  x = jnp.pad(x, [(0, 0)] * len(batch) + [(0, 0), (1, 0)])
  x = x.reshape(*batch, klen + 1, qlen)
  return x[..., 1:, :].reshape(*batch, qlen, klen)


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
  """[batch, length] positions restarting at 0 wherever the segment id changes.

  What seqio's decoder feature converter writes as `decoder_positions`, for callers that
  pass segment_ids alone. (Padding gets positions too; nothing reads them.)
  """
  length = segment_ids.shape[-1]
  index = jnp.broadcast_to(jnp.arange(length), segment_ids.shape)
  starts = jnp.concatenate(
      [jnp.ones_like(segment_ids[..., :1], bool),
       segment_ids[..., 1:] != segment_ids[..., :-1]], axis=-1)
  return index - jax.lax.cummax(jnp.where(starts, index, 0), axis=segment_ids.ndim - 1)
