import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import test_util

from moescale.layers import SigmaMoE
from moescale.layers import dispatch, sigma_moe

D, E, G, K = 8, 6, 4, 2


def _normal(shape, seed=0, scale=1.0):
  # numpy, not jax.random: each new shape of a jax sampler costs a compile, and tests only
  # need fixed inputs.
  return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _x(shape=(2, 5, D), seed=0, scale=1.0):
  return _normal(shape, seed, scale)


def _layer(selection='sigmoid', seed=0, **kw):
  # The routing tests pin the plain reference backend (exact, cheap to compile); the default
  # backends are checked against it in test_dispatch_backend_matches_reference.
  kw.setdefault('top_k', K)
  kw.setdefault('dispatch', 'reference')
  return SigmaMoE(D, E, G, selection=selection, rngs=nnx.Rngs(seed, dropout=seed + 1), **kw)


def _y(layer, x, **kw):
  """The output alone of `layer(x, **kw)` (its aux: test_layer_records_entropy_and_...)."""
  return layer(x, **kw)[0]


def _sharpen_router(layer, scale=4.0):
  # Csordás init makes logits ~N(0, 1) on unit inputs; sharpen so top-k gaps are wide and the
  # comparison below cannot depend on float ties.
  layer.w_router[...] = layer.w_router[...] * scale


def loop_reference(layer, x, selection, keep=None, segment_ids=None):
  """Per-token float64 loop: scores, (masked) top-k, y = sum_e w_e relu(x W1_e) W2_e."""
  w_in, w_out, w_router = (np.asarray(v[...], np.float64)
                           for v in (layer.w_in, layer.w_out, layer.w_router))
  x = np.asarray(x, np.float64)
  b, l, _ = x.shape
  keep = np.ones((b * l, w_router.shape[1]), bool) if keep is None else np.asarray(keep)
  y = np.zeros_like(x)
  for t in range(b * l):
    i, j = divmod(t, l)
    if segment_ids is not None and segment_ids[i, j] == 0:
      continue
    logits = x[i, j] @ w_router
    if selection == 'softmax_renorm':
      ranked = np.where(keep[t], logits, -np.inf)
      top = np.argsort(-ranked, kind='stable')[:layer.top_k]
      top = [e for e in top if keep[t, e]]
      w = np.exp(logits[top] - logits[top].max()) if top else np.zeros(0)
      w = w / w.sum() if top else w
    else:
      if selection == 'sigmoid':
        s = 1.0 / (1.0 + np.exp(-logits))
      else:
        s = np.exp(logits - logits.max())
        s = s / s.sum()
      s = np.where(keep[t], s, 0.0)
      top = np.argsort(-s, kind='stable')[:layer.top_k]
      w = s[top]
    for e, we in zip(top, w):
      y[i, j] += we * np.maximum(x[i, j] @ w_in[e], 0.0) @ w_out[e]
  return y


def _captured(layer, x, **kw):
  """(y, {unweighted loss}, metrics); the weighted losses are checked against them."""
  y, aux = layer(x, **kw)
  assert set(aux.losses) == {'entropy'}
  np.testing.assert_allclose(aux.losses['entropy'], layer.entropy_weight * aux.metrics['entropy'],
                             rtol=1e-6)
  return y, {'entropy': aux.metrics['entropy']}, aux.metrics


# ------------------------------------------------------------------------------- forward pass


@pytest.mark.parametrize('selection', ['sigmoid', 'softmax', 'softmax_renorm'])
def test_matches_per_token_loop_reference(selection):
  layer = _layer(selection)
  _sharpen_router(layer)
  x = _x()
  np.testing.assert_allclose(_y(layer, x), loop_reference(layer, x, selection),
                             rtol=1e-5, atol=1e-6)


def test_sigmoid_weights_are_raw_scores_not_renormalised():
  logits = jnp.array([[2.0, -1.0, 0.5, 1.0]])
  idx, w = sigma_moe.select_experts(logits, 2, 'sigmoid')
  np.testing.assert_array_equal(idx, [[0, 3]])
  np.testing.assert_allclose(w, jax.nn.sigmoid(jnp.array([[2.0, 1.0]])), rtol=1e-6)
  _, w = sigma_moe.select_experts(logits, 2, 'softmax')
  np.testing.assert_allclose(w, jax.nn.softmax(logits)[:, jnp.array([0, 3])], rtol=1e-6)
  assert float(w.sum()) < 0.9  # no renormalisation
  _, w = sigma_moe.select_experts(logits, 2, 'softmax_renorm')
  np.testing.assert_allclose(w, jax.nn.softmax(jnp.array([[2.0, 1.0]])), rtol=1e-6)


def test_every_real_token_reaches_exactly_k_distinct_experts():
  logits = _normal((50, E), seed=1)
  idx, w = sigma_moe.select_experts(logits, 3, 'sigmoid')
  idx = np.asarray(idx)
  assert idx.dtype == np.int32 and (idx < E).all()
  assert all(len(set(row)) == 3 for row in idx)
  assert (np.asarray(w) > 0).all()


def test_padding_tokens_output_zero_cost_nothing_and_do_not_change_real_tokens():
  layer = _layer()
  _sharpen_router(layer)
  x = _x()
  seg = jnp.array([[1, 1, 1, 0, 0], [2, 2, 3, 3, 0]])
  y = _y(layer, x, segment_ids=seg)
  assert (np.asarray(y)[np.asarray(seg) == 0] == 0).all()
  np.testing.assert_allclose(y, loop_reference(layer, x, 'sigmoid', segment_ids=seg),
                             rtol=1e-5, atol=1e-6)
  logits = sigma_moe.router_logits(x.reshape(-1, D), layer.w_router[...])
  idx, w = sigma_moe.select_experts(logits, K, token_mask=seg.reshape(-1) != 0)
  pad = np.asarray(seg).reshape(-1) == 0
  assert (np.asarray(idx)[pad] == E).all() and (np.asarray(w)[pad] == 0).all()
  assert (np.asarray(idx)[~pad] < E).all()


# ----------------------------------------------------------------------------- expert dropout


@pytest.mark.parametrize('selection', ['sigmoid', 'softmax', 'softmax_renorm'])
def test_select_experts_never_picks_a_masked_expert(selection):
  # 10 tokens, as in the layer calls, so the mask sampler compiles once for the whole file.
  logits = _normal((10, E), seed=2)
  keep = sigma_moe.expert_dropout_mask(jax.random.key(3), logits.shape, 0.7)
  idx, w = sigma_moe.select_experts(logits, 3, selection, keep=keep)
  idx, w, keep = np.asarray(idx), np.asarray(w), np.asarray(keep)
  real = idx < E
  rows = np.nonzero(real)[0]
  assert keep[rows, idx[real]].all()                        # computed => kept
  np.testing.assert_array_equal(real.sum(1), np.minimum(keep.sum(1), 3))
  assert (w[~real] == 0).all() and (w[real] > 0).all()
  assert (keep.sum(1) < 3).any() and (keep.sum(1) == 0).any()  # the hard cases occur
  assert np.isfinite(w).all()
  if selection == 'sigmoid':  # kept experts keep their raw score: nothing is rescaled
    np.testing.assert_allclose(w[real], jax.nn.sigmoid(np.asarray(logits)[rows, idx[real]]),
                               rtol=1e-6)


def test_expert_dropout_with_fixed_key_matches_masked_reference(monkeypatch):
  seen = []
  real_mask = sigma_moe.expert_dropout_mask

  def spy(key, shape, rate):
    seen.append(real_mask(key, shape, rate))
    return seen[-1]

  monkeypatch.setattr(sigma_moe, 'expert_dropout_mask', spy)
  layer = _layer(expert_dropout=0.5)
  _sharpen_router(layer)
  x = _x()
  y = _y(layer, x, deterministic=False)
  (keep,) = seen
  assert 0 < np.asarray(keep).mean() < 1
  np.testing.assert_allclose(y, loop_reference(layer, x, 'sigmoid', keep=keep),
                             rtol=1e-5, atol=1e-6)


def _expert_param_grads(layer, x):
  def loss(layer):
    return jnp.sum(_y(layer, x, deterministic=False) * jnp.arange(D, dtype=jnp.float32))
  return nnx.grad(loss)(layer)


def test_a_masked_expert_never_contributes_and_gets_no_gradient(monkeypatch):
  dropped = 2
  monkeypatch.setattr(
      sigma_moe, 'expert_dropout_mask',
      lambda key, shape, rate: jnp.broadcast_to(jnp.arange(shape[-1]) != dropped, shape))
  layer = _layer(expert_dropout=0.1)
  _sharpen_router(layer)
  x = _x(scale=2.0)
  keep = np.broadcast_to(np.arange(E) != dropped, (10, E))
  # Without the mask, expert 2 is somebody's choice: the test would notice if it leaked.
  logits = sigma_moe.router_logits(x.reshape(-1, D), layer.w_router[...])
  assert (np.asarray(sigma_moe.select_experts(logits, K)[0]) == dropped).any()
  np.testing.assert_allclose(_y(layer, x, deterministic=False),
                             loop_reference(layer, x, 'sigmoid', keep=keep),
                             rtol=1e-5, atol=1e-6)
  grads = _expert_param_grads(layer, x)
  for name in ('w_in', 'w_out'):
    g = np.asarray(grads[name][...])
    assert (g[dropped] == 0).all()
    assert np.abs(np.delete(g, dropped, axis=0)).sum() > 0


def test_full_expert_dropout_outputs_zero_with_zero_expert_gradients():
  layer = _layer(expert_dropout=1.0)
  x = _x()
  y = _y(layer, x, deterministic=False)
  np.testing.assert_array_equal(y, np.zeros(x.shape))
  grads = _expert_param_grads(layer, x)
  for name in ('w_in', 'w_out', 'w_router'):
    g = np.asarray(grads[name][...])
    assert np.isfinite(g).all() and (g == 0).all(), name


def test_deterministic_ignores_expert_dropout():
  with_dropout = _layer(expert_dropout=0.5)
  without = _layer(expert_dropout=0.0)
  np.testing.assert_array_equal(with_dropout.w_router[...], without.w_router[...])
  x = _x()
  np.testing.assert_array_equal(_y(with_dropout, x, deterministic=True), _y(without, x))
  np.testing.assert_array_equal(_y(without, x, deterministic=False), _y(without, x))
  assert not np.allclose(_y(with_dropout, x, deterministic=False), _y(without, x))


def test_training_with_expert_dropout_needs_a_dropout_stream():
  layer = _layer(expert_dropout=0.2)
  layer.rngs = None
  with pytest.raises(ValueError, match='dropout'):
    layer(_x(), deterministic=False)


# ------------------------------------------------------------------------ losses and metrics


def _numpy_neg_entropy(logits, mask):
  z = np.asarray(logits, np.float64)[np.asarray(mask)]
  p = np.exp(z - z.max(1, keepdims=True))
  p = (p / p.sum(1, keepdims=True)).mean(0)
  return float(np.sum(p * np.log(p)))


def test_entropy_regularizer_matches_numpy_and_excludes_padding():
  logits = _normal((12, E), seed=4, scale=3.0)
  mask = jnp.arange(12) % 4 != 3
  want = _numpy_neg_entropy(logits, mask)
  np.testing.assert_allclose(sigma_moe.entropy_regularizer(logits, mask), want, rtol=1e-5)
  # Padding rows may hold anything (here an extreme, one-hot-ish row): they do not count.
  wild = jnp.where(mask[:, None], logits, jnp.array([500.0] + [0.0] * (E - 1)))
  np.testing.assert_allclose(sigma_moe.entropy_regularizer(wild, mask), want, rtol=1e-5)
  assert not np.isclose(sigma_moe.entropy_regularizer(wild), want, rtol=1e-3)
  # Uniform routing is the minimum: -log E.
  np.testing.assert_allclose(sigma_moe.entropy_regularizer(jnp.zeros((5, E))), -np.log(E),
                             rtol=1e-6)
  # An all-padding batch gives 0 and finite gradients, not NaN.
  none = jnp.zeros(12, bool)
  assert float(sigma_moe.entropy_regularizer(logits, none)) == 0.0
  g = jax.grad(sigma_moe.entropy_regularizer)(logits, none)
  assert np.isfinite(np.asarray(g)).all()


def test_layer_records_entropy_and_usage_metrics():
  layer = _layer(expert_dropout=0.3)
  x = _x()
  seg = jnp.array([[1, 1, 1, 1, 0], [1, 1, 2, 2, 2]])
  y, losses, metrics = _captured(layer, x, segment_ids=seg, deterministic=True)
  logits = np.asarray(x).reshape(-1, D) @ np.asarray(layer.w_router[...])
  np.testing.assert_allclose(losses['entropy'],
                             _numpy_neg_entropy(logits, np.asarray(seg).reshape(-1) != 0),
                             rtol=1e-5)
  idx, _ = sigma_moe.select_experts(jnp.asarray(logits), K,
                                    token_mask=seg.reshape(-1) != 0)
  counts = np.bincount(np.asarray(idx).reshape(-1), minlength=E + 1)[:E]
  np.testing.assert_allclose(metrics['expert_usage'], counts / counts.sum(), rtol=1e-6)
  assert counts.sum() == 9 * K  # 9 real tokens, each to exactly K experts
  assert 0 < float(metrics['router_entropy']) <= np.log(E) + 1e-6
  # A call leaves no state behind on the module (its parameters and RNG streams only).
  before = nnx.state(layer)
  np.testing.assert_array_equal(layer(x, segment_ids=seg)[0], y)
  assert jax.tree.structure(nnx.state(layer)) == jax.tree.structure(before)


# -------------------------------------------------------------------------------------- init


def test_csordas_init_statistics():
  d, e, g, layers = 64, 16, 32, 8
  c = np.sqrt(2 / layers)
  layer = SigmaMoE(d, e, g, 4, num_layers=layers, rngs=nnx.Rngs(0))
  w_in, w_out, w_router = (np.asarray(v[...])
                           for v in (layer.w_in, layer.w_out, layer.w_router))
  assert w_in.shape == (e, d, g) and w_out.shape == (e, g, d) and w_router.shape == (d, e)
  np.testing.assert_allclose(w_in.std(), c / np.sqrt(d), rtol=0.03)
  np.testing.assert_allclose(w_out.std(), c / np.sqrt(e * g), rtol=0.03)  # whole-layer fan-in
  norms = np.linalg.norm(w_router, axis=0)
  np.testing.assert_allclose(norms, norms[0], rtol=1e-5)                  # equal per expert
  np.testing.assert_allclose(w_router.std(), c / np.sqrt(d), rtol=0.1)
  standard = SigmaMoE(d, e, g, 4, num_layers=layers, init='standard', rngs=nnx.Rngs(0))
  np.testing.assert_allclose(np.asarray(standard.w_out[...]).std(), c / np.sqrt(g), rtol=0.03)
  # Unknown depth: c = 1.
  assert sigma_moe.csordas_scale(None) == 1.0 == sigma_moe.csordas_scale(2)


def test_equalize_column_norms_keeps_the_total_square():
  w = _normal((32, 8), seed=5) * jnp.arange(1.0, 9.0)
  out = sigma_moe.equalize_column_norms(w)
  norms = np.linalg.norm(np.asarray(out), axis=0)
  np.testing.assert_allclose(norms, norms[0], rtol=1e-5)
  np.testing.assert_allclose(np.sum(np.asarray(out) ** 2), np.sum(np.asarray(w) ** 2),
                             rtol=1e-5)
  # Direction of each column is unchanged.
  cos = np.sum(np.asarray(out) * np.asarray(w), 0) / (norms * np.linalg.norm(w, axis=0))
  np.testing.assert_allclose(cos, 1.0, rtol=1e-5)


# --------------------------------------------------------------------------------- gradients


def test_gradients_finite_and_match_finite_differences_in_float64():
  # One float32 layer's parameters, cast to float64, run by float64 modules of every selection
  # mode (built abstractly: no eager float64 work), through one loss so one compile checks all.
  params32 = nnx.state(_layer(), nnx.Param)
  params32['w_router'][...] = params32['w_router'][...] * 3
  x32 = _x(shape=(1, 4, D))
  r = np.cos(np.arange(x32.size)).reshape(x32.shape)
  with jax.enable_x64(True):
    graphdefs = [nnx.split(nnx.eval_shape(lambda s=s: SigmaMoE(
        D, E, G, K, selection=s, dtype=jnp.float64, param_dtype=jnp.float64,
        dispatch=dispatch.ReferenceLoop(accumulate=None), rngs=nnx.Rngs(0))))[0]
                 for s in ('sigmoid', 'softmax', 'softmax_renorm')]
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params32)
    x = jnp.asarray(x32, jnp.float64)

    @jax.jit
    def f(x, params):
      total = 0.0
      for graphdef in graphdefs:
        model = nnx.merge(graphdef, params)
        y, aux = model(x)
        total += jnp.sum(y * r) + aux.metrics['entropy']
      return total

    grads = jax.grad(f, argnums=(0, 1))(x, params)
    assert all(np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).sum() > 0
               for g in jax.tree.leaves(grads))
    test_util.check_grads(f, (x, params), order=1, modes=['rev'], atol=1e-6, rtol=1e-6,
                          eps=1e-6)


# ------------------------------------------------------------------------ contract and errors


def test_rejects_bad_arguments_naming_the_value():
  with pytest.raises(ValueError, match='top_k=7'):
    SigmaMoE(D, E, G, 7, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='top_k=0'):
    SigmaMoE(D, E, G, 0, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="unknown selection 'gumbel'"):
    SigmaMoE(D, E, G, K, selection='gumbel', rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="unknown selection 'gumbel'"):
    sigma_moe.select_experts(jnp.zeros((2, E)), K, 'gumbel')
  with pytest.raises(ValueError, match="unknown init 'xavier'"):
    SigmaMoE(D, E, G, K, init='xavier', rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='expert_dropout=1.5'):
    SigmaMoE(D, E, G, K, expert_dropout=1.5, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="unknown dispatch backend 'nope'"):
    SigmaMoE(D, E, G, K, dispatch='nope', rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='num_layers=0'):
    SigmaMoE(D, E, G, K, num_layers=0, rngs=nnx.Rngs(0))


def test_params_carry_logical_axes_and_cost_counts_k_experts():
  layer = _layer()
  specs = nnx.get_partition_spec(nnx.state(layer))
  assert tuple(specs['w_in'].get_value()) == ('expert', 'embed', 'mlp')
  assert tuple(specs['w_out'].get_value()) == ('expert', 'mlp', 'embed')
  assert tuple(specs['w_router'].get_value()) == ('embed', 'expert')
  abstract = nnx.eval_shape(lambda: SigmaMoE(412, 16, 128, 4, rngs=nnx.Rngs(0)))
  cost = abstract.cost()
  assert cost.flops == {'router': 2 * 412 * 16, 'experts': 4 * 2 * 2 * 412 * 128}
  assert cost.active_params == 412 * 16 + 4 * 2 * 412 * 128


@pytest.mark.parametrize('backend', ['auto', 'ragged'])  # the platform default; the GPU one
def test_dispatch_backend_matches_reference(backend):
  x = _x()
  seg = jnp.array([[1, 1, 1, 0, 0], [2, 2, 3, 3, 3]])

  def loss(layer):
    y = _y(layer, x, deterministic=False, segment_ids=seg)
    return jnp.sum(y * jnp.arange(D, dtype=jnp.float32)), y

  results = []
  for name in (backend, 'reference'):
    layer = _layer(expert_dropout=0.3, dispatch=name)
    results.append(nnx.jit(nnx.grad(loss, has_aux=True))(layer))
  (g_auto, y_auto), (g_ref, y_ref) = results
  np.testing.assert_allclose(y_auto, y_ref, rtol=1e-5, atol=1e-6)
  for name in ('w_in', 'w_out', 'w_router'):
    np.testing.assert_allclose(g_auto[name][...], g_ref[name][...], rtol=1e-4, atol=1e-6)


def test_jit_with_expert_dropout_and_bfloat16_compute():
  layer = _layer(expert_dropout=0.3, dtype=jnp.bfloat16)
  ref = _layer(expert_dropout=0.3)
  x = _x()
  y = nnx.jit(lambda m, x: _y(m, x, deterministic=False))(layer, x)
  assert y.dtype == jnp.bfloat16
  # The router sees the same float32 logits and the same dropout key, so the same experts.
  np.testing.assert_allclose(np.asarray(y, np.float32), _y(ref, x, deterministic=False),
                             rtol=0.05, atol=0.05)


def test_expert_usage_and_router_dtype_at_the_edges():
  # One computed assignment is all of the usage; none (all sentinel) is no usage, not NaN.
  np.testing.assert_array_equal(sigma_moe.expert_usage(jnp.array([[2, 4]]), 4), [0, 0, 1, 0])
  np.testing.assert_array_equal(sigma_moe.expert_usage(jnp.array([[4, 4]]), 4), [0, 0, 0, 0])
  # Logits in float32 for float32 or bfloat16 inputs, also when 64-bit types are enabled
  # (float64 only for float64 inputs).
  w = jnp.ones((3, 2), jnp.float32)
  with jax.enable_x64(True):
    for dtype in (jnp.float32, jnp.bfloat16):
      assert sigma_moe.router_logits(jnp.ones((2, 3), dtype), w).dtype == jnp.float32
    assert sigma_moe.router_logits(jnp.ones((2, 3), jnp.float64), w).dtype == jnp.float64


def test_entropy_regularizer_is_exact_in_float64():
  """The float64 gradient checks need float64 all the way: the token count too."""
  rng = np.random.default_rng(0)
  z = rng.normal(size=(3, 5)) * 2
  p = np.exp(z - z.max(-1, keepdims=True))
  p_bar = (p / p.sum(-1, keepdims=True)).mean(0)
  with jax.enable_x64(True):
    for mask in (None, jnp.ones(3, bool)):
      got = sigma_moe.entropy_regularizer(jnp.asarray(z), mask)
      assert got.dtype == jnp.float64
      np.testing.assert_allclose(got, np.sum(p_bar * np.log(p_bar)), rtol=1e-13)
