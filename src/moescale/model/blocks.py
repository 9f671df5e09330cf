"""The pieces a decoder LM is stacked from: LayerNorm, the pre-LN block, and where the sparse
FFN goes.

    block(x) = x + Attn(LN(x));  x + FFN(LN(x))     [batch, length, d_model], dropout on both

A block returns `(x, aux)`: the FFN's `layers.common.Aux`, whatever family it is.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from moescale import sharding as shd
from moescale.layers import common
from moescale.model import attention as attention_lib

FFNConstructor = Callable[..., nnx.Module]
# The residual stream [batch, length, d_model]: split over the data axes only. Pinning it at
# every block boundary (t5x / MaxText do the same) keeps GSPMD from carrying a tensor- or
# FSDP-split layout of one layer's output into the next layer's LayerNorm.
ACT_RESIDUAL = ('act_batch', 'act_length', 'act_embed')


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
  """(x - mean) / sqrt(var + eps) * scale + bias over the last axis; x: [..., d], scale,
  bias: [d]. The VJP is written out: autodiff of the three-pass form (mean, variance about
  it, normalise) emits twice the passes over [..., d], and a model runs 2·layers + 1 norms.

    dx = r (g - mean(g) - xh mean(g xh)),  g = dy scale,  xh = (x - mean) r,  r = 1/std
  """
  return _layer_norm_fwd(x, scale, bias, eps)[0]


def _layer_norm_fwd(x, scale, bias, eps):
  xc = x - x.mean(-1, keepdims=True)
  r = jax.lax.rsqrt(jnp.square(xc).mean(-1, keepdims=True) + eps)
  xh = xc * r
  return xh * scale + bias, (xh, r, scale)


def _layer_norm_bwd(eps, res, dy):
  del eps
  xh, r, scale = res
  g = dy * scale
  dx = r * (g - g.mean(-1, keepdims=True) - xh * (g * xh).mean(-1, keepdims=True))
  batch_axes = tuple(range(dy.ndim - 1))
  return dx, (dy * xh).sum(batch_axes), dy.sum(batch_axes)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nnx.Module):
  """LayerNorm over d_model in float32, scale and bias with logical axis 'norm'."""

  def __init__(self, dim: int, *, eps: float = 1e-5, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.eps, self.dtype = eps, dtype
    self.scale = common.param(rngs, nnx.initializers.ones, (dim,), ('norm',), param_dtype)
    self.bias = common.param(rngs, nnx.initializers.zeros, (dim,), ('norm',), param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = layer_norm(x.astype(jnp.float32), self.scale[...].astype(jnp.float32),
                   self.bias[...].astype(jnp.float32), self.eps)
    return y.astype(self.dtype)


class Block(nnx.Module):
  """One pre-LN decoder block: x + Attn(LN(x)), then x + FFN(LN(x)); dropout on both outputs."""

  def __init__(self, d_model: int, num_heads: int, head_dim: int | None, ffn: FFNConstructor,
               *, positions: str, use_bias: bool, dropout: float, attention_dropout: float,
               layernorm_eps: float, dtype, param_dtype, rngs: nnx.Rngs,
               attention_kernels: str = 'auto', init_scale: float = 1.0):
    norm = dict(eps=layernorm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    attn = dict(use_bias=use_bias, dropout=attention_dropout, init_scale=init_scale,
                dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.attention_norm = LayerNorm(d_model, **norm)
    if positions == 'relative':
      self.attention = attention_lib.RelativeAttention(d_model, num_heads, head_dim, **attn)
    else:
      self.attention = attention_lib.Attention(d_model, num_heads, head_dim,
                                               rotary=positions == 'rotary',
                                               kernels=attention_kernels, **attn)
    self.ffn_norm = LayerNorm(d_model, **norm)
    # The model's precision governs every sublayer: one `dtype` switches the whole LM to bf16
    # compute (routers and scoring stay float32 inside the families).
    self.ffn = ffn(d_model=d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.dropout_rate = dropout
    self.rngs = rngs if dropout > 0 else None

  def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None,
               positions: jax.Array | None, memory: jax.Array | None,
               deterministic: bool, memory_mask: jax.Array | None = None
               ) -> tuple[jax.Array, common.Aux]:
    """x: [batch, length, d_model] -> (x after the block, the FFN's Aux)."""
    h = self.attention_norm(x)
    if memory is None:
      a = self.attention(h, segment_ids=segment_ids, positions=positions,
                         deterministic=deterministic)
    else:
      a = self.attention(h, segment_ids=segment_ids, positions=positions,
                         memory=self.attention_norm(memory), memory_mask=memory_mask,
                         deterministic=deterministic)
    x = x + common.dropout(a, self.dropout_rate, deterministic, self.rngs).astype(x.dtype)
    x = shd.constrain(x, ACT_RESIDUAL)
    y, aux = self.ffn(self.ffn_norm(x), deterministic=deterministic, segment_ids=segment_ids)
    x = x + common.dropout(y, self.dropout_rate, deterministic, self.rngs).astype(x.dtype)
    return shd.constrain(x, ACT_RESIDUAL), aux


class BlockGroup(nnx.Module):
  """The repeating run of blocks that `scan_layers` stacks (e.g. one dense + one sparse)."""

  def __init__(self, ffns: Sequence[FFNConstructor], block_kwargs: dict, rngs: nnx.Rngs):
    self.blocks = nnx.List([Block(ffn=f, rngs=rngs, **block_kwargs) for f in ffns])


def sparse_layer_numbers(sparse_layers: str | Sequence[int], num_layers: int) -> tuple[int, ...]:
  """The 1-based layer numbers that carry the sparse FFN."""
  if isinstance(sparse_layers, str):
    if sparse_layers == 'every_other':  # fairseq's moe_freq=2: layers 2, 4, 6, ...
      return tuple(range(2, num_layers + 1, 2))
    if sparse_layers == 'all':
      return tuple(range(1, num_layers + 1))
    if sparse_layers == 'none':
      return ()
    raise ValueError(f"sparse_layers={sparse_layers!r}: valid strings are 'every_other', "
                     f"'all', 'none', or pass a list of layer numbers in [1, {num_layers}]")
  numbers = tuple(sparse_layers)
  for n in numbers:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= num_layers:
      raise ValueError(f'sparse_layers entry {n!r} is not a layer number: layers are numbered '
                       f'from 1 to num_layers={num_layers}')
  if len(set(numbers)) != len(numbers):
    raise ValueError(f'sparse_layers={list(numbers)} repeats a layer')
  return tuple(sorted(numbers))


def repeating_period(pattern: Sequence[bool]) -> int:
  """Smallest p dividing len(pattern) with pattern[i] == pattern[i % p]."""
  n = len(pattern)
  for p in range(1, n + 1):
    if n % p == 0 and all(pattern[i] == pattern[i % p] for i in range(n)):
      return p
  return n
