"""Product-key memory (Lample et al. 2019), with the Csordás et al. (2023) variant.

A memory of num_keys**2 value rows addressed by product keys: each head's query is split in
two halves, each half is scored against its own num_keys sub-keys, and slot (i, j) scores
s1[i] + s2[j]. Slot (i, j) reads value row i * num_keys + j of one table shared by all heads.

Sparse mode (knn < num_keys; Lample et al.'s product search), per head:

    q = BatchNorm(x @ w_query)          [t, heads, k_dim]   (Csordás: q = x, every head)
    s1 = q[:k/2] . keys1, s2 = q[k/2:] . keys2              [t, heads, num_keys]
    top-knn of s1 + s2 over the num_keys**2 pairs           [t, heads, knn] scores, slots
    w = softmax (per head or jointly over heads*knn) or relu of the selected scores
    y = sum_h sum_k w[h, k] * values[slot[h, k]]            [t, d_model]

Dense mode (the authors' code when knn >= num_keys; their paper settings all take it): every
slot is scored, heads summed *before* the activation, no top-k:

    y = act(sum_h s1_h (+) s2_h) @ values,  (a (+) b)[i*num_keys + j] = a[i] + b[j]

No LayerNorm inside: the block's pre-LN normalises x. Scoring runs in float32 (like a router).
The math is in pkm_ops: the product search (top-knn/2 of each half, then one top-knn of ~2
num_keys + knn candidates, exact) and the value read (a gather-reduce with a hand-written VJP;
neither pass materialises the [t, s, d] rows). Where a platform registers faster kernels for
them (moescale.cpu on XLA:CPU), 'auto' uses those (`kernel_registry`; `kernels='xla'` keeps
XLA's ops).

Einsum letters: t tokens (batch*length), d d_model, h heads, k half key dim (k_dim/2),
n num_keys, s selected slots per token (heads*knn), r value rows (num_keys**2).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from moescale import kernel_registry
from moescale.layers import common, pkm_ops, registry
from moescale.layers.pkm_ops import (  # noqa: F401  (re-exported)
    candidate_pairs, gather_values, masked_batch_norm, product_key_topk, score_weights)

_SCORE_FNS = ('softmax', 'relu')
_NORMALIZE = ('auto', 'per_head', 'joint')
_VALUE_INITS = ('normal', 'scaled_normal', 'csordas')
_KEY_INITS = ('xlm', 'csordas')
_MODES = ('auto', 'sparse', 'dense')


def _check_arguments(d_model, num_heads, num_keys, knn, k_dim, query_proj, query_batchnorm,
                     query_bias, num_layers, value_chunk_size, rates, **choices):
  """A ValueError naming every bad ProductKeyMemory argument and what would be valid."""
  common.check_positive(d_model=d_model, num_heads=num_heads, num_keys=num_keys, knn=knn,
                        k_dim=k_dim)
  if k_dim % 2:
    raise ValueError(f'k_dim={k_dim!r} must be even (two query halves of k_dim/2)')
  if not query_proj and k_dim != d_model:
    raise ValueError(f'k_dim={k_dim!r} must equal d_model={d_model} without a query '
                     'projection (the query is the input itself)')
  if knn > num_keys ** 2:
    raise ValueError(f'knn={knn!r} must be <= num_keys**2={num_keys ** 2}')
  valid = dict(score_fn=_SCORE_FNS, normalize=_NORMALIZE, value_init=_VALUE_INITS,
               key_init=_KEY_INITS, mode=_MODES, kernels=kernel_registry.NAMES)
  for name, value in choices.items():
    if value not in valid[name]:
      raise ValueError(f'unknown {name} {value!r}; valid: {list(valid[name])}')
  if query_batchnorm and not query_proj:
    raise ValueError('query_batchnorm=True needs query_proj=True (Csordás et al.\'s variant '
                     'queries with the LayerNormed input, no BatchNorm)')
  if query_bias and not query_proj:
    raise ValueError('query_bias=True needs query_proj=True (without a query network the '
                     'query is the input itself)')
  scaled = [f'{k}={v!r}' for k, v in choices.items()
            if (k, v) in (('value_init', 'csordas'), ('value_init', 'scaled_normal'),
                          ('key_init', 'csordas'))]
  if scaled and not (num_layers and num_layers > 0):
    raise ValueError(f"{', '.join(scaled)} needs num_layers > 0 (c = sqrt(2/num_layers)), "
                     f'got {num_layers!r}')
  bad = {k: v for k, v in rates.items() if not 0.0 <= v < 1.0}
  if bad:
    raise ValueError(', '.join(f'{k}={v!r} must be in [0, 1)' for k, v in bad.items()))
  if value_chunk_size is not None:
    common.check_positive(value_chunk_size=value_chunk_size)


@registry.register_family
class ProductKeyMemory(nnx.Module):
  """PKM sublayer: `y, aux = ProductKeyMemory(d_model, num_keys=..., knn=...)(x)` (no losses).

  Args:
    d_model: model width d (also the value width).
    num_heads: memory heads H (each with its own sub-keys; one value table for all).
    num_keys: sub-keys per half; the memory has num_keys**2 value rows.
    knn: slots selected per head (sparse mode), 1 <= knn <= num_keys**2.
    k_dim: query width per head (even; two halves of k_dim/2). Default d_model; must be
      d_model without a query projection.
    score_fn: 'softmax' (Lample et al.) or 'relu' (Csordás et al.'s improvement).
    query_proj: Lample et al.'s query network d -> H*k_dim.
      False: Csordás et al.'s variant, every head queries with the (pre-LN'd) input itself.
    query_batchnorm: BatchNorm on the query features (batch statistics over real tokens in
      training, running averages when deterministic). None: on iff query_proj.
    query_bias: a bias on the query network, as XLM's (a Linear with bias), init as PyTorch's
      U(-1/sqrt(d), 1/sqrt(d)). None: on iff query_proj without BatchNorm; with BatchNorm
      the bias is left out because BatchNorm subtracts it again (training and eval alike).
    normalize: softmax 'per_head' over knn, or 'joint' over heads*knn; 'auto' is per head
      with a query projection, joint without (as each paper does). Irrelevant for relu.
    value_init: 'normal' N(0, 1/d_model) (XLM); 'scaled_normal' N(0, c**2/d_model), the
      default of Csordás et al.'s code (`pkm.custom_init: 0`); 'csordas' N(0, c**2/num_keys**2),
      their proposed init (`custom_init: 5`); c = sqrt(2/num_layers) (needs num_layers).
    key_init: 'xlm' U(-1/sqrt(k_dim/2), 1/sqrt(k_dim/2)) (XLM), or 'csordas' N(0, c**2/d_model)
      as Csordás et al.'s code (needs num_layers).
    mode: 'sparse' (product search), 'dense' (score all slots, heads summed), or 'auto':
      dense iff knn >= num_keys, as in the authors' code.
    input_dropout, query_dropout: dropout on x and on the query (Lample et al.).
    dropout: dropout on the value weights (the PKM analogue of hidden-unit dropout).
    value_dropout: dropout on the output.
    batchnorm_momentum, batchnorm_eps: running average keeps momentum of the old value
      (0.9 = PyTorch's momentum 0.1 that XLM uses); eps inside the rsqrt.
    value_chunk_size: tokens per step of the sparse value read's backward pass (see
      pkm_ops.gather_values); None: its default.
    kernels: what runs the sparse search's top-k and the value read: 'xla' (XLA's ops), a
      platform's ('cpu': moescale's C++ kernels for XLA:CPU), or 'auto' (the platform's where
      they apply: see moescale.kernel_registry). Same results either way.
    dtype: compute dtype of the value read; param_dtype: storage dtype.
  """

  def __init__(self, d_model: int, num_heads: int = 4, *, num_keys: int, knn: int,
               k_dim: int | None = None, score_fn: str = 'softmax', query_proj: bool = True,
               query_batchnorm: bool | None = None, query_bias: bool | None = None,
               normalize: str = 'auto',
               value_init: str = 'normal', key_init: str = 'xlm', num_layers: int | None = None,
               mode: str = 'auto',
               input_dropout: float = 0.0, query_dropout: float = 0.0, dropout: float = 0.0,
               value_dropout: float = 0.0, batchnorm_momentum: float = 0.9,
               batchnorm_eps: float = 1e-5, value_chunk_size: int | None = None,
               kernels: str = 'auto', dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    k_dim = d_model if k_dim is None else k_dim
    if query_batchnorm is None:
      query_batchnorm = query_proj
    if query_bias is None:
      query_bias = query_proj and not query_batchnorm
    rates = dict(input_dropout=input_dropout, query_dropout=query_dropout, dropout=dropout,
                 value_dropout=value_dropout)
    _check_arguments(d_model, num_heads, num_keys, knn, k_dim, query_proj, query_batchnorm,
                     query_bias, num_layers, value_chunk_size, rates, score_fn=score_fn,
                     normalize=normalize, value_init=value_init, key_init=key_init, mode=mode,
                     kernels=kernels)

    self.d_model, self.num_heads, self.num_keys, self.knn = d_model, num_heads, num_keys, knn
    self.k_dim = k_dim
    self.score_fn = score_fn
    self.joint = normalize == 'joint' or (normalize == 'auto' and not query_proj)
    self.mode = mode if mode != 'auto' else ('dense' if knn >= num_keys else 'sparse')
    self.rates = rates
    self.batchnorm_momentum, self.batchnorm_eps = batchnorm_momentum, batchnorm_eps
    self.value_chunk_size = value_chunk_size
    self.kernels = kernels
    self.dtype = dtype
    # Scores are routing decisions: at least float32 (float64 stays float64 for grad checks).
    self.score_dtype = jnp.promote_types(jnp.float32, dtype)

    self._init_params(num_keys, k_dim, query_proj, query_batchnorm, query_bias,
                      (key_init, value_init), num_layers, param_dtype, rngs)
    self.rngs = rngs if any(v > 0 for v in rates.values()) else None

  def _init_params(self, num_keys, k_dim, query_proj, query_batchnorm, query_bias, inits,
                   num_layers, param_dtype, rngs):
    """The query network and BatchNorm (Lample et al.), both halves' sub-keys, the values."""
    d_model, h, half = self.d_model, self.num_heads, k_dim // 2
    self.w_query = (common.param(rngs, common.fan_in_normal(d_model), (d_model, h, k_dim),
                                 ('embed', 'heads', 'kv'), param_dtype) if query_proj else None)
    self.b_query = (common.param(rngs, common.uniform(1.0 / math.sqrt(d_model)), (h, k_dim),
                                 ('heads', 'kv'), param_dtype) if query_bias else None)
    if query_batchnorm:
      self.bn_scale = common.param(rngs, nnx.initializers.ones, (h, k_dim), ('heads', 'kv'),
                                   param_dtype)
      self.bn_bias = common.param(rngs, nnx.initializers.zeros, (h, k_dim), ('heads', 'kv'),
                                  param_dtype)
      stat = lambda v: nnx.BatchStat(v, out_sharding=('heads', 'kv'), eager_sharding=False)
      stat_dtype = jnp.promote_types(jnp.float32, param_dtype)
      self.bn_mean = stat(jnp.zeros((h, k_dim), stat_dtype))
      self.bn_var = stat(jnp.ones((h, k_dim), stat_dtype))
    else:
      self.bn_scale = self.bn_bias = self.bn_mean = self.bn_var = None
    key_init, value_init = inits
    self.key_init, self.value_init, self.num_layers = key_init, value_init, num_layers
    c = common.depth_scale(num_layers) if num_layers else 1.0
    # XLM's sub-key init: U(-1/sqrt(k_dim/2), 1/sqrt(k_dim/2)), independent per head and half.
    keys = (common.uniform(1.0 / math.sqrt(half)) if key_init == 'xlm'
            else common.normal(c / math.sqrt(d_model)))
    self.keys1 = common.param(rngs, keys, (h, num_keys, half), ('heads', 'keys', 'kv'),
                              param_dtype)
    self.keys2 = common.param(rngs, keys, (h, num_keys, half), ('heads', 'keys', 'kv'),
                              param_dtype)
    rows = num_keys ** 2
    std = {'normal': 1.0 / math.sqrt(d_model), 'scaled_normal': c / math.sqrt(d_model),
           'csordas': c / math.sqrt(rows)}[value_init]
    self.values = common.param(rngs, common.normal(std), (rows, d_model), ('values', 'embed'),
                               param_dtype)

  def _query(self, x: jax.Array, mask: jax.Array, deterministic: bool) -> jax.Array:
    """x [t, d] -> q [t, heads, k_dim] in the score dtype."""
    x = x.astype(self.score_dtype)
    if self.w_query is None:
      return jnp.broadcast_to(x[:, None, :], (x.shape[0], self.num_heads, self.d_model))
    q = jnp.einsum('td,dhk->thk', x, self.w_query[...].astype(self.score_dtype))
    if self.b_query is not None:
      q = q + self.b_query[...].astype(self.score_dtype)
    if self.bn_scale is None:
      return q
    if deterministic:
      q = (q - self.bn_mean[...]) * jax.lax.rsqrt(self.bn_var[...] + self.batchnorm_eps)
    else:
      q, mean, var = masked_batch_norm(q, mask, self.batchnorm_eps)
      # Running variance is unbiased, as PyTorch's BatchNorm1d (which XLM uses) keeps it.
      n = mask.sum()
      var = var * n / jnp.maximum(n - 1, 1)
      mom = self.batchnorm_momentum
      keep = n > 0  # an all-padding batch leaves the running statistics alone
      sg = jax.lax.stop_gradient
      for stat, batch in ((self.bn_mean, mean), (self.bn_var, var)):
        old = stat[...]
        stat[...] = jnp.where(keep, mom * old + (1 - mom) * sg(batch), old).astype(old.dtype)
    return q * self.bn_scale[...].astype(q.dtype) + self.bn_bias[...].astype(q.dtype)

  def _half_scores(self, x: jax.Array, mask: jax.Array,
                   deterministic: bool) -> tuple[jax.Array, jax.Array]:
    """x [t, d] -> sub-key scores s1, s2 [t, heads, num_keys] in the score dtype."""
    h, n, half, sd = self.num_heads, self.num_keys, self.k_dim // 2, self.score_dtype
    if self.w_query is None and (deterministic or self.rates['query_dropout'] == 0):
      # Every head queries with x itself: one [t, d/2] x [d/2, heads*num_keys] matmul per half
      # rather than broadcasting x to [t, heads, d] (half the time of the einsum, fwd + bwd).
      x = x.astype(sd)
      score = lambda xs, keys: (xs @ keys[...].astype(sd).reshape(h * n, half).T).reshape(-1, h, n)
      return score(x[:, :half], self.keys1), score(x[:, half:], self.keys2)
    q = self._query(x, mask, deterministic)
    q = common.dropout(q, self.rates['query_dropout'], deterministic, self.rngs)
    s1 = jnp.einsum('thk,hnk->thn', q[..., :half], self.keys1[...].astype(sd))
    s2 = jnp.einsum('thk,hnk->thn', q[..., half:], self.keys2[...].astype(sd))
    return s1, s2

  def __call__(self, x: jax.Array, *, deterministic: bool = True,
               segment_ids: jax.Array | None = None) -> tuple[jax.Array, common.Aux]:
    """x: [batch, length, d_model] -> (y [batch, length, d_model], aux); padding tokens give
    0. No losses; the metric `value_usage` (fraction of value rows read)."""
    b, l, d = x.shape
    mask = common.token_mask(segment_ids, (b, l)).reshape(-1)
    x = common.dropout(x, self.rates['input_dropout'], deterministic, self.rngs)
    s1, s2 = self._half_scores(x.reshape(b * l, d), mask, deterministic)

    if self.mode == 'dense':
      # Heads summed before the activation: sum_h (s1_h (+) s2_h) = (sum_h s1_h) (+) (sum_h s2_h).
      # (Without a query projection the heads share q, so this is one head with keys summed
      # over heads: redundant parameters, but what the authors' code computes.)
      # Explicit sizes, no -1: reshape cannot infer one when b * l = 0.
      z = (s1.sum(1)[:, :, None] + s2.sum(1)[:, None, :]).reshape(b * l, self.num_keys ** 2)
      w = jax.nn.softmax(z, axis=-1) if self.score_fn == 'softmax' else jax.nn.relu(z)
      w = common.dropout(w, self.rates['dropout'], deterministic, self.rngs)
      w = jnp.where(mask[:, None], w, 0)
      y = jnp.einsum('tr,rd->td', w.astype(self.dtype), self.values[...].astype(self.dtype))
      used = jnp.any(w != 0, axis=0)
    else:
      kernels = kernel_registry.select('pkm', self.kernels, pkm_ops.XLA)   # while tracing
      scores, idx = product_key_topk(s1, s2, self.knn, kernels=kernels)      # [t, h, knn]
      w = score_weights(scores, self.score_fn, self.joint)
      w = common.dropout(w, self.rates['dropout'], deterministic, self.rngs)
      slots = self.num_heads * self.knn      # not -1: b * l may be 0
      w = jnp.where(mask[:, None, None], w, 0).reshape(b * l, slots)
      idx = idx.reshape(b * l, slots)
      y = gather_values(self.values[...], idx, w, self.dtype, self.value_chunk_size, kernels)
      hits = jnp.zeros((self.num_keys ** 2,), jnp.int32).at[idx.reshape(-1)].add(
          (w != 0).reshape(-1).astype(jnp.int32))
      used = hits > 0
    y = common.dropout(y, self.rates['value_dropout'], deterministic, self.rngs)
    metrics = {'value_usage': jax.lax.stop_gradient(used.mean())}
    return y.reshape(b, l, d).astype(self.dtype), common.Aux({}, metrics)

  def cost(self) -> common.Cost:
    """Forward FLOPs per token (2 per MAC; top-k, softmax and BatchNorm not counted) and the
    parameters a token touches (sparse: at most H*knn value rows; dense: all of them)."""
    d, h, k, n = self.d_model, self.num_heads, self.k_dim, self.num_keys
    flops, params = {}, 0
    if self.w_query is not None:
      flops['query'] = 2 * d * h * k
      params += d * h * k
    if self.b_query is not None:
      params += h * k
    if self.bn_scale is not None:
      params += 2 * h * k
    flops['keys'] = 2 * h * n * k  # both halves: 2 * h * n * (k/2) MACs each
    params += h * n * k
    if self.mode == 'dense':
      flops['slot_sum'] = n * n
      flops['values'] = 2 * n * n * d
      params += n * n * d
    else:
      rows = min(h * self.knn, n * n)
      flops['values'] = 2 * h * self.knn * d
      params += rows * d
    return common.Cost(flops=flops, active_params=params, category='pkm')
