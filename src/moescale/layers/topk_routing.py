"""The routing of the top-k MoE: GShard / Switch / fairseq Top2Gate semantics, as plain functions.

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

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from moescale.layers.common import router_logits  # noqa: F401  (the routers' shared scoring)

Array = jax.Array

SECOND_POLICIES = ('all', 'sampling', 'random')


# ----------------------------------------------------------------------------------- routing
# Plain functions, traced inside the layer's (and the model's) jit.


def router_probs(logits: Array) -> Array:
  """[t, e] softmax over experts, in the logits' (float32 or wider) dtype."""
  return jax.nn.softmax(logits, axis=-1)


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


def normalize_gates(gates: Array) -> Array:
  """[t, k] -> g_j / sum_j g_j (zero rows stay zero): fairseq's denominator clamp at eps."""
  denom = jnp.sum(gates, axis=-1, keepdims=True)
  return gates / jnp.maximum(denom, jnp.finfo(gates.dtype).eps)


def random_policy_keep(gates: Array, uniform: Array) -> Array:
  """GShard's random second choice: [t, k] bool, choice j >= 1 kept iff 2 * g_j > U_j.

  gates: [t, k] (raw probs, or normalised over the k choices for normalize_before_dropping).
  uniform: [t, k - 1] draws of U(0, 1), one per non-first choice. The first choice is always kept.
  """
  first = jnp.ones_like(gates[..., :1], dtype=bool)
  return jnp.concatenate([first, 2.0 * gates[..., 1:] > uniform], axis=-1)


def capacity_for(capacity_factor: float, top_k: int, tokens_per_group: int,
                 num_experts: int) -> int | None:
  """ceil(capacity_factor * top_k * tokens_per_group / num_experts), or None (dropless) for
  capacity_factor <= 0. A 1e-9 slack keeps float error (1.2 * 2 * 10 / 4 = 6.000...01) from
  adding a slot."""
  if capacity_factor is None or capacity_factor <= 0:
    return None
  return max(1, math.ceil(capacity_factor * top_k * tokens_per_group / num_experts - 1e-9))


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


def load_balance_loss(probs: Array, top1: Array, mask: Array) -> Array:
  """E * sum_e mean_t(p_t,e) * frac_t(top1 = e) over real tokens (1.0 when perfectly balanced).

  Full softmax probs and first choices before any dropping (fairseq writes it E^2 mean_e(me*ce)).
  """
  num_experts = probs.shape[-1]
  me = _masked_mean(probs, mask)
  ce = _masked_mean(jax.nn.one_hot(top1, num_experts, dtype=probs.dtype), mask)
  return num_experts * jnp.sum(me * ce)


def router_z_loss(logits: Array, mask: Array) -> Array:
  """Mean over real tokens of logsumexp(logits)^2 (ST-MoE)."""
  return _masked_mean(jax.nn.logsumexp(logits, axis=-1) ** 2, mask)


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
  num_groups: routing groups of t / num_groups consecutive tokens (0 when t = 0).
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
  num_groups: int = 1
