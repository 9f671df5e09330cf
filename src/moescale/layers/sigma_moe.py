"""σ-MoE: the sigmoid-gated mixture of experts of Csordás, Irie and Schmidhuber (2023).

    s = sigmoid(x @ w_router)                       [tokens, num_experts]   (float32)
    E(x) = top_k experts of s                       (expert dropout masks s before top-k)
    y = sum_{e in E(x)} s_e * relu(x @ w_in[e]) @ w_out[e]

No biases, no capacity, no token dropping: every real token reaches exactly `top_k` experts
(fewer only when expert dropout masked all but a few), and the combine weights are the raw
sigmoid scores, never renormalised. Ablations: `selection='softmax'` (softmax over all experts
before top-k, no renormalisation) and `'softmax_renorm'` (softmax over the k selected logits).
The entropy regulariser -H(p̄), p̄ = batch mean of softmax(x @ w_router), keeps the experts
in use.

Paper names -> code: W1 = w_in [e, d, f], W2 = w_out [e, f, d], W3 = w_router [d, e], N_E =
num_experts, G = expert_size, K = top_k, δ = expert_dropout.

Einsum letters: t tokens (batch * length, flattened), j choice (0..k-1), e expert, d d_model,
f expert_size.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from moescale.layers import common, registry
from moescale.layers import dispatch as dispatch_lib

Array = jax.Array
router_logits = common.router_logits  # the routers' shared scoring (also the top-k MoE's)

SELECTIONS = ('sigmoid', 'softmax', 'softmax_renorm')
INITS = ('csordas', 'standard')


def _check_choice(what: str, value, valid) -> None:
  if value not in valid:
    raise ValueError(f'unknown {what} {value!r}; valid: {list(valid)}')


# ----------------------------------------------------------------------------------- routing


def expert_dropout_mask(key: Array, shape, rate: float) -> Array:
  """[t, e] bool, True = keep: each expert is masked per token with probability `rate`."""
  return jax.random.bernoulli(key, 1.0 - rate, tuple(shape))


def _masked_softmax(logits: Array, keep: Array) -> Array:
  """Softmax over the last axis of the kept entries only; 0 where not kept, all 0 if none kept.

  Masked entries are replaced by the row max before exp (not -inf): a large masked logit would
  otherwise overflow, and `where` turns inf into NaN gradients.
  """
  m = jnp.max(jnp.where(keep, logits, -jnp.inf), axis=-1, keepdims=True)
  m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  e = jnp.where(keep, jnp.exp(jnp.where(keep, logits, m) - m), 0.0)
  return e / jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), jnp.finfo(logits.dtype).tiny)


def select_experts(logits: Array, top_k: int, selection: str = 'sigmoid',
                   keep: Array | None = None,
                   token_mask: Array | None = None) -> tuple[Array, Array]:
  """Chooses `top_k` experts per token and their combine weights.

  Args:
    logits: [t, e] router logits x @ w_router.
    top_k: experts per token K.
    selection: 'sigmoid' (s = sigmoid(logits), weights = s of the chosen, the paper's σ-MoE),
      'softmax' (s = softmax over all experts, weights = s of the chosen, no renormalisation) or
      'softmax_renorm' (weights = softmax over the chosen logits only).
    keep: [t, e] bool expert-dropout mask (True = keep) or None. A masked expert's score is 0:
      it ranks below every kept one, and if it is still picked (fewer than K kept) it gets
      weight 0 and the sentinel index, so it is never computed and nothing is rescaled.
    token_mask: [t] bool, False for padding: all k choices get the sentinel and weight 0.

  Returns:
    expert_index: [t, k] int32 in [0, e], e (= num_experts) being the "not computed" sentinel.
    weights: [t, k] float32 (the dtype of logits), 0 wherever expert_index is the sentinel.
  """
  _check_choice('selection', selection, SELECTIONS)
  num_experts = logits.shape[-1]
  if not 0 < top_k <= num_experts:
    raise ValueError(f'top_k={top_k!r} must be in [1, num_experts={num_experts}]')
  # Ranking on the logits equals ranking on sigmoid or softmax scores (both monotone in the
  # logit per token) but does not tie where sigmoid saturates to 1.0 in float32.
  ranked = logits if keep is None else jnp.where(keep, logits, -jnp.inf)
  _, expert_index = jax.lax.top_k(jax.lax.stop_gradient(ranked), top_k)      # [t, k]
  chosen = jnp.take_along_axis(logits, expert_index, axis=-1)                 # [t, k]
  picked = (jnp.ones(chosen.shape, bool) if keep is None
            else jnp.take_along_axis(keep, expert_index, axis=-1))
  if selection == 'sigmoid':
    weights = jax.nn.sigmoid(chosen)
  elif selection == 'softmax':
    # Softmax over *all* experts, masked or not: dropout zeroes scores, it does not renormalise.
    weights = jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), expert_index, axis=-1)
  else:
    weights = _masked_softmax(chosen, picked)
  if token_mask is not None:
    picked = picked & token_mask[:, None]
  expert_index = jnp.where(picked, expert_index, num_experts).astype(jnp.int32)
  weights = jnp.where(picked, weights, jnp.zeros_like(weights))
  return expert_index, weights


# --------------------------------------------------------------------------- losses, metrics


def _masked_log_softmax(logits: Array, token_mask: Array | None) -> tuple[Array, Array]:
  """log_softmax [t, e] with padding rows at a huge finite negative, and the real-token count."""
  logp = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), -1)
  if token_mask is None:
    return logp, jnp.asarray(logits.shape[0], logp.dtype)
  # Finite, not -inf: an all-padding batch then gives p̄ = 0 and loss 0 without NaN gradients.
  logp = jnp.where(token_mask[:, None], logp, jnp.finfo(logp.dtype).min)
  return logp, jnp.sum(token_mask).astype(logp.dtype)


def entropy_regularizer(logits: Array, token_mask: Array | None = None) -> Array:
  """-H(p̄) = sum_e p̄_e log p̄_e with p̄ = mean over real tokens of softmax(logits).

  The softmax of the raw logits, although σ-MoE gates with sigmoid (as in the paper). In log
  space: log p̄ = logsumexp_t(log_softmax) - log(num real tokens). Minimising it spreads the
  batch's probability mass over all experts. Padding rows (token_mask False) are excluded.
  """
  logp, n = _masked_log_softmax(logits, token_mask)
  # Floored at the dtype's lowest finite value: with no tokens at all (t = 0) logsumexp over
  # the empty axis is -inf, and p̄ log p̄ would be 0 * -inf = NaN (the floor gives 0, as an
  # all-padding batch does). A no-op for any t > 0: every logp is already >= that value.
  lse = jnp.maximum(jax.nn.logsumexp(logp, axis=0), jnp.finfo(logp.dtype).min)
  log_mean = lse - jnp.log(jnp.maximum(n, 1.0))   # [e]
  return jnp.sum(jnp.exp(log_mean) * log_mean)


def batch_statistics(logits: Array, token_mask: Array | None = None) -> dict[str, Array]:
  """The entropy regulariser's view of a batch, as sums that add across microbatches:
  'prob_sum' [e] = sum over real tokens of softmax(logits), 'tokens' = their count."""
  logp, n = _masked_log_softmax(logits, token_mask)
  return {'prob_sum': jnp.sum(jnp.exp(logp), axis=0), 'tokens': n}


def entropy_from_statistics(stats: dict[str, Array]) -> Array:
  """-H(p̄), p̄ = prob_sum / tokens: `entropy_regularizer` of the tokens the sums came from
  (equal to float rounding), for a batch seen in pieces. No tokens: 0."""
  p = stats['prob_sum'] / jnp.maximum(stats['tokens'], 1.0)
  # p log p -> 0 as p -> 0; the floor keeps log (and its gradient) finite at an exact 0.
  return jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.maximum(p, jnp.finfo(p.dtype).tiny)), 0.0))


def router_entropy(logits: Array, token_mask: Array | None = None) -> Array:
  """Mean over real tokens of the per-token entropy of softmax(logits): how peaked routing is."""
  logp, n = _masked_log_softmax(logits, token_mask)
  per_token = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
  return jnp.sum(per_token) / jnp.maximum(n, 1.0)


def expert_usage(expert_index: Array, num_experts: int) -> Array:
  """[e] fraction of the computed (non-sentinel) assignments that went to each expert."""
  counts = jnp.sum(jax.nn.one_hot(expert_index, num_experts + 1, dtype=jnp.float32), (0, 1))
  return counts[:num_experts] / jnp.maximum(jnp.sum(counts[:num_experts]), 1.0)


# ------------------------------------------------------------------------------ initialisation


def csordas_scale(num_layers: int | None) -> float:
  """c = sqrt(2 / num_layers) for a pre-LN stack; 1.0 when the depth is not given."""
  return 1.0 if num_layers is None else common.depth_scale(num_layers)


def csordas_init(d_model: int, num_experts: int, expert_size: int,
                 num_layers: int | None = None, init: str = 'csordas') -> dict[str, float]:
  """Initial standard deviations {'w_in', 'w_out', 'w_router'}.

  'csordas': w_in ~ N(0, c²/d); w_out ~ N(0, c²/(N_E·G)), the fan-in of the whole dense layer
  the MoE approximates (all N_E·G hidden units), so the output scale matches a dense FFN of equal
  parameters rather than growing with the number of experts; w_router ~ N(0, c²/d).
  'standard': as above but w_out fan-in is one expert's G.
  """
  _check_choice('init', init, INITS)
  c = csordas_scale(num_layers)
  fan_in_out = num_experts * expert_size if init == 'csordas' else expert_size
  return {'w_in': c / math.sqrt(d_model), 'w_out': c / math.sqrt(fan_in_out),
          'w_router': c / math.sqrt(d_model)}


def equalize_column_norms(w: Array) -> Array:
  """[d, e] -> every column (one expert's selection vector) rescaled to the same L2 norm.

  The common norm is the RMS of the column norms, which keeps sum(w**2), i.e. the overall std,
  unchanged. Equal norms mean no expert starts out favoured by the router.
  """
  norms = jnp.linalg.norm(w, axis=0, keepdims=True)
  target = jnp.sqrt(jnp.mean(norms ** 2))
  return w * (target / norms)


def balanced_router_init(stddev: float) -> common.Initializer:
  """N(0, stddev²) followed by `equalize_column_norms` (computed in float32)."""
  def init(key, shape, dtype=jnp.float32):
    w = jax.random.normal(key, shape, jnp.float32) * stddev
    return equalize_column_norms(w).astype(dtype)
  return init


# ---------------------------------------------------------------------------------- the module


@registry.register_family
class SigmaMoE(nnx.Module):
  """σ-MoE sublayer: `y, aux = SigmaMoE(d_model, num_experts, expert_size, top_k, ...)(x)`.

  Args:
    d_model: model width d.
    num_experts: N_E.
    expert_size: G, hidden units per expert.
    top_k: K experts per token (1 <= K <= N_E).
    expert_dropout: δ, per-token probability of masking each expert's score before top-k
      (training only; needs a 'dropout' stream in rngs).
    selection: 'sigmoid' (the paper's σ-MoE) | 'softmax' | 'softmax_renorm' (ablations).
    init: 'csordas' (w_out fan-in N_E·G) | 'standard' (w_out fan-in G).
    entropy_weight: γ, weight of the entropy regulariser in the training objective (Csordás
      et al.: 1e-3 on WikiText-103, 1e-4 on enwik8; 0: off).
    num_layers: depth of the model, for c = sqrt(2/num_layers) in the init. None (default)
      means the depth is unknown and c = 1 (the plain fan-in init; same as num_layers=2).
    activation: 'relu' (paper) | 'gelu' | 'gelu_tanh' | 'silu'.
    dispatch: expert backend name, with options after colons (or an instance); 'auto' picks
      by the platform the program is built for (`layers.dispatch`).
    expert_exchange, exchange_capacity_factor: under a mesh with an 'expert' axis > 1, how
      tokens reach the experts of other devices ('ring' or 'all_to_all', the latter optionally
      capacity-bounded; `layers.expert_parallel`).
    dtype: compute dtype of the experts; the router always computes in float32.
    param_dtype: storage dtype of the parameters.
  """

  def __init__(self, d_model: int, num_experts: int, expert_size: int, top_k: int, *,
               expert_dropout: float = 0.0, entropy_weight: float = 0.001,
               selection: str = 'sigmoid',
               init: str = 'csordas', num_layers: int | None = None,
               activation: str = 'relu',
               dispatch: str | dispatch_lib.DispatchBackend = 'auto',
               expert_exchange: str = 'ring', exchange_capacity_factor: float | None = None,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    common.check_routing(num_experts, top_k, d_model=d_model, expert_size=expert_size)
    if not 0.0 <= expert_dropout <= 1.0:
      raise ValueError(f'expert_dropout={expert_dropout!r} must be in [0, 1]')
    if entropy_weight < 0:
      raise ValueError(f'entropy_weight={entropy_weight!r} must be >= 0')
    if num_layers is not None:
      common.check_positive(num_layers=num_layers)
    _check_choice('selection', selection, SELECTIONS)
    _check_choice('init', init, INITS)
    self.d_model, self.num_experts, self.expert_size, self.top_k = (
        d_model, num_experts, expert_size, top_k)
    self.expert_dropout, self.entropy_weight = expert_dropout, entropy_weight
    self.selection, self.init, self.num_layers = selection, init, num_layers
    self.activation = activation
    self.act = common.activation_fn(activation)
    # Resolved now: an unknown backend or exchange fails here, not at the first call.
    self.dispatch = dispatch_lib.Dispatch(dispatch, expert_exchange, exchange_capacity_factor)
    self.dtype = dtype
    std = csordas_init(d_model, num_experts, expert_size, num_layers, init)
    self.w_in = common.param(rngs, common.normal(std['w_in']),
                             (num_experts, d_model, expert_size),
                             ('expert', 'embed', 'mlp'), param_dtype)
    self.w_out = common.param(rngs, common.normal(std['w_out']),
                              (num_experts, expert_size, d_model),
                              ('expert', 'mlp', 'embed'), param_dtype)
    self.w_router = common.param(rngs, balanced_router_init(std['w_router']),
                                 (d_model, num_experts), ('embed', 'expert'), param_dtype)
    self.rngs = rngs if expert_dropout > 0 else None

  def __call__(self, x: Array, *, deterministic: bool = True,
               segment_ids: Array | None = None) -> tuple[Array, common.Aux]:
    """x: [batch, length, d_model] -> (y [batch, length, d_model], aux); padding rows give 0.

    aux.losses: `entropy` (-H(p̄)) times entropy_weight (left out at weight 0). aux.metrics:
    `entropy` unweighted, `expert_usage` [N_E] and `router_entropy`. aux.batch_stats (with
    entropy_weight > 0): `batch_statistics`, from which `batch_losses` gives aux.losses.
    """
    batch, length, d = x.shape
    if d != self.d_model:
      raise ValueError(f'x has d_model={d}, layer expects {self.d_model}')
    mask = common.token_mask(segment_ids, (batch, length)).reshape(-1)         # [t]
    x_flat = x.reshape(batch * length, d)                                      # [t, d]
    logits = router_logits(x_flat, self.w_router[...])                         # [t, e]
    x_flat = x_flat.astype(self.dtype)  # after the router, which sees x unrounded

    keep = None
    if not deterministic and self.expert_dropout > 0:
      if self.rngs is None:
        raise ValueError('expert_dropout > 0 in training needs rngs with a "dropout" stream')
      keep = expert_dropout_mask(self.rngs.dropout(), logits.shape, self.expert_dropout)
    expert_index, weights = select_experts(logits, self.top_k, self.selection, keep=keep,
                                           token_mask=mask)

    # Over the whole (global) batch, before expert dropout: it regularises the router itself.
    # The loss comes from sums a split batch adds up first (Aux.batch_stats), so it is the
    # whole batch's also under microbatching, as the paper defines it.
    stats = batch_statistics(logits, mask)
    aux = common.Aux(self.batch_losses(stats),
                     {'entropy': entropy_regularizer(logits, mask),
                      'expert_usage': expert_usage(expert_index, self.num_experts),
                      'router_entropy': router_entropy(logits, mask)},
                     batch_stats=stats if self.entropy_weight else {})

    experts = dispatch_lib.ExpertWeights(self.w_in[...].astype(self.dtype),
                                         self.w_out[...].astype(self.dtype))
    # Dropless: nothing was dropped for capacity. The hint is the true bound, t assignments per
    # expert (a token picks an expert at most once), so slot-based backends drop nothing either;
    # at least 1, the fewest slots those backends take (t = 0 tokens).
    y = self.dispatch(x_flat, expert_index, weights, experts, self.act,
                capacity=max(1, batch * length))
    return y.reshape(batch, length, d), aux

  def batch_losses(self, stats: dict[str, Array]) -> dict[str, Array]:
    """{'entropy': γ·(-H(p̄))} of the tokens `stats` (`batch_statistics`, summed) describe."""
    return common.weighted({'entropy': self.entropy_weight},
                           entropy=entropy_from_statistics(stats))

  def cost(self) -> common.Cost:
    """Forward FLOPs per token: the router d x N_E, and K experts of two d x G matmuls each."""
    d, e, g, k = self.d_model, self.num_experts, self.expert_size, self.top_k
    return common.Cost(flops={'router': 2 * d * e, 'experts': k * 2 * 2 * d * g},
                       active_params=d * e + k * 2 * d * g)
