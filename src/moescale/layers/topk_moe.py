"""The top-k mixture-of-experts sublayer (GShard / Switch / fairseq Top2Gate): the module.

    logits = x @ w_router                            [tokens, num_experts]   (float32)
    top-k experts per token, slots by capacity       (topk_routing: the semantics and a worked
    y = sum_{kept j} w_j * FFN_{e_j}(x)               example of capacity and dropping)

The routing is plain functions in `topk_routing` (re-exported here); this module holds the
parameters, draws the routing noise, and runs the experts through the shared dispatch.

Einsum letters: t tokens (batch * length, flattened), j choice (0..k-1), e expert, d d_model,
f expert_size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moescale import sharding as shd
from moescale.layers import common, registry
from moescale.layers import dispatch as dispatch_lib
from moescale.layers.topk_routing import (  # noqa: F401  (re-exported)
    SECOND_POLICIES, Routing, assign_slots, capacity_for, combine_weights, load_balance_loss,
    normalize_gates, random_policy_keep, router_entropy, router_logits, router_probs,
    router_z_loss, top_k_choices)

Array = jax.Array


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
      divisible by it. None: the whole batch is one group. 'shard': the tokens of one
      data-parallel shard (`sharding.batch_shards()` groups per call; the whole batch without
      a mesh), as fairseq routes each GPU's local tokens; with microbatches, one shard's rows
      of the microbatch.
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
    expert_dropout: dropout on the experts' hidden units in training, each assignment its own
      mask (Switch Transformer's expert dropout, `dispatch.ExpertDropout`); 0 disables.
    dispatch: dispatch backend name, with options after colons (or an instance); 'auto'
      picks by the platform the program is built for (`layers.dispatch`).
    expert_exchange: under a mesh with an 'expert' axis > 1, how tokens reach the experts of
      other devices: 'ring' (dropless) or 'all_to_all' (`layers.expert_parallel`).
    exchange_capacity_factor: bounds the all_to_all's buffers (drops what overflows); None:
      dropless.
    dtype: expert compute dtype; param_dtype: storage dtype. The router computes in float32.
    rngs: 'params' for init; 'gating' (else 'dropout') for routing noise in training;
      'dropout' for expert_dropout.
  """

  def __init__(self, d_model: int, num_experts: int, expert_size: int, top_k: int = 2, *,
               capacity_factor: float = 1.0, eval_capacity_factor: float | None = None,
               group_size: int | str | None = None, second_policy: str = 'all',
               normalize_before_dropping: bool = False, renormalize: bool = True,
               activation: str = 'gelu', use_bias: bool = False, router_jitter: float = 0.0,
               load_balance_weight: float = 0.01, router_z_weight: float = 0.0,
               init_scale: float = 1.0, router_init_scale: float = 1.0,
               expert_dropout: float = 0.0,
               dispatch: str | dispatch_lib.DispatchBackend = 'auto',
               expert_exchange: str = 'ring', exchange_capacity_factor: float | None = None,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    common.check_routing(num_experts, top_k, d_model=d_model, expert_size=expert_size)
    if second_policy not in SECOND_POLICIES:
      raise ValueError(f'unknown second_policy {second_policy!r}; valid: {list(SECOND_POLICIES)}')
    if group_size not in (None, 'shard') and not (isinstance(group_size, int) and group_size > 0):
      raise ValueError(f"group_size={group_size!r} must be a positive int, 'shard' (one "
                       'data-parallel shard) or None (the whole batch)')
    if not 0.0 <= router_jitter < 1.0:
      raise ValueError(f'router_jitter={router_jitter!r} must be in [0, 1)')
    if normalize_before_dropping and not renormalize:
      raise ValueError('normalize_before_dropping=True chooses *when* gates are normalised '
                       '(before dropping, as fairseq); it needs renormalize=True')
    if not 0.0 <= expert_dropout < 1.0:
      raise ValueError(f'expert_dropout={expert_dropout!r} must be in [0, 1) (0: off)')
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
    self.expert_dropout = expert_dropout
    # Resolved now: an unknown backend or exchange fails here, not at the first call.
    self.dispatch = dispatch_lib.Dispatch(dispatch, expert_exchange, exchange_capacity_factor)
    self.dtype = dtype
    self.init_scale, self.router_init_scale = init_scale, router_init_scale
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
    self.rngs = rngs if needs_noise or expert_dropout > 0 else None

  def _noise_key(self) -> Array:
    if 'gating' in self.rngs:
      return self.rngs.gating()
    return self.rngs.dropout()

  def _dropout(self, t: int, k: int, deterministic: bool):
    """The ExpertDropout of a training call (None in evaluation or at rate 0). Assignment
    (token, j) of the whole batch has id token * k + j: the mask never depends on the mesh."""
    if deterministic or self.expert_dropout == 0:
      return None
    pair = jnp.arange(t * k, dtype=jnp.int32).reshape(t, k)
    return dispatch_lib.ExpertDropout(self.rngs.dropout(), pair, rate=self.expert_dropout,
                                      units=self.expert_size)

  def _group(self, b: int, l: int) -> int:
    """Tokens per routing group for a [b, l] batch (read while tracing: 'shard' follows the
    mesh). With no tokens (t = 0) a group of 1, so that nothing divides by 0."""
    t = b * l
    if self.group_size is None:
      return max(t, 1)
    if self.group_size == 'shard':
      shards = shd.batch_shards()
      if b % shards:
        raise ValueError(f"group_size='shard': the batch of {b} rows does not split into the "
                         f'mesh\'s {shards} data-parallel shards')
      return max(t // shards, 1)
    if t % self.group_size:
      raise ValueError(f'batch * length = {b} * {l} = {t} is not divisible by '
                       f'group_size={self.group_size}; use a divisor of {t} or None')
    return self.group_size

  def route(self, x: Array, deterministic: bool = True,
            segment_ids: Array | None = None) -> Routing:
    """x: [batch, length, d_model] -> the Routing of its batch * length tokens."""
    b, l, d = x.shape
    if d != self.d_model:
      raise ValueError(f'x has d_model={d}, layer expects {self.d_model}')
    t, e, k = b * l, self.num_experts, self.top_k
    group = self._group(b, l)
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

    # The second-choice policy only matters in training with k > 1 ('all' otherwise).
    policy_applies = not deterministic and k > 1
    noise = (jax.random.gumbel(self._noise_key(), logits.shape, logits.dtype)
             if policy_applies and self.second_policy == 'sampling' else None)
    choices, gates = top_k_choices(logits, k, noise)
    if k > 1 and self.normalize_before_dropping:
      gates = normalize_gates(gates)
    valid = jnp.broadcast_to(mask[:, None], (t, k))
    if policy_applies and self.second_policy == 'random':
      uniform = jax.random.uniform(self._noise_key(), (t, k - 1), gates.dtype)
      valid = valid & random_policy_keep(gates, uniform)

    num_groups = t // group
    slots, kept = jax.vmap(assign_slots, in_axes=(0, 0, None, None))(
        choices.reshape(num_groups, group, k), valid.reshape(num_groups, group, k), e, capacity)
    slots, kept = slots.reshape(t, k), kept.reshape(t, k)
    renormalize = k > 1 and self.renormalize and not self.normalize_before_dropping
    weights = combine_weights(gates, kept, renormalize)
    expert_index = jnp.where(kept, choices, e).astype(jnp.int32)
    return Routing(expert_index, weights, choices, kept, slots, logits, probs, mask, capacity,
                   num_groups)

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
    num_groups = r.num_groups
    hint = None if r.capacity is None else max(1, min(r.capacity * num_groups, t))
    y, exchange_dropped = self.dispatch.apply(x.reshape(t, d).astype(self.dtype), r.expert_index,
                                              r.weights, experts, self.act, capacity=hint,
                                              dropout=self._dropout(t, k, deterministic))

    real = jnp.broadcast_to(r.mask[:, None], (t, k))
    num_real = jnp.maximum(jnp.sum(real), 1)
    survived = jnp.sum(jax.nn.one_hot(r.expert_index, self.num_experts, dtype=jnp.float32),
                       axis=(0, 1))  # The sentinel's one-hot row is all zero.
    # Balanced per routing group, then averaged over the groups, as GShard and fairseq (each
    # GPU's local loss, averaged by data parallelism): one group is the whole-batch loss.
    if num_groups > 1:
      g = num_groups
      balance = jnp.mean(jax.vmap(load_balance_loss)(
          r.probs.reshape(g, t // g, self.num_experts), r.choices[:, 0].reshape(g, t // g),
          r.mask.reshape(g, t // g)))
    else:  # one group (or t = 0): the whole batch's loss
      balance = load_balance_loss(r.probs, r.choices[:, 0], r.mask)
    losses = {'load_balance': balance,
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
