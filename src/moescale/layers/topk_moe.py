"""Top-k mixture of experts with capacity: GShard / Switch / fairseq Top2Gate semantics.

    logits = x @ w_router                            [tokens, num_experts]   (float32)
    p = softmax(logits)                              expert 1 = argmax p, expert j = argmax of rest
    slots: cumsum in choice-major order              every 1st choice before any 2nd choice
    y = sum_{kept j} w_j * FFN_{e_j}(x)              w_j = p_{e_j} / sum_{kept} p (renormalize)

Tokens are flattened batch-major (s = b * length + t) and cut into groups of `group_size`
consecutive tokens; each group routes on its own with

    capacity = ceil(capacity_factor * top_k * group_size / num_experts)   slots per expert.

Slots go by a cumulative sum over the group's assignments in *choice-major* order: all first
choices in token order, then all second choices in token order, and so on. An assignment whose
slot is >= capacity is dropped (weight 0, expert index = num_experts, the dispatch sentinel).
Padding tokens (segment id 0) are never routed and take no slot, but capacity is computed from
the whole group, so padding does not shrink it. `capacity_factor <= 0` is dropless.

Worked example: 8 tokens, 4 experts, top-2, capacity_factor 1.0 -> capacity ceil(2*8/4) = 4.

    token          t0 t1 t2 t3 t4 t5 t6 t7
    1st choice      0  0  0  0  0  1  1  2
    2nd choice      1  1  2  3  1  0  2  3

    1st choices: e0 <- t0 t1 t2 t3 (slots 0-3), t4 (slot 4: dropped); e1 <- t5 t6; e2 <- t7.
    2nd choices: e1 <- t0 t1 (slots 2, 3), t4 (slot 4: dropped); e2 <- t2 t6 (slots 1, 2);
                 e3 <- t3 t7 (slots 0, 1); e0 <- t5 (slot 5: dropped).

t4 loses both choices: its output is 0 and it passes through the residual only. t5 keeps only
expert 1, whose weight renormalises to 1 (with renormalize=True). t4's second choice drops
although e1 had free slots when t4's *first* choice was considered: first choices go first.

Combine weights (g = softmax prob of the chosen expert):
  * top_k >= 2, renormalize=True (fairseq default): g_j / sum of the surviving g.
  * top_k >= 2, renormalize=False: the raw g_j.
  * normalize_before_dropping=True (fairseq option): g_j / sum over all top_k choices, computed
    before the random second-choice test and capacity dropping and not renormalised after.
  * top_k = 1 (Switch Transformer): always the raw softmax prob p_e of the chosen expert, never
    renormalised (renormalising would make it 1 and cut the router's gradient); renormalize and
    normalize_before_dropping do not apply.

Second-choice policies (training only; deterministic=True always behaves as 'all'):
  * 'all': keep every choice (what the released fairseq GPT-3-style MoE recipes use).
  * 'sampling': choices 2..k are argmax of logits + Gumbel noise (first choice untouched; gates
    stay the noiseless softmax probs).
  * 'random' (GShard): choice j >= 2 is kept only if 2 * g_j > U(0, 1), with g_j the raw prob,
    or the prob normalised over the top_k choices if normalize_before_dropping.

Randomness (router jitter, 'sampling', 'random'; training only) draws from the rngs stream
'gating' when the Rngs has one, else from 'dropout' (which nnx falls back to 'default' for).
In one call the jitter key is drawn first, then the policy key; the 'random' policy draws
U(0, 1) of shape [tokens, top_k - 1], 'sampling' Gumbel noise of shape [tokens, num_experts].

Einsum letters: t tokens (batch * length, flattened), j choice (0..k-1), e expert, d d_model,
f expert_size, g group, s token within a group.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from moescale.layers import common, registry
from moescale.layers import dispatch as dispatch_lib

Array = jax.Array

SECOND_POLICIES = ('all', 'sampling', 'random')


# ----------------------------------------------------------------------------------- routing
# The plain functions are jitted: called eagerly (a notebook, a test) each compiles as one
# program instead of one per op; under the model's jit they are simply inlined.


@jax.jit
def router_logits(x: Array, w_router: Array) -> Array:
  """x: [t, d], w_router: [d, e] -> logits [t, e] in float32 (float64 if x is float64).

  Routers compute in (at least) float32: argmax on bfloat16 logits ties and flips experts.
  """
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  return jnp.einsum('td,de->te', x.astype(dtype), w_router.astype(dtype))


def router_probs(logits: Array) -> Array:
  """[t, e] softmax over experts, in the logits' (float32 or wider) dtype."""
  return jax.nn.softmax(logits, axis=-1)


@functools.partial(jax.jit, static_argnames='top_k')
def top_k_choices(logits: Array, top_k: int,
                  second_choice_noise: Array | None = None) -> tuple[Array, Array]:
  """Expert 1 = argmax of the probs, expert j = argmax of the experts not yet chosen.

  Args:
    logits: [t, e] router logits.
    top_k: choices per token k.
    second_choice_noise: optional [t, e] noise (Gumbel for the 'sampling' policy) added to the
      logits when ranking choices 2..k only; the first choice and the gates ignore it.
  Returns:
    expert_index [t, k] int32 (distinct per token; ties go to the lower expert index) and
    gates [t, k], the softmax probs of the chosen experts.
  """
  probs = router_probs(logits)
  num_experts = logits.shape[-1]
  taken = jnp.zeros(logits.shape, dtype=bool)
  indices = []
  for j in range(top_k):
    score = logits if (j == 0 or second_choice_noise is None) else logits + second_choice_noise
    index = jnp.argmax(jnp.where(taken, -jnp.inf, score), axis=-1)
    taken = taken | jax.nn.one_hot(index, num_experts, dtype=bool)
    indices.append(index)
  expert_index = jnp.stack(indices, axis=-1).astype(jnp.int32)
  gates = jnp.take_along_axis(probs, expert_index, axis=-1)
  return expert_index, gates


@jax.jit
def normalize_gates(gates: Array) -> Array:
  """[t, k] -> g_j / sum_j g_j (zero rows stay zero): fairseq's denominator clamp at eps."""
  denom = jnp.sum(gates, axis=-1, keepdims=True)
  return gates / jnp.maximum(denom, jnp.finfo(gates.dtype).eps)


@jax.jit
def random_policy_keep(gates: Array, uniform: Array) -> Array:
  """GShard's random second choice: [t, k] bool, choice j >= 1 kept iff 2 * g_j > U_j.

  gates: [t, k] (raw probs, or normalised over the k choices for normalize_before_dropping).
  uniform: [t, k - 1] draws of U(0, 1), one per non-first choice. The first choice is always kept.
  """
  first = jnp.ones(gates.shape[:-1] + (1,), dtype=bool)
  return jnp.concatenate([first, 2.0 * gates[..., 1:] > uniform], axis=-1)


def capacity_for(capacity_factor: float, top_k: int, tokens_per_group: int,
                 num_experts: int) -> int | None:
  """ceil(capacity_factor * top_k * tokens_per_group / num_experts), or None (dropless) for
  capacity_factor <= 0. A 1e-9 slack keeps float error (1.2 * 2 * 10 / 4 = 6.000...01) from
  adding a slot."""
  if capacity_factor is None or capacity_factor <= 0:
    return None
  return max(1, math.ceil(capacity_factor * top_k * tokens_per_group / num_experts - 1e-9))


@functools.partial(jax.jit, static_argnames=('num_experts', 'capacity'))
def assign_slots(expert_index: Array, mask: Array, num_experts: int,
                 capacity: int | None) -> tuple[Array, Array]:
  """Slot of each assignment in its expert's buffer, by priority, and whether it fits.

  Priority is choice-major: every first choice (in token order) before any second choice. Done
  by a stable sort on the expert id instead of a one-hot cumsum, so memory is O(t * k), not
  O(t * k * e): rank within an expert = position in the sorted order - the expert's start.

  Args:
    expert_index: [t, k] int expert ids of one group.
    mask: [t, k] (or [t]) bool, False for assignments that must take no slot (padding tokens,
      second choices the 'random' policy dropped).
    num_experts: e.
    capacity: slots per expert, or None for no limit.
  Returns:
    slot_position [t, k] int32 (-1 where masked) and kept [t, k] bool (mask and slot < capacity).
  """
  t, k = expert_index.shape
  mask = jnp.broadcast_to(mask if mask.ndim == 2 else mask[:, None], (t, k))
  # Choice-major flattening: n = j * t + s. Masked assignments go to the sentinel expert.
  flat = jnp.where(mask, expert_index, num_experts).T.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  counts = jnp.bincount(flat, length=num_experts + 1)
  starts = jnp.cumsum(counts) - counts
  rank_sorted = jnp.arange(flat.shape[0], dtype=flat.dtype) - starts[flat[order]]
  rank = jnp.zeros_like(flat).at[order].set(rank_sorted.astype(flat.dtype))
  slot_position = jnp.where(mask, rank.reshape(k, t).T, -1).astype(jnp.int32)
  kept = mask if capacity is None else mask & (slot_position < capacity)
  return slot_position, kept


@functools.partial(jax.jit, static_argnames='renormalize')
def combine_weights(gates: Array, kept: Array, renormalize: bool) -> Array:
  """[t, k] combine weights: 0 where dropped; surviving gates / their sum if renormalize.

  A token with every choice dropped gets all-zero weights (output 0: residual only).
  """
  weights = jnp.where(kept, gates, jnp.zeros_like(gates))
  return normalize_gates(weights) if renormalize else weights


# ---------------------------------------------------------------------------- losses, metrics


def _masked_mean(values: Array, mask: Array) -> Array:
  """Mean over the leading axis of the rows where mask is True (0 if none)."""
  w = mask.astype(values.dtype).reshape(mask.shape + (1,) * (values.ndim - 1))
  return jnp.sum(values * w, axis=0) / jnp.maximum(jnp.sum(mask), 1)


@jax.jit
def load_balance_loss(probs: Array, top1: Array, mask: Array) -> Array:
  """E * sum_e mean_t(p_t,e) * frac_t(top1 = e) over real tokens (1.0 when perfectly balanced).

  Full softmax probs and first choices before any dropping (fairseq writes it E^2 mean_e(me*ce)).
  """
  num_experts = probs.shape[-1]
  me = _masked_mean(probs, mask)
  ce = _masked_mean(jax.nn.one_hot(top1, num_experts, dtype=probs.dtype), mask)
  return num_experts * jnp.sum(me * ce)


@jax.jit
def router_z_loss(logits: Array, mask: Array) -> Array:
  """Mean over real tokens of logsumexp(logits)^2 (ST-MoE)."""
  return _masked_mean(jax.nn.logsumexp(logits, axis=-1) ** 2, mask)


@jax.jit
def router_entropy(probs: Array, mask: Array) -> Array:
  """Mean over real tokens of the entropy of the softmax over experts (nats)."""
  return _masked_mean(-jnp.sum(jax.scipy.special.xlogy(probs, probs), axis=-1), mask)


class Routing(NamedTuple):
  """One call's routing, tokens flattened batch-major. Shapes: t tokens, k choices, e experts.

  expert_index: [t, k] int32, num_experts where dropped (over capacity, policy, padding).
  weights: [t, k] combine weights, 0 where dropped.
  choices: [t, k] int32 chosen experts before any dropping.  kept: [t, k] bool.
  slot_position: [t, k] slot within the expert's per-group buffer (-1 if it took none).
  logits, probs: [t, e].  mask: [t] bool, real tokens.  capacity: per group, None if dropless.
  """
  expert_index: Array
  weights: Array
  choices: Array
  kept: Array
  slot_position: Array
  logits: Array
  probs: Array
  mask: Array
  capacity: int | None


# ------------------------------------------------------------------------------------ module


@registry.register_family
class TopKMoE(nnx.Module):
  """Top-k MoE sublayer: `y, aux = TopKMoE(d_model, num_experts, expert_size, top_k, ...)(x)`.

  Args:
    d_model: model width d.
    num_experts: experts E.
    expert_size: hidden width f of each expert.
    top_k: experts per token k (2 = GShard / fairseq, 1 = Switch).
    capacity_factor: slots per expert = ceil(cf * k * group_size / E) in training; <= 0 dropless.
    eval_capacity_factor: the same for deterministic=True; None = capacity_factor.
    group_size: consecutive tokens (batch-major) routed together; batch * length must be
      divisible by it. None: the whole batch is one group.
    second_policy: 'all' | 'sampling' | 'random' (see the module docstring; training only).
    normalize_before_dropping: normalise the gates over the top_k choices before the 'random'
      test and capacity dropping, not after (fairseq); needs renormalize=True.
    renormalize: combine weights g_j / sum of the surviving g (top_k >= 2 only; top_k = 1 uses
      the raw softmax prob, as Switch).
    activation: 'relu' | 'gelu' | 'gelu_tanh' | 'silu'.
    use_bias: per-expert biases b_in [E, f], b_out [E, d].
    router_jitter: multiplicative U(1 - eps, 1 + eps) noise on the router input (Switch;
      training only). 0 disables.
    load_balance_weight: weight of the load-balancing loss in the training objective (0.01:
      GShard, Switch, fairseq).
    router_z_weight: weight of the router z-loss (ST-MoE; 0: off).
    init_scale: experts' w_in ~ N(0, scale^2/d), w_out ~ N(0, scale^2/f), like DenseFFN.
    router_init_scale: w_router ~ N(0, scale^2/d).
    dispatch: dispatch backend name, with options after colons (or an instance); 'auto'
      picks by the platform the program is built for (`layers.dispatch`).
    expert_exchange: under a mesh with an 'expert' axis > 1, how tokens reach the experts of
      other devices: 'ring' (dropless) or 'all_to_all' (`layers.expert_parallel`).
    exchange_capacity_factor: bounds the all_to_all's buffers (drops what overflows); None:
      dropless.
    dtype: expert compute dtype; param_dtype: storage dtype. The router computes in float32.
    rngs: 'params' for init; 'gating' (else 'dropout') for routing noise in training.
  """

  def __init__(self, d_model: int, num_experts: int, expert_size: int, top_k: int = 2, *,
               capacity_factor: float = 1.0, eval_capacity_factor: float | None = None,
               group_size: int | None = None, second_policy: str = 'all',
               normalize_before_dropping: bool = False, renormalize: bool = True,
               activation: str = 'gelu', use_bias: bool = False, router_jitter: float = 0.0,
               load_balance_weight: float = 0.01, router_z_weight: float = 0.0,
               init_scale: float = 1.0, router_init_scale: float = 1.0,
               dispatch: str | dispatch_lib.DispatchBackend = 'auto',
               expert_exchange: str = 'ring', exchange_capacity_factor: float | None = None,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    common.check_routing(num_experts, top_k, d_model=d_model, expert_size=expert_size)
    if second_policy not in SECOND_POLICIES:
      raise ValueError(f'unknown second_policy {second_policy!r}; valid: {list(SECOND_POLICIES)}')
    if group_size is not None and not (isinstance(group_size, int) and group_size > 0):
      raise ValueError(f'group_size={group_size!r} must be a positive int or None (whole batch)')
    if not 0.0 <= router_jitter < 1.0:
      raise ValueError(f'router_jitter={router_jitter!r} must be in [0, 1)')
    if normalize_before_dropping and not renormalize:
      raise ValueError('normalize_before_dropping=True chooses *when* gates are normalised '
                       '(before dropping, as fairseq); it needs renormalize=True')
    if load_balance_weight < 0 or router_z_weight < 0:
      raise ValueError(f'load_balance_weight={load_balance_weight!r} and router_z_weight='
                       f'{router_z_weight!r} must be >= 0')
    self.d_model, self.num_experts, self.expert_size, self.top_k = (
        d_model, num_experts, expert_size, top_k)
    self.load_balance_weight, self.router_z_weight = load_balance_weight, router_z_weight
    self.capacity_factor = capacity_factor
    self.eval_capacity_factor = eval_capacity_factor
    self.group_size = group_size
    self.second_policy = second_policy
    self.normalize_before_dropping = normalize_before_dropping
    self.renormalize = renormalize
    self.activation = activation
    self.act = common.activation_fn(activation)
    self.router_jitter = router_jitter
    # Resolved now: an unknown backend or exchange fails here, not at the first call.
    self.dispatch = dispatch_lib.Dispatch(dispatch, expert_exchange, exchange_capacity_factor)
    self.dtype = dtype
    e, d, f = num_experts, d_model, expert_size
    self.w_router = common.param(rngs, common.fan_in_normal(d, router_init_scale), (d, e),
                                 ('embed', 'expert'), param_dtype)
    self.w_in = common.param(rngs, common.fan_in_normal(d, init_scale), (e, d, f),
                             ('expert', 'embed', 'mlp'), param_dtype)
    self.w_out = common.param(rngs, common.fan_in_normal(f, init_scale), (e, f, d),
                              ('expert', 'mlp', 'embed'), param_dtype)
    self.b_in = (common.param(rngs, nnx.initializers.zeros, (e, f), ('expert', 'mlp'),
                              param_dtype) if use_bias else None)
    self.b_out = (common.param(rngs, nnx.initializers.zeros, (e, d), ('expert', 'embed'),
                               param_dtype) if use_bias else None)
    needs_noise = router_jitter > 0 or (second_policy != 'all' and top_k > 1)
    self.rngs = rngs if needs_noise else None

  def _noise_key(self) -> Array:
    if 'gating' in self.rngs:
      return self.rngs.gating()
    return self.rngs.dropout()

  def route(self, x: Array, deterministic: bool = True,
            segment_ids: Array | None = None) -> Routing:
    """x: [batch, length, d_model] -> the Routing of its batch * length tokens."""
    b, l, d = x.shape
    if d != self.d_model:
      raise ValueError(f'x has d_model={d}, layer expects {self.d_model}')
    t, e, k = b * l, self.num_experts, self.top_k
    # The whole batch is one group; with no tokens (t = 0) a group of 1, so that nothing
    # divides by 0 (zero groups are routed either way).
    group = max(t, 1) if self.group_size is None else self.group_size
    if t % group:
      raise ValueError(f'batch * length = {b} * {l} = {t} is not divisible by '
                       f'group_size={self.group_size}; use a divisor of {t} or None')
    mask = common.token_mask(segment_ids, (b, l)).reshape(t)
    cf = self.capacity_factor
    if deterministic and self.eval_capacity_factor is not None:
      cf = self.eval_capacity_factor
    capacity = capacity_for(cf, k, group, e)

    x_router = x.reshape(t, d)
    if not deterministic and self.router_jitter > 0:
      x_router = x_router.astype(jnp.promote_types(x.dtype, jnp.float32)) * jax.random.uniform(
          self._noise_key(), x_router.shape, minval=1.0 - self.router_jitter,
          maxval=1.0 + self.router_jitter)
    logits = router_logits(x_router, self.w_router[...])
    probs = router_probs(logits)

    policy = 'all' if deterministic or k == 1 else self.second_policy
    noise = (jax.random.gumbel(self._noise_key(), logits.shape, logits.dtype)
             if policy == 'sampling' else None)
    choices, gates = top_k_choices(logits, k, noise)
    if k > 1 and self.normalize_before_dropping:
      gates = normalize_gates(gates)
    valid = jnp.broadcast_to(mask[:, None], (t, k))
    if policy == 'random':
      uniform = jax.random.uniform(self._noise_key(), (t, k - 1), gates.dtype)
      valid = valid & random_policy_keep(gates, uniform)

    num_groups = t // group
    slots, kept = jax.vmap(assign_slots, in_axes=(0, 0, None, None))(
        choices.reshape(num_groups, group, k), valid.reshape(num_groups, group, k), e, capacity)
    slots, kept = slots.reshape(t, k), kept.reshape(t, k)
    renormalize = k > 1 and self.renormalize and not self.normalize_before_dropping
    weights = combine_weights(gates, kept, renormalize)
    expert_index = jnp.where(kept, choices, e).astype(jnp.int32)
    return Routing(expert_index, weights, choices, kept, slots, logits, probs, mask, capacity)

  def __call__(self, x: Array, *, deterministic: bool = True,
               segment_ids: Array | None = None) -> tuple[Array, common.Aux]:
    """x: [batch, length, d_model] -> (y [batch, length, d_model], aux); padding tokens give 0.

    aux.losses: `load_balance` and `router_z`, times their weights (those of weight 0 left
    out). aux.metrics: both losses unweighted, `fraction_dropped` (capacity overflow),
    `expert_usage` [num_experts] (of the kept assignments), `router_entropy`, and with a
    capacity-bounded expert exchange `exchange_dropped` (the fraction of routed assignments the
    all_to_all dropped).
    """
    b, l, d = x.shape
    r = self.route(x, deterministic, segment_ids)
    t, k = r.choices.shape
    experts = dispatch_lib.ExpertWeights(
        self.w_in[...].astype(self.dtype), self.w_out[...].astype(self.dtype),
        None if self.b_in is None else self.b_in[...].astype(self.dtype),
        None if self.b_out is None else self.b_out[...].astype(self.dtype))
    # The backend sees all groups at once: an expert gets at most capacity slots per group, and
    # never more than t assignments (a token picks an expert at most once).
    # At least 1: the slot backends need a slot per expert even when t = 0 leaves none in use.
    num_groups = t // (self.group_size or max(t, 1))
    hint = None if r.capacity is None else max(1, min(r.capacity * num_groups, t))
    y, exchange_dropped = self.dispatch.apply(x.reshape(t, d).astype(self.dtype), r.expert_index,
                                              r.weights, experts, self.act, capacity=hint)

    real = jnp.broadcast_to(r.mask[:, None], (t, k))
    num_real = jnp.maximum(jnp.sum(real), 1)
    survived = jnp.sum(jax.nn.one_hot(r.expert_index, self.num_experts, dtype=jnp.float32),
                       axis=(0, 1))  # The sentinel's one-hot row is all zero.
    losses = {'load_balance': load_balance_loss(r.probs, r.choices[:, 0], r.mask),
              'router_z': router_z_loss(r.logits, r.mask)}
    weights = {'load_balance': self.load_balance_weight, 'router_z': self.router_z_weight}
    # fraction_dropped counts capacity overflow only, not second choices 'random' let go.
    over_capacity = (r.slot_position >= 0) & ~r.kept
    metrics = {**losses, 'fraction_dropped': jnp.sum(over_capacity) / num_real,
               'expert_usage': survived / jnp.maximum(jnp.sum(survived), 1.0),
               'router_entropy': router_entropy(r.probs, r.mask)}
    if self.dispatch.exchange_capacity_factor:  # an all_to_all that may drop what overflows
      metrics['exchange_dropped'] = exchange_dropped
    return y.reshape(b, l, d), common.Aux(common.weighted(weights, **losses), metrics)

  def cost(self) -> common.Cost:
    """Forward FLOPs per token: the router (d x E) and top_k experts of two d x f matmuls each.

    Counts top_k activated experts per token, i.e. assumes nothing is dropped (dropped or
    padding assignments cost nothing in a sparse backend, so this is an upper bound).
    """
    d, e, f, k = self.d_model, self.num_experts, self.expert_size, self.top_k
    bias = f + d if self.b_in is not None else 0
    return common.Cost(flops={'router': 2 * d * e, 'experts': k * 2 * 2 * d * f},
                       active_params=d * e + k * (2 * d * f + bias))
