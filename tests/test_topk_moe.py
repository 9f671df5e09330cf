import jax
import jax.flatten_util  # noqa: F401  (ravel_pytree)
import jax.test_util  # noqa: F401  (check_grads)
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moescale.layers import DenseFFN, TopKMoE, common, dispatch
from moescale.layers.topk_moe import (assign_slots, capacity_for, combine_weights,
                                      random_policy_keep, top_k_choices)

D, E, F = 8, 4, 16

# The module docstring's worked example: 8 tokens, 4 experts, top-2, capacity 4.
FIRST = [0, 0, 0, 0, 0, 1, 1, 2]
SECOND = [1, 1, 2, 3, 1, 0, 2, 3]


def _np_normal(shape, seed):
  # numpy, not jax.random: each new jax.random shape costs a threefry compile in eager mode.
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _x(shape=(2, 4, D), seed=0):
  return jnp.asarray(_np_normal(shape, seed))


LOSSES = ('load_balance', 'router_z')


def _call(layer, x, **kw):
  """(y, {unweighted loss}, metrics) of `layer(x, **kw)`; the weighted losses in aux.losses are
  checked against the unweighted ones in aux.metrics and the layer's own weights."""
  y, aux = layer(x, **kw)
  weights = {'load_balance': layer.load_balance_weight, 'router_z': layer.router_z_weight}
  assert set(aux.losses) == {name for name in LOSSES if weights[name]}
  for name in aux.losses:
    np.testing.assert_allclose(aux.losses[name], weights[name] * aux.metrics[name], rtol=1e-6)
  return y, {name: aux.metrics[name] for name in LOSSES}, aux.metrics


def _y(layer, x, **kw):
  """The output alone of `layer(x, **kw)`."""
  return layer(x, **kw)[0]


def _moe(top_k=2, **kw):
  """A tiny TopKMoE on the ReferenceLoop backend (the definition): semantics tests do not
  depend on a fast backend; `test_default_backend_equals_reference` covers 'auto'."""
  kw.setdefault('rngs', nnx.Rngs(0))
  kw.setdefault('dispatch', 'reference')
  return TopKMoE(D, E, F, top_k, **kw)


def _hand_routed(first, second=None, shape=(2, 4), **kw):
  """A layer whose token s (batch-major) is the basis vector e_s and router row s puts logit 3
  on first[s] and 2 on second[s]: the choices are known by construction."""
  layer = _moe(kw.pop('top_k', 1 if second is None else 2), **kw)
  w = np.zeros((D, E), np.float32)
  for s, e in enumerate(first):
    w[s, e] = 3.0
    if second is not None:
      w[s, second[s]] = 2.0
  layer.w_router[...] = jnp.asarray(w)
  x = jnp.eye(D)[:len(first)].reshape(*shape, D)
  return layer, x


def _softmax(z):
  z = np.asarray(z, np.float64)
  z = np.exp(z - z.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def _gelu(h):
  return np.asarray(jax.nn.gelu(jnp.asarray(h), approximate=False), np.float64)


def _np_expert(layer, e, x):
  h = x @ np.asarray(layer.w_in[...][e], np.float64)
  if layer.b_in is not None:
    h = h + np.asarray(layer.b_in[...][e])
  out = _gelu(h) @ np.asarray(layer.w_out[...][e], np.float64)
  if layer.b_out is not None:
    out = out + np.asarray(layer.b_out[...][e])
  return out


class RecordingBackend:
  """ReferenceLoop that remembers the capacity hint it was given."""
  name = 'recording'

  def __init__(self):
    self.capacities = []

  def __call__(self, x, expert_index, weights, experts, activation, capacity=None):
    self.capacities.append(capacity)
    return dispatch.ReferenceLoop()(x, expert_index, weights, experts, activation, capacity)


# ------------------------------------------------------------------------------ plain functions


def test_capacity_formula():
  assert capacity_for(1.0, 2, 8, 4) == 4
  assert capacity_for(1.25, 2, 10, 4) == 7    # 6.25 rounds up
  assert capacity_for(1.2, 2, 10, 4) == 6     # float error must not add a slot
  assert capacity_for(1.0, 1, 2, 4) == 1
  assert capacity_for(0.0, 2, 8, 4) is None
  assert capacity_for(-1.0, 2, 8, 4) is None


def _np_assign(expert_index, mask, num_experts, capacity):
  t, k = expert_index.shape
  fill = [0] * num_experts
  slot = -np.ones((t, k), int)
  for j in range(k):          # choice-major: every first choice before any second choice
    for s in range(t):        # then token order
      if mask[s, j]:
        slot[s, j] = fill[expert_index[s, j]]
        fill[expert_index[s, j]] += 1
  kept = mask & (slot < capacity if capacity is not None else True)
  return slot, kept


@pytest.mark.parametrize('capacity', [None, 1, 3])
def test_assign_slots_matches_loop(capacity):
  rng = np.random.default_rng(capacity or 0)
  t, k = 12, 3
  idx = np.stack([rng.permutation(E)[:k] for _ in range(t)])
  mask = rng.random((t, k)) > 0.25
  slot, kept = assign_slots(jnp.asarray(idx), jnp.asarray(mask), E, capacity)
  want_slot, want_kept = _np_assign(idx, mask, E, capacity)
  np.testing.assert_array_equal(slot, want_slot)
  np.testing.assert_array_equal(kept, want_kept)


def test_assign_slots_worked_example_first_choices_before_second():
  idx = jnp.asarray(np.stack([FIRST, SECOND], -1))
  slot, kept = assign_slots(idx, jnp.ones(8, bool), E, 4)
  np.testing.assert_array_equal(
      slot, [[0, 2], [1, 3], [2, 1], [3, 0], [4, 4], [0, 5], [1, 2], [0, 1]])
  np.testing.assert_array_equal(kept[:, 0], [1, 1, 1, 1, 0, 1, 1, 1])
  np.testing.assert_array_equal(kept[:, 1], [1, 1, 1, 1, 0, 0, 1, 1])
  # Token-major priority would have given t4's second choice slot 2 on expert 1: not here.


def test_top_k_choices_order_and_gates():
  logits = jnp.array([[0.0, 2.0, 1.0, 3.0], [1.0, 1.0, 0.0, -1.0]])
  idx, gates = top_k_choices(logits, 3)
  np.testing.assert_array_equal(idx, [[3, 1, 2], [0, 1, 2]])  # ties -> lower index
  np.testing.assert_allclose(gates, np.take_along_axis(_softmax(logits), np.asarray(idx), -1),
                             rtol=1e-6)


def test_sampling_noise_changes_only_later_choices():
  logits = jnp.asarray(_np_normal((64, E), 0) * 0.1)
  noise = jnp.asarray(np.random.default_rng(1).gumbel(size=(64, E)).astype(np.float32))
  idx0, g0 = top_k_choices(logits, 2)
  idx1, g1 = top_k_choices(logits, 2, noise)
  np.testing.assert_array_equal(idx0[:, 0], idx1[:, 0])
  assert np.any(np.asarray(idx0[:, 1]) != np.asarray(idx1[:, 1]))
  assert np.all(np.asarray(idx1[:, 0]) != np.asarray(idx1[:, 1]))
  # Gates stay the noiseless softmax probs of whatever was chosen.
  np.testing.assert_allclose(g1, np.take_along_axis(_softmax(logits), np.asarray(idx1), -1),
                             rtol=1e-6)


def test_random_policy_rule_by_hand():
  gates = jnp.array([[0.4, 0.3], [0.4, 0.3], [0.6, 0.1], [0.6, 0.1]])
  u = jnp.array([[0.5], [0.7], [0.15], [0.5]])
  # Raw: 2*0.3=0.6 > 0.5 keep, > 0.7 no; 2*0.1=0.2 > 0.15 keep, > 0.5 no.
  np.testing.assert_array_equal(random_policy_keep(gates, u)[:, 1], [1, 0, 1, 0])
  # Normalised over the top-2: 0.3/0.7=0.4286 -> 0.857 > 0.7 keep; 0.1/0.7 -> 0.286 > 0.15.
  normed = gates / gates.sum(-1, keepdims=True)
  np.testing.assert_array_equal(random_policy_keep(normed, u)[:, 1], [1, 1, 1, 0])
  assert np.all(random_policy_keep(gates, u)[:, 0])


def test_combine_weights_renormalise_on_off():
  gates = jnp.array([[0.5, 0.3], [0.5, 0.3], [0.5, 0.3]])
  kept = jnp.array([[True, True], [True, False], [False, False]])
  np.testing.assert_allclose(combine_weights(gates, kept, True),
                             [[0.625, 0.375], [1.0, 0.0], [0.0, 0.0]], rtol=1e-6)
  np.testing.assert_allclose(combine_weights(gates, kept, False),
                             [[0.5, 0.3], [0.5, 0.0], [0.0, 0.0]], rtol=1e-6)


# ----------------------------------------------------------------------------- hand-built layer


def test_worked_example_drops_and_outputs():
  layer, x = _hand_routed(FIRST, SECOND, capacity_factor=1.0, dispatch='reference')
  r = layer.route(x)
  assert r.capacity == 4
  np.testing.assert_array_equal(r.choices, np.stack([FIRST, SECOND], -1))
  np.testing.assert_array_equal(
      r.expert_index, [[0, 1], [0, 1], [0, 2], [0, 3], [4, 4], [1, 4], [1, 2], [2, 3]])
  np.testing.assert_allclose(r.weights[4], [0.0, 0.0])
  np.testing.assert_allclose(r.weights[5], [1.0, 0.0], rtol=1e-6)  # renormalised survivor
  g = _softmax([3.0, 2.0, 0.0, 0.0])
  np.testing.assert_allclose(r.weights[0], [g[0] / (g[0] + g[1]), g[1] / (g[0] + g[1])],
                             rtol=1e-6)
  y, _, metrics = _call(layer, x)
  y = np.asarray(y).reshape(8, D)
  np.testing.assert_array_equal(y[4], 0.0)  # both choices dropped: residual only
  np.testing.assert_allclose(y[5], _np_expert(layer, 1, np.eye(D)[5]), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics['fraction_dropped'], 3 / 16, rtol=1e-6)
  np.testing.assert_allclose(metrics['expert_usage'], np.array([4, 4, 3, 2]) / 13, rtol=1e-6)


def test_batch_layout_is_batch_major():
  a, xa = _hand_routed(FIRST, SECOND, shape=(2, 4))
  b, xb = _hand_routed(FIRST, SECOND, shape=(1, 8))
  np.testing.assert_array_equal(a.route(xa).expert_index, b.route(xb).expert_index)
  c, xc = _hand_routed(FIRST, SECOND, shape=(4, 2))
  np.testing.assert_array_equal(a.route(xa).expert_index, c.route(xc).expert_index)


def test_renormalize_off_and_normalize_before_dropping():
  g = _softmax([3.0, 2.0, 0.0, 0.0])
  raw, x = _hand_routed(FIRST, SECOND, renormalize=False)
  r = raw.route(x)
  np.testing.assert_allclose(r.weights[0], [g[0], g[1]], rtol=1e-6)
  np.testing.assert_allclose(r.weights[5], [g[0], 0.0], rtol=1e-6)
  before, x = _hand_routed(FIRST, SECOND, normalize_before_dropping=True)
  r = before.route(x)
  np.testing.assert_allclose(r.weights[0], [g[0] / (g[0] + g[1]), g[1] / (g[0] + g[1])],
                             rtol=1e-6)
  # Normalised over both choices before dropping, not renormalised after: not 1.
  np.testing.assert_allclose(r.weights[5], [g[0] / (g[0] + g[1]), 0.0], rtol=1e-6)


def test_top1_switch_weight_is_raw_prob():
  layer, x = _hand_routed(FIRST, SECOND, top_k=1, capacity_factor=0.0)  # renormalize=True
  r = layer.route(x)
  np.testing.assert_array_equal(r.expert_index[:, 0], FIRST)
  np.testing.assert_allclose(r.weights[:, 0], _softmax([3.0, 2.0, 0.0, 0.0])[0], rtol=1e-6)


def test_padding_takes_no_slot_gives_zero_and_keeps_capacity():
  seg = jnp.array([[0, 0, 1, 1], [0, 0, 0, 1]])
  layer, x = _hand_routed([0] * 8, capacity_factor=1.0)
  r = layer.route(x, segment_ids=seg)
  # capacity = ceil(1 * 1 * 8 / 4) = 2 from the whole group (3 real tokens would give 1).
  assert r.capacity == 2
  np.testing.assert_array_equal(r.kept[:, 0], [0, 0, 1, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(r.expert_index[:, 0], [4, 4, 0, 0, 4, 4, 4, 4])
  pad = np.asarray(seg).reshape(-1) == 0
  np.testing.assert_array_equal(r.weights[pad], 0.0)
  y = np.asarray(_y(layer, x, segment_ids=seg)).reshape(8, D)
  np.testing.assert_array_equal(y[pad], 0.0)
  assert np.all(np.abs(y[2]) > 0)


def test_padding_excluded_from_losses():
  # Both losses weighted (router_z off by default): _call checks each against its metric.
  layer = _moe(2, capacity_factor=1.0, router_z_weight=1e-3, rngs=nnx.Rngs(1))
  seg = jnp.array([[1, 1, 1, 0], [2, 2, 0, 0]])
  x = _x(seed=2)
  x_other = x.at[0, 3].set(100.0).at[1, 2:].set(-7.0)  # only padding rows changed
  _, l1, m1 = _call(layer, x, segment_ids=seg)
  _, l2, m2 = _call(layer, x_other, segment_ids=seg)
  for name in ('load_balance', 'router_z'):
    np.testing.assert_allclose(l1[name], l2[name], rtol=1e-6)
  np.testing.assert_allclose(m1['router_entropy'], m2['router_entropy'], rtol=1e-6)
  # And they equal direct numpy over the real tokens.
  real = np.asarray(seg).reshape(-1) != 0
  logits = (np.asarray(x, np.float64).reshape(-1, D) @ np.asarray(layer.w_router[...]))[real]
  p = _softmax(logits)
  top1 = np.eye(E)[p.argmax(-1)]
  np.testing.assert_allclose(l1['load_balance'], E * np.sum(p.mean(0) * top1.mean(0)),
                             rtol=1e-5)
  lse = np.log(np.exp(logits).sum(-1))
  np.testing.assert_allclose(l1['router_z'], np.mean(lse ** 2), rtol=1e-5)
  np.testing.assert_allclose(m1['router_entropy'], np.mean(-(p * np.log(p)).sum(-1)),
                             rtol=1e-5)


def test_group_size_sets_capacity_per_group():
  backend = RecordingBackend()
  kept = {}
  for group in (None, 4, 2):
    layer, x = _hand_routed([0] * 8, capacity_factor=1.0, group_size=group, dispatch=backend)
    kept[group] = np.flatnonzero(np.asarray(layer.route(x).kept[:, 0]))
    layer(x)
  np.testing.assert_array_equal(kept[None], [0, 1])        # capacity ceil(8/4) = 2
  np.testing.assert_array_equal(kept[4], [0, 4])           # ceil(4/4) = 1 per group of 4
  np.testing.assert_array_equal(kept[2], [0, 2, 4, 6])     # ceil(2/4) = 1 per group of 2
  assert backend.capacities == [2, 2, 4]                   # per group * groups


def test_deterministic_uses_eval_capacity_factor():
  layer, x = _hand_routed([0] * 8, capacity_factor=1.0, eval_capacity_factor=2.0)
  assert int(layer.route(x, deterministic=False).kept.sum()) == 2
  assert int(layer.route(x, deterministic=True).kept.sum()) == 4
  same, x = _hand_routed([0] * 8, capacity_factor=1.0)  # None: same as training
  assert int(same.route(x, deterministic=True).kept.sum()) == 2
  dropless, x = _hand_routed([0] * 8, capacity_factor=1.0, eval_capacity_factor=-1.0)
  assert dropless.route(x, deterministic=True).capacity is None
  assert int(dropless.route(x, deterministic=True).kept.sum()) == 8


# ------------------------------------------------------------------------ second-choice policies


def _small_router(layer, scale=0.05):
  layer.w_router[...] = layer.w_router[...] * scale  # near-uniform probs: policies bite


def test_policy_all_is_deterministic_and_needs_no_rng():
  layer = _moe(2, capacity_factor=0.0)
  assert layer.rngs is None
  x = _x()
  np.testing.assert_array_equal(layer.route(x, False).expert_index,
                                layer.route(x, True).expert_index)


def test_policy_sampling_matches_hand_gumbel():
  layer = _moe(2, capacity_factor=0.0, second_policy='sampling',
               rngs=nnx.Rngs(params=0, gating=3))
  _small_router(layer)
  x = _x()
  r = layer.route(x, deterministic=False)
  plain = layer.route(x, deterministic=True)  # deterministic: 'all'
  np.testing.assert_array_equal(r.choices[:, 0], plain.choices[:, 0])
  assert np.any(np.asarray(r.choices[:, 1]) != np.asarray(plain.choices[:, 1]))
  noise = jax.random.gumbel(nnx.Rngs(gating=3).gating(), r.logits.shape)
  want, _ = top_k_choices(r.logits, 2, noise)
  np.testing.assert_array_equal(r.choices, want)


@pytest.mark.parametrize('normalize_before_dropping', [False, True])
def test_policy_random_matches_hand_computation(normalize_before_dropping):
  kw = dict(capacity_factor=0.0, second_policy='random',
            normalize_before_dropping=normalize_before_dropping)
  layer = _moe(2, rngs=nnx.Rngs(params=0, gating=5), **kw)
  _small_router(layer, 0.3)
  x = _x(seed=1)
  r = layer.route(x, deterministic=False)
  p = _softmax(np.asarray(x, np.float64).reshape(-1, D) @ np.asarray(layer.w_router[...]))
  top2 = np.sort(p, -1)[:, ::-1][:, :2]
  g2 = top2[:, 1] / top2.sum(-1) if normalize_before_dropping else top2[:, 1]
  u = np.asarray(jax.random.uniform(nnx.Rngs(gating=5).gating(), (8, 1)))[:, 0]
  np.testing.assert_array_equal(r.kept[:, 1], 2 * g2 > u)
  np.testing.assert_array_equal(r.kept[:, 0], True)
  # The two variants must disagree somewhere, else this test proves nothing.
  other = top2[:, 1] if normalize_before_dropping else top2[:, 1] / top2.sum(-1)
  assert np.any((2 * g2 > u) != (2 * other > u))
  # Deterministic: every second choice kept.
  assert np.all(layer.route(x, deterministic=True).kept)


def test_noise_prefers_gating_stream_over_dropout():
  x = _x()
  make = lambda drop: _moe(2, second_policy='random', capacity_factor=0.0,
                           rngs=nnx.Rngs(params=0, gating=3, dropout=drop))
  np.testing.assert_array_equal(make(1).route(x, False).kept, make(2).route(x, False).kept)
  only_dropout = _moe(2, second_policy='random', rngs=nnx.Rngs(params=0, dropout=1))
  assert only_dropout.route(x, False).kept.shape == (8, 2)


def test_router_jitter_training_only():
  layer = _moe(2, router_jitter=0.1, rngs=nnx.Rngs(params=0, gating=4))
  x = _x()
  clean = np.asarray(x).reshape(-1, D) @ np.asarray(layer.w_router[...])
  np.testing.assert_allclose(layer.route(x, True).logits, clean, rtol=1e-5, atol=1e-6)
  u = jax.random.uniform(nnx.Rngs(gating=4).gating(), (8, D), minval=0.9, maxval=1.1)
  want = (np.asarray(x).reshape(-1, D) * np.asarray(u)) @ np.asarray(layer.w_router[...])
  np.testing.assert_allclose(layer.route(x, False).logits, want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------- references


def test_dropless_equals_per_token_loop():
  layer = _moe(2, capacity_factor=0.0, use_bias=True, rngs=nnx.Rngs(3))
  layer.b_in[...] = jnp.asarray(_np_normal((E, F), 7) * 0.1)
  layer.b_out[...] = jnp.asarray(_np_normal((E, D), 8) * 0.1)
  seg = jnp.array([[1, 1, 1, 1], [1, 1, 1, 0]])
  x = _x(seed=4)
  y = np.asarray(_y(layer, x, segment_ids=seg)).reshape(-1, D)
  xs = np.asarray(x, np.float64).reshape(-1, D)
  p = _softmax(xs @ np.asarray(layer.w_router[...]))
  for s in range(8):
    if s == 7:
      np.testing.assert_array_equal(y[s], 0.0)  # padding
      continue
    top = np.argsort(-p[s])[:2]
    g = p[s, top] / p[s, top].sum()
    want = sum(g[j] * _np_expert(layer, top[j], xs[s]) for j in range(2))
    np.testing.assert_allclose(y[s], want, rtol=1e-4, atol=1e-5)


def test_layer_equals_reference_backend_with_capacity():
  backend = RecordingBackend()
  layer = _moe(2, capacity_factor=0.5, dispatch=backend, rngs=nnx.Rngs(5))
  x = _x(seed=5)
  r = layer.route(x)
  assert r.capacity == 2 and not np.all(r.kept)  # ceil(0.5*2*8/4) = 2: some drop
  y = _y(layer, x)
  want = dispatch.ReferenceLoop()(
      x.reshape(-1, D), r.expert_index, r.weights,
      dispatch.ExpertWeights(layer.w_in[...], layer.w_out[...]), common.activation_fn('gelu'))
  np.testing.assert_allclose(np.asarray(y).reshape(-1, D), want, rtol=1e-6, atol=1e-6)
  assert backend.capacities == [2]


@pytest.mark.parametrize('capacity_factor', [0.0, 0.5])
def test_default_backend_equals_reference(capacity_factor):
  kw = dict(capacity_factor=capacity_factor, use_bias=True)
  auto = TopKMoE(D, E, F, 2, dispatch='auto', rngs=nnx.Rngs(5), **kw)
  ref = _moe(2, rngs=nnx.Rngs(5), **kw)
  ref.b_out[...] = auto.b_out[...] = jnp.asarray(_np_normal((E, D), 9))
  x, seg = _x(seed=5), jnp.array([[1, 1, 1, 1], [1, 1, 1, 0]])
  np.testing.assert_allclose(_y(auto, x, segment_ids=seg), _y(ref, x, segment_ids=seg),
                             rtol=1e-5, atol=1e-5)


def test_capacity_hint_covers_all_groups():
  # 'slots' keeps at most `capacity` assignments per expert over the whole call: the hint must
  # be capacity per group times the number of groups, or it would drop what routing kept.
  kw = dict(capacity_factor=1.0, group_size=4)
  slots = TopKMoE(D, E, F, 2, dispatch='slots', rngs=nnx.Rngs(5), **kw)
  ref = _moe(2, rngs=nnx.Rngs(5), **kw)
  x = _x(seed=5)
  r = ref.route(x)
  per_expert = np.bincount(np.asarray(r.expert_index).ravel(), minlength=E + 1)[:E]
  assert r.capacity == 2 and per_expert.max() > r.capacity
  np.testing.assert_allclose(_y(slots, x), _y(ref, x), rtol=1e-5, atol=1e-5)


def test_one_expert_top1_equals_dense():
  # Built abstractly and given the same weights: skips four random-init compiles.
  dense = nnx.eval_shape(lambda: DenseFFN(D, F, activation='gelu', use_bias=True,
                                          rngs=nnx.Rngs(0)))
  moe = nnx.eval_shape(lambda: TopKMoE(D, 1, F, 1, capacity_factor=0.0, activation='gelu',
                                       use_bias=True, dispatch='reference', rngs=nnx.Rngs(0)))
  w_in, w_out = _np_normal((D, F), 1) / D ** 0.5, _np_normal((F, D), 2) / F ** 0.5
  b_in, b_out = np.arange(F, dtype=np.float32) / F, -np.arange(D, dtype=np.float32) / D
  for name, value in dict(w_in=w_in, w_out=w_out, b_in=b_in, b_out=b_out).items():
    getattr(dense, name).set_value(jnp.asarray(value))
    getattr(moe, name).set_value(jnp.asarray(value[None]))
  moe.w_router.set_value(jnp.asarray(_np_normal((D, 1), 3)))  # any router: softmax over 1 = 1
  x = _x()
  run = nnx.jit(_y)  # One compile each instead of many eager ones.
  np.testing.assert_allclose(run(moe, x), run(dense, x), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------ gradients, plumbing


def test_gradients_match_finite_differences():
  # Built in float32 (init already compiled by other tests), checked in float64: dtype is only
  # the compute dtype, and the router computes in float64 when its input is float64.
  layer = _moe(2, capacity_factor=0.0, dtype=jnp.float64,
               dispatch=dispatch.ReferenceLoop(accumulate=None))
  graphdef, state = nnx.split(layer)
  x, c = _x(seed=1), _x(seed=2)
  with jax.enable_x64(True):
    # One flat float64 vector of parameters and inputs: check_grads then does a handful of
    # eager ops, not a handful per parameter.
    flat, unravel = jax.flatten_util.ravel_pytree((state, x))
    flat = flat.astype(jnp.float64)
    c = c.astype(jnp.float64)

    @jax.jit
    def f(flat):
      state, x = unravel(flat)
      state = jax.tree.map(lambda a: a.astype(jnp.float64), state)
      y, _ = nnx.merge(graphdef, state)(x.astype(jnp.float64))
      assert y.dtype == jnp.float64
      return jnp.sum(y * c)

    jax.test_util.check_grads(f, (flat,), order=1, modes=['rev'], eps=1e-6, atol=1e-7,
                              rtol=1e-7)


def test_gradients_finite_in_training_with_drops():
  layer = _moe(2, capacity_factor=0.5, second_policy='random', router_jitter=0.01)
  x = _x()

  def loss(layer):
    y, aux = layer(x, deterministic=False)
    return jnp.sum(y ** 2) + 0.01 * aux.metrics['load_balance'] + aux.metrics['router_z']

  grads = nnx.jit(nnx.grad(loss))(layer)
  for leaf in jax.tree.leaves(grads):
    assert np.all(np.isfinite(leaf))
  assert np.any(np.asarray(grads['w_router'].get_value()) != 0)


def test_jit_advances_noise_between_calls():
  layer = _moe(2, second_policy='random', capacity_factor=0.0)
  _small_router(layer)
  f = nnx.jit(lambda m, x: m.route(x, deterministic=False).kept)
  x = _x()
  assert np.any(np.asarray(f(layer, x)) != np.asarray(f(layer, x)))


def test_rejects_bad_arguments():
  with pytest.raises(ValueError, match='top_k=5'):
    _moe(5)
  with pytest.raises(ValueError, match="second_policy 'gumbel'"):
    _moe(2, second_policy='gumbel')
  for bad in (0, -2, 2.5):
    with pytest.raises(ValueError, match='group_size'):
      _moe(2, group_size=bad)
  with pytest.raises(ValueError, match='normalize_before_dropping'):
    _moe(2, normalize_before_dropping=True, renormalize=False)
  with pytest.raises(ValueError, match="unknown dispatch backend 'nope'"):
    _moe(2, dispatch='nope')
  with pytest.raises(ValueError, match='num_experts=0'):
    TopKMoE(D, 0, F, 1, rngs=nnx.Rngs(0))
  layer = _moe(2, group_size=3)
  with pytest.raises(ValueError, match='group_size=3'):
    layer(_x())  # 8 tokens
  with pytest.raises(ValueError, match='d_model=6'):
    layer(_x((1, 3, 6)))


def test_params_carry_logical_axes_and_init():
  layer = _moe(2, use_bias=True)
  specs = nnx.get_partition_spec(nnx.state(layer))
  assert tuple(specs['w_router'].get_value()) == ('embed', 'expert')
  assert tuple(specs['w_in'].get_value()) == ('expert', 'embed', 'mlp')
  assert tuple(specs['w_out'].get_value()) == ('expert', 'mlp', 'embed')
  assert tuple(specs['b_in'].get_value()) == ('expert', 'mlp')
  assert tuple(specs['b_out'].get_value()) == ('expert', 'embed')
  # Fan-in normal like DenseFFN (512 samples each: a 15% band is > 3 standard errors).
  np.testing.assert_allclose(np.std(layer.w_in[...]), D ** -0.5, rtol=0.15)
  np.testing.assert_allclose(np.std(layer.w_out[...]), F ** -0.5, rtol=0.15)
  np.testing.assert_allclose(np.std(layer.w_router[...]), D ** -0.5, rtol=0.3)


def test_cost_from_config_alone():
  abstract = nnx.eval_shape(lambda: TopKMoE(D, E, F, 2, use_bias=True, rngs=nnx.Rngs(0)))
  cost = abstract.cost()
  assert cost.flops == {'router': 2 * D * E, 'experts': 2 * 2 * 2 * D * F}
  assert cost.active_params == D * E + 2 * (2 * D * F + F + D)
  assert TopKMoE(D, E, F, 1, rngs=nnx.Rngs(0)).cost().active_params == D * E + 2 * D * F


def test_router_losses_of_a_single_real_token():
  """Means over the real tokens: with one real token they are that token's values."""
  from moescale.layers import topk_routing
  logits = jax.random.normal(jax.random.key(0), (3, 4))
  mask = jnp.array([False, True, False])
  lse = jax.nn.logsumexp(logits[1])
  np.testing.assert_allclose(topk_routing.router_z_loss(logits, mask), lse ** 2, rtol=1e-6)
  probs = jax.nn.softmax(logits)
  top1 = jnp.argmax(logits, -1)
  # E * p_1[top1_1]: the one token is the whole batch.
  np.testing.assert_allclose(topk_routing.load_balance_loss(probs, top1, mask),
                             4 * probs[1, top1[1]], rtol=1e-6)


def test_load_balance_loss_is_per_group_then_averaged():
  """GShard and fairseq balance each routing group (each GPU's tokens) and average."""
  # Group 1 sends its 4 tokens to expert 0, group 2 spreads them over experts 0..3.
  layer, x = _hand_routed([0, 0, 0, 0, 0, 1, 2, 3], capacity_factor=0.0, group_size=4)
  r = layer.route(x)
  _, losses, _ = _call(layer, x)
  probs, top1 = np.asarray(r.probs), np.asarray(r.choices[:, 0])

  def lb(rows):  # E * sum_e mean(p_e) * frac(top1 = e)
    return E * np.sum(probs[rows].mean(0) * np.bincount(top1[rows], minlength=E) / len(top1[rows]))

  want = (lb(slice(0, 4)) + lb(slice(4, 8))) / 2
  np.testing.assert_allclose(losses['load_balance'], want, rtol=1e-5)
  whole, x = _hand_routed([0, 0, 0, 0, 0, 1, 2, 3], capacity_factor=0.0)
  assert not np.isclose(want, lb(slice(0, 8)))  # a different number for one group
  np.testing.assert_allclose(_call(whole, x)[1]['load_balance'], lb(slice(0, 8)), rtol=1e-5)


def test_shard_groups_follow_the_mesh():
  """group_size='shard': one group per data-parallel shard of the mesh traced under (fairseq's
  per-GPU groups); the whole batch without a mesh."""
  from moescale import sharding as shd
  first = [0] * 8
  layer, x = _hand_routed(first, shape=(4, 2), capacity_factor=1.0, group_size='shard')
  alone = layer.route(x).kept[:, 0]
  np.testing.assert_array_equal(np.flatnonzero(alone), [0, 1])   # one group: capacity 2
  mesh = shd.make_mesh(data=2, devices=jax.devices()[:2])
  with shd.use_mesh(mesh):
    sharded = jax.jit(lambda x: layer.route(x).kept[:, 0])(x)
    ref_layer, _ = _hand_routed(first, shape=(4, 2), capacity_factor=1.0, group_size=4)
    want = ref_layer.route(x).kept[:, 0]
  np.testing.assert_array_equal(sharded, want)                   # two groups of 4 tokens
  np.testing.assert_array_equal(np.flatnonzero(sharded), [0, 4])
  with shd.use_mesh(shd.make_mesh(data=8)), pytest.raises(ValueError, match="'shard'"):
    jax.eval_shape(lambda x: layer.route(x).kept, x)             # 4 rows, 8 shards


# --------------------------------------------------------------------------- expert dropout


def test_expert_dropout_in_training_only_with_the_assignments_own_masks():
  """Training: the layer's output is the reference dispatch with ExpertDropout(the 'dropout'
  stream's key, ids token * k + j over the batch, units expert_size). Evaluation ignores it."""
  kw = dict(capacity_factor=0.0, use_bias=True)
  layer = _moe(2, expert_dropout=0.3, rngs=nnx.Rngs(params=5, dropout=9), **kw)
  plain = _moe(2, rngs=nnx.Rngs(params=5), **kw)
  x = _x(seed=6)
  np.testing.assert_array_equal(_y(layer, x, deterministic=True), _y(plain, x))
  r = layer.route(x)
  y = _y(layer, x, deterministic=False)
  drop = dispatch.ExpertDropout(nnx.Rngs(dropout=9).dropout(),
                                jnp.arange(16, dtype=jnp.int32).reshape(8, 2), rate=0.3, units=F)
  experts = dispatch.ExpertWeights(layer.w_in[...], layer.w_out[...], layer.b_in[...],
                                   layer.b_out[...])
  want = dispatch.ReferenceLoop()(x.reshape(-1, D), r.expert_index, r.weights, experts,
                                  common.activation_fn('gelu'), None, drop)
  np.testing.assert_allclose(np.asarray(y).reshape(-1, D), want, rtol=1e-5, atol=1e-6)
  assert np.abs(np.asarray(y) - np.asarray(_y(plain, x))).max() > 0.01
  # The default ('auto') backend draws the same masks.
  auto = TopKMoE(D, E, F, 2, expert_dropout=0.3, rngs=nnx.Rngs(params=5, dropout=9), **kw)
  np.testing.assert_allclose(_y(auto, x, deterministic=False), y, rtol=1e-5, atol=1e-5)
  for bad in (-0.1, 1.0):
    with pytest.raises(ValueError, match='expert_dropout'):
      _moe(2, expert_dropout=bad)
