"""Causal multi-head self-attention over packed rows, and Transformer-XL relative attention.

Einsum letters: b batch, q query positions, t key positions (memory + current), d d_model,
h heads, k head_dim (logical axis 'kv'), r relative distances (as many as key positions).

Both modules take the LayerNormed residual stream x: [batch, length, d_model] and return
[batch, length, d_model]. Scores and softmax are computed in float32 whatever the compute dtype.
`Attention`'s core softmax(q k^T) v runs on the kernels `attention_kernels` picks (XLA's ops,
or a platform's kernel where one is registered); the mask is `attention_mask` either way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moescale import sharding as shd
from moescale.layers import common
from moescale.model import attention_kernels
from moescale.model import positions as positions_lib
from moescale.model.attention_kernels import attention_mask, softmax_attend

__all__ = ['Attention', 'RelativeAttention', 'attention_mask']


class Attention(nnx.Module):
  """Causal self-attention with q, k, v, o projections: `Attention(d_model, num_heads, ...)`.

  Args:
    d_model: model width d.
    num_heads: H.
    head_dim: per-head width (logical 'kv'); d_model // num_heads when None.
    rotary: rotate queries and keys by the `positions` feature (Su et al. 2021).
    use_bias: biases on all four projections (fairseq: yes; Csordás et al.: no).
    dropout: dropout on the attention probabilities (training only).
    init_scale: every projection starts at N(0, init_scale²/fan_in) (fan-in d_model, or
      num_heads·head_dim for the output); Csordás et al. use c = sqrt(2/num_layers)
      (`common.depth_scale`). Biases start at zero.
    kernels: what computes softmax(q k^T) v: 'xla', a platform's kernels ('cpu': moescale's
      C++ kernel for XLA:CPU) or 'auto' (the platform's where they apply: see
      moescale.kernel_registry). Same results either way.
    dtype: compute dtype; param_dtype: storage dtype.
  """

  def __init__(self, d_model: int, num_heads: int, head_dim: int | None = None, *,
               rotary: bool = False, use_bias: bool = True, dropout: float = 0.0,
               init_scale: float = 1.0, kernels: str = 'auto', dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    if head_dim is None:
      common.check_positive(d_model=d_model, num_heads=num_heads)
      if d_model % num_heads:
        raise ValueError(f'd_model={d_model} is not divisible by num_heads={num_heads}; '
                         'pass head_dim explicitly or choose a divisor of d_model')
      head_dim = d_model // num_heads
    common.check_positive(d_model=d_model, num_heads=num_heads, head_dim=head_dim)
    if kernels not in attention_kernels.KERNELS:
      raise ValueError(f'kernels={kernels!r} is not one of {list(attention_kernels.KERNELS)}')
    if rotary and head_dim % 2:
      raise ValueError(f'rotary positions need an even head_dim, got head_dim={head_dim}')
    self.d_model, self.num_heads, self.head_dim = d_model, num_heads, head_dim
    self.rotary = rotary
    self.kernels = kernels
    self.dropout_rate = dropout
    self.dtype = dtype
    self.init_scale = init_scale
    inner = num_heads * head_dim
    qkv_init = common.fan_in_normal(d_model, init_scale)
    self.q_proj = common.param(rngs, qkv_init, (d_model, num_heads, head_dim),
                               ('embed', 'heads', 'kv'), param_dtype)
    self.k_proj = common.param(rngs, qkv_init, (d_model, num_heads, head_dim),
                               ('embed', 'heads', 'kv'), param_dtype)
    self.v_proj = common.param(rngs, qkv_init, (d_model, num_heads, head_dim),
                               ('embed', 'heads', 'kv'), param_dtype)
    self.o_proj = common.param(rngs, common.fan_in_normal(inner, init_scale),
                               (num_heads, head_dim, d_model), ('heads', 'kv', 'embed'),
                               param_dtype)
    if use_bias:
      zeros = nnx.initializers.zeros
      self.q_bias = common.param(rngs, zeros, (num_heads, head_dim), ('heads', 'kv'), param_dtype)
      self.k_bias = common.param(rngs, zeros, (num_heads, head_dim), ('heads', 'kv'), param_dtype)
      self.v_bias = common.param(rngs, zeros, (num_heads, head_dim), ('heads', 'kv'), param_dtype)
      self.o_bias = common.param(rngs, zeros, (d_model,), ('embed',), param_dtype)
    else:
      self.q_bias = self.k_bias = self.v_bias = self.o_bias = None
    self.rngs = rngs if dropout > 0 else None

  def _project(self, x: jax.Array, w: nnx.Param, b: nnx.Param | None) -> jax.Array:
    """x: [b, t, d] -> [b, t, h, k]."""
    y = jnp.einsum('btd,dhk->bthk', x, w[...].astype(self.dtype))
    y = y if b is None else y + b[...].astype(self.dtype)
    # Heads split over 'tensor' (Megatron): the projections' weights are split the same way.
    return shd.constrain(y, ('act_batch', 'act_length', 'act_heads', 'act_kv'))

  def _output(self, heads: jax.Array) -> jax.Array:
    """heads: [b, q, h, k] -> [b, q, d]."""
    y = jnp.einsum('bqhk,hkd->bqd', heads, self.o_proj[...].astype(self.dtype))
    return y if self.o_bias is None else y + self.o_bias[...].astype(self.dtype)

  def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
    """x: [batch, length, d_model]; positions: [batch, length] int (needed for rotary)."""
    x = x.astype(self.dtype)
    q = self._project(x, self.q_proj, self.q_bias)
    k = self._project(x, self.k_proj, self.k_bias)
    v = self._project(x, self.v_proj, self.v_bias)
    if self.rotary:
      if positions is None:
        positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
      q = positions_lib.apply_rotary(q, positions)
      k = positions_lib.apply_rotary(k, positions)
    dropping = self.dropout_rate > 0 and not deterministic
    kernels = attention_kernels.get_kernels(self.kernels, dropping)  # chosen while tracing
    heads = kernels.attend(q, k, v, segment_ids, scale=self.head_dim ** -0.5,
                           dropout=self.dropout_rate, deterministic=deterministic,
                           rngs=self.rngs)
    return self._output(heads.astype(self.dtype))

  def cost(self, context_length: int, query_length: int | None = None) -> common.Cost:
    """Forward FLOPs per token with `context_length` keys per query (2 per MAC).

    Projections 2·4·d·H·dh; scores and weighted values 2·2·L_ctx·H·dh. Pass the *average*
    number of keys a query sees if you want causal masking credited (L/2); pass L to count
    the full square, as Kaplan et al. and Megatron do. `query_length` is unused here.
    """
    del query_length
    inner = self.num_heads * self.head_dim
    params = 4 * self.d_model * inner
    if self.o_bias is not None:
      params += 3 * inner + self.d_model
    return common.Cost(
        flops={'attn_qkvo': 2 * 4 * self.d_model * inner,
               'attn_scores': 2 * context_length * inner,
               'attn_values': 2 * context_length * inner},
        active_params=params)


class RelativeAttention(Attention):
  """Transformer-XL attention (Dai et al. 2019, sec. 3.3) with segment-level memory.

      score(i, j) = (q_i + u)·k_j + (q_i + v)·W_r R_{i-j}      (times 1/sqrt(head_dim))

  R: sinusoids of the distance (`positions.relative_sinusoids`), W_r: d -> H·dh without bias,
  u (`content_bias`), v (`position_bias`): learned [heads, head_dim] biases shared by all
  positions (initialised to zero: a fresh model starts from plain q·k plus the W_r term).
  The distance term is computed for all distances at once and aligned by
  `positions.rel_shift`.
  """

  def __init__(self, d_model: int, num_heads: int, head_dim: int | None = None, *,
               use_bias: bool = True, dropout: float = 0.0, init_scale: float = 1.0,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    super().__init__(d_model, num_heads, head_dim, rotary=False, use_bias=use_bias,
                     dropout=dropout, init_scale=init_scale, dtype=dtype,
                     param_dtype=param_dtype, rngs=rngs)
    h, k = self.num_heads, self.head_dim
    self.r_proj = common.param(rngs, common.fan_in_normal(d_model, init_scale),
                               (d_model, h, k), ('embed', 'heads', 'kv'), param_dtype)
    zeros = nnx.initializers.zeros
    self.content_bias = common.param(rngs, zeros, (h, k), ('heads', 'kv'), param_dtype)
    self.position_bias = common.param(rngs, zeros, (h, k), ('heads', 'kv'), param_dtype)

  def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None, memory: jax.Array | None = None,
               memory_mask: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
    """x: [batch, qlen, d_model]; memory: [batch, mlen, d_model] (already LayerNormed, no
    gradient) or None; memory_mask: [batch, mlen] bool, False for empty slots (None: all
    full). `positions` is ignored: only distances matter."""
    del positions
    x = x.astype(self.dtype)
    qlen = x.shape[1]
    context = x if memory is None else jnp.concatenate([memory.astype(self.dtype), x], axis=1)
    mlen = context.shape[1] - qlen
    klen = context.shape[1]
    q = self._project(x, self.q_proj, self.q_bias).astype(jnp.float32)
    k = self._project(context, self.k_proj, self.k_bias).astype(jnp.float32)
    v = self._project(context, self.v_proj, self.v_bias)
    rel = positions_lib.relative_sinusoids(klen, self.d_model, jnp.float32)
    r = jnp.einsum('rd,dhk->rhk', rel, self.r_proj[...].astype(jnp.float32))
    u = self.content_bias[...].astype(jnp.float32)
    v_pos = self.position_bias[...].astype(jnp.float32)
    content = jnp.einsum('bqhk,bthk->bhqt', q + u, k)
    position = jnp.einsum('bqhk,rhk->bhqr', q + v_pos, r)
    scores = (content + positions_lib.rel_shift(position)) * self.head_dim ** -0.5
    mask = attention_mask(segment_ids, qlen, mlen, memory_mask)
    heads = softmax_attend(scores, mask, v, self.dropout_rate, deterministic, self.rngs)
    return self._output(heads)

  def cost(self, context_length: int, query_length: int | None = None) -> common.Cost:
    """As `Attention.cost`, plus the position scores (q+v)·W_r R (2·L_ctx·H·dh) and the
    projection W_r R of the L_ctx encodings, shared by the `query_length` queries of a segment
    (2·d·H·dh·L_ctx/query_length per token; query_length defaults to context_length)."""
    base = super().cost(context_length)
    inner = self.num_heads * self.head_dim
    query_length = query_length or context_length
    flops = dict(base.flops)
    flops['attn_relative'] = (2 * context_length * inner
                              + 2 * self.d_model * inner * context_length / query_length)
    return common.Cost(flops=flops, active_params=base.active_params + self.d_model * inner
                       + 2 * inner)
