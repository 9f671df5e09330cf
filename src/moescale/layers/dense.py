"""The dense two-layer FFN, optionally with Top-K activation (Csordás et al. 2023, sec. 3.1).

    h = act(x @ w_in + b_in)        [batch, length, d_ff]
    h = dropout(h)
    h = h * topk_mask(h)            only with topk_activation=K
    y = h @ w_out + b_out           [batch, length, d_model]

Einsum letters: b batch, l length, d d_model, f d_ff.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moescale import sharding as shd
from moescale.layers import common, registry


def topk_activation_mask(h: jax.Array, k: int) -> jax.Array:
  """Keeps the k largest entries of the last axis (ties with the k-th kept), zeroes the rest.

  The mask carries no gradient (it is a selection, not a function of h to differentiate):
  the gradient flows only through the kept activations, as in the authors' code.
  """
  if k >= h.shape[-1]:
    return h
  kth = jax.lax.top_k(h, k)[0][..., -1:]
  keep = jax.lax.stop_gradient(h >= kth)
  return jnp.where(keep, h, jnp.zeros_like(h))


@registry.register_family
class DenseFFN(nnx.Module):
  """Two-layer MLP sublayer: `y, aux = DenseFFN(d_model, d_ff, ...)(x)` (no losses).

  Args:
    d_model: model width d.
    d_ff: hidden width f.
    activation: 'relu' | 'gelu' | 'gelu_tanh' | 'silu'.
    use_bias: biases on both projections (fairseq GPT-3 models have them; Csordás et al. not).
    dropout: dropout rate on the hidden activations (training only).
    topk_activation: keep only the K largest hidden activations per token (after activation and
      dropout), or None for a plain FFN.
    init_scale: std of w_in is init_scale/sqrt(d_model), of w_out init_scale/sqrt(d_ff).
    dtype: compute dtype; param_dtype: storage dtype (float32 master weights by default).
  """

  def __init__(self, d_model: int, d_ff: int, *, activation: str = 'relu',
               use_bias: bool = False, dropout: float = 0.0,
               topk_activation: int | None = None, init_scale: float = 1.0,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    common.check_positive(d_model=d_model, d_ff=d_ff)
    if topk_activation is not None and not 0 < topk_activation <= d_ff:
      raise ValueError(f'topk_activation={topk_activation!r} must be in [1, d_ff={d_ff}] or None')
    self.d_model, self.d_ff = d_model, d_ff
    self.activation = activation
    self.act = common.activation_fn(activation)
    self.dropout_rate = dropout
    self.topk_activation = topk_activation
    self.dtype = dtype
    self.init_scale = init_scale
    self.w_in = common.param(rngs, common.fan_in_normal(d_model, init_scale),
                             (d_model, d_ff), ('embed', 'mlp'), param_dtype)
    self.w_out = common.param(rngs, common.fan_in_normal(d_ff, init_scale),
                              (d_ff, d_model), ('mlp', 'embed'), param_dtype)
    self.b_in = (common.param(rngs, nnx.initializers.zeros, (d_ff,), ('mlp',), param_dtype)
                 if use_bias else None)
    self.b_out = (common.param(rngs, nnx.initializers.zeros, (d_model,), ('embed',), param_dtype)
                  if use_bias else None)
    self.rngs = rngs if dropout > 0 else None

  def __call__(self, x: jax.Array, *, deterministic: bool = True,
               segment_ids: jax.Array | None = None) -> tuple[jax.Array, common.Aux]:
    """x: [batch, length, d_model] -> (y [batch, length, d_model], no aux). segment_ids are
    unused: a dense FFN treats every token alike, and padding rows are ignored by the loss."""
    del segment_ids
    x = x.astype(self.dtype)
    shape = x.shape
    # Plain 2-D matmuls on [batch·length, d]: XLA:CPU runs the 3-D einsums slower here.
    x2 = x.reshape(-1, self.d_model)
    h = x2 @ self.w_in[...].astype(self.dtype)
    if self.b_in is not None:
      h = h + self.b_in[...].astype(self.dtype)
    # The hidden units follow w_in's 'mlp' split (tensor parallelism): no gather before w_out.
    h = shd.constrain(self.act(h), ('act_batch', 'act_mlp'))
    h = common.dropout(h, self.dropout_rate, deterministic, self.rngs)
    if self.topk_activation is not None:
      h = topk_activation_mask(h, self.topk_activation)
    y = h @ self.w_out[...].astype(self.dtype)
    if self.b_out is not None:
      y = y + self.b_out[...].astype(self.dtype)
    return y.reshape(shape), common.no_aux()

  def cost(self) -> common.Cost:
    """Forward FLOPs per token: two matmuls d x f (Top-K activation saves nothing in a dense
    matmul; the top-k selection itself is not counted)."""
    matmul = 2 * self.d_model * self.d_ff
    biases = self.d_ff + self.d_model if self.b_in is not None else 0
    params = 2 * self.d_model * self.d_ff + biases
    return common.Cost(flops={'ffn_in': matmul, 'ffn_out': matmul}, active_params=params)
