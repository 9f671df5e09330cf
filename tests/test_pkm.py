import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

from moescale.layers import ProductKeyMemory
from moescale.layers import pkm_ops
from moescale.layers.pkm import candidate_pairs, gather_values, product_key_topk

# One shape family throughout (d 16, 2 heads, 8 sub-keys, k_dim 8): on a shared CPU most of
# the time is XLA compiling initialisers and forwards, and equal shapes compile once.
D, H, N, KNN, KDIM = 16, 2, 8, 4, 8


def _layer(seed=0, **kw):
  kw = {'num_heads': H, 'num_keys': N, 'knn': KNN, **kw}
  if kw.get('query_proj', True):
    kw.setdefault('k_dim', KDIM)
  return ProductKeyMemory(D, rngs=nnx.Rngs(seed), **kw)


@functools.partial(nnx.jit, static_argnames='deterministic')
def _run(layer, x, segment_ids=None, deterministic=True):
  return layer(x, deterministic=deterministic, segment_ids=segment_ids)[0]


@nnx.jit
def _run_with_metrics(layer, x):
  y, aux = layer(x)
  assert not aux.losses  # a PKM trains on no auxiliary loss
  return y, aux.metrics


def _x(shape=(2, 5, D), seed=0):
  return jax.random.normal(jax.random.key(seed), shape)


def _np(a):
  return np.asarray(a, dtype=np.float64)


def _softmax(z, axis=-1):
  e = np.exp(z - z.max(axis, keepdims=True))
  return e / e.sum(axis, keepdims=True)


def _randomise_batchnorm(layer, seed=7):
  """Non-trivial BatchNorm scale/bias/running stats, so the references must apply them."""
  if layer.bn_scale is None:
    return
  k = jax.random.split(jax.random.key(seed), 4)
  shape = layer.bn_scale[...].shape
  layer.bn_scale[...] = 1.0 + 0.3 * jax.random.normal(k[0], shape)
  layer.bn_bias[...] = 0.3 * jax.random.normal(k[1], shape)
  layer.bn_mean[...] = 0.3 * jax.random.normal(k[2], shape)
  layer.bn_var[...] = jnp.exp(0.3 * jax.random.normal(k[3], shape))


def reference(layer, x, segment_ids=None, train=False):
  """Brute force in float64 numpy: scores all num_keys**2 keys, loops over tokens and heads.

  Returns (y [b, l, d], set of value rows read with a nonzero weight by a real token).
  """
  b, l, d = x.shape
  xf = _np(x).reshape(b * l, d)
  mask = (np.ones(b * l, bool) if segment_ids is None
          else np.asarray(segment_ids).reshape(-1) != 0)
  h, n, kd = layer.num_heads, layer.num_keys, layer.k_dim
  if layer.w_query is None:
    q = np.repeat(xf[:, None, :], h, axis=1)
  else:
    q = np.einsum('td,dhk->thk', xf, _np(layer.w_query[...]))
    if layer.b_query is not None:
      q = q + _np(layer.b_query[...])
    if layer.bn_scale is not None:
      if train:
        mean, var = q[mask].mean(0), q[mask].var(0)
      else:
        mean, var = _np(layer.bn_mean[...]), _np(layer.bn_var[...])
      q = (q - mean) / np.sqrt(var + layer.batchnorm_eps)
      q = q * _np(layer.bn_scale[...]) + _np(layer.bn_bias[...])
  s1 = np.einsum('thk,hnk->thn', q[..., :kd // 2], _np(layer.keys1[...]))
  s2 = np.einsum('thk,hnk->thn', q[..., kd // 2:], _np(layer.keys2[...]))
  full = (s1[..., :, None] + s2[..., None, :]).reshape(b * l, h, n * n)
  values = _np(layer.values[...])
  y = np.zeros((b * l, d))
  rows = set()
  for t in range(b * l):
    if not mask[t]:
      continue
    if layer.mode == 'dense':
      z = full[t].sum(0)
      w = _softmax(z) if layer.score_fn == 'softmax' else np.maximum(z, 0)
      idx = np.arange(n * n)
    else:
      idx = np.stack([np.argsort(-full[t, j])[:layer.knn] for j in range(h)])  # [h, knn]
      s = np.take_along_axis(full[t], idx, axis=1)
      if layer.score_fn == 'relu':
        w = np.maximum(s, 0)
      elif layer.joint:
        w = _softmax(s.reshape(-1)).reshape(s.shape)
      else:
        w = _softmax(s, axis=-1)
      idx, w = idx.reshape(-1), w.reshape(-1)
    for i, wi in zip(idx, w):
      y[t] += wi * values[i]
      if wi != 0:
        rows.add(int(i))
  return y.reshape(b, l, d), rows


# --- the product search -------------------------------------------------------------------

def test_candidate_pairs_is_the_dominance_bound():
  got = {tuple(p) for p in candidate_pairs(4)}
  assert got == {(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (2, 0), (3, 0)}
  for knn in (1, 7, 16, 128):
    pairs = candidate_pairs(knn)
    assert len(pairs) == sum(knn // i for i in range(1, knn + 1))
    assert np.all((pairs[:, 0] + 1) * (pairs[:, 1] + 1) <= knn)
  assert len(candidate_pairs(128)) < 128 * 128 // 20  # ~knn ln knn, not knn**2
  # Clipped to the half lists' length when knn > num_keys.
  assert candidate_pairs(12, 8).max() == 7


@functools.partial(jax.jit, static_argnums=(2,))
def _all_forms(s1, s2, knn):
  return {form: product_key_topk(s1, s2, knn, form=form) for form in pkm_ops.FORMS}


# 3, 13: not perfect squares; 1, 3: the split form has no inner pairs; 6, 8: it has some;
# 13, 64 > num_keys: the split form falls back to the candidate pairs.
@pytest.mark.parametrize('knn', [1, 3, 4, 6, 8, 13, 64])
def test_product_key_topk_equals_brute_force(knn):
  k1, k2 = jax.random.split(jax.random.key(knn))
  s1 = jax.random.normal(k1, (3, 2, N))
  s2 = jax.random.normal(k2, (3, 2, N))
  full = (_np(s1)[..., :, None] + _np(s2)[..., None, :]).reshape(3, 2, N * N)
  want_idx = np.argsort(-full, axis=-1)[..., :knn]
  want = np.take_along_axis(full, want_idx, axis=-1)
  forms = _all_forms(s1, s2, knn)
  for scores, idx in forms.values():
    assert scores.shape == idx.shape == (3, 2, knn)
    np.testing.assert_allclose(scores, want, rtol=1e-6, atol=1e-6)
    # The scores belong to the slots returned, and the slot sets agree with brute force.
    np.testing.assert_allclose(np.take_along_axis(full, np.asarray(idx), -1), want, atol=1e-6)
    for a, b in itertools.product(range(3), range(2)):
      assert set(np.asarray(idx)[a, b].tolist()) == set(want_idx[a, b].tolist())
  # Every form reads the same scores in the same order (float sums of the same two terms).
  for scores, _ in forms.values():
    np.testing.assert_array_equal(scores, forms['full'][0])


def test_product_key_topk_with_ties_and_a_wide_memory():
  # Integer scores tie everywhere; 32 sub-keys and knn 8 give the split form its row, column
  # and inner candidates at once. Tied slots may differ between forms; scores may not.
  k1, k2 = jax.random.split(jax.random.key(5))
  n, knn = 32, 8
  s1 = jax.random.randint(k1, (4, n), -3, 4).astype(jnp.float32)
  s2 = jax.random.randint(k2, (4, n), -3, 4).astype(jnp.float32)
  full = (_np(s1)[:, :, None] + _np(s2)[:, None, :]).reshape(4, n * n)
  want = -np.sort(-full, axis=-1)[:, :knn]
  for scores, idx in _all_forms(s1, s2, knn).values():
    np.testing.assert_array_equal(scores, want)
    idx = np.asarray(idx)
    np.testing.assert_array_equal(np.take_along_axis(full, idx, -1), want)
    assert all(len(set(row.tolist())) == knn for row in idx)  # distinct slots


def test_product_key_topk_gradient_is_a_scatter_into_the_half_scores():
  k1, k2, k3 = jax.random.split(jax.random.key(6), 3)
  s1, s2 = jax.random.normal(k1, (5, N)), jax.random.normal(k2, (5, N))
  cot = jax.random.normal(k3, (5, KNN))
  for form in pkm_ops.FORMS:
    _, idx = product_key_topk(s1, s2, KNN, form=form)
    g1, g2 = jax.grad(lambda a, b: jnp.vdot(product_key_topk(a, b, KNN, form=form)[0], cot),
                      (0, 1))(s1, s2)
    want1, want2 = np.zeros((5, N)), np.zeros((5, N))
    for t, k in itertools.product(range(5), range(KNN)):  # score = s1[i] + s2[j]
      want1[t, int(idx[t, k]) // N] += float(cot[t, k])
      want2[t, int(idx[t, k]) % N] += float(cot[t, k])
    np.testing.assert_allclose(g1, want1, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(g2, want2, rtol=1e-6, atol=1e-6)


def _gather_reference(values, idx, w):
  """Plain loops in float64: y, dL/dvalues, dL/dw for L = sum(y * cot)."""
  return (np.einsum('tsd,ts->td', values[idx], w),
          lambda cot: (_scatter_rows(values.shape, idx, w, cot),
                       np.einsum('tsd,td->ts', values[idx], cot)))


def _scatter_rows(shape, idx, w, cot):
  out = np.zeros(shape)
  for t, s in itertools.product(*map(range, idx.shape)):
    out[idx[t, s]] += w[t, s] * cot[t]
  return out


@pytest.mark.parametrize('chunk,fwd_chunk', [(None, None), (3, None), (4, 4), (1, 3)])
def test_gather_values_and_its_vjp_equal_plain_loops(chunk, fwd_chunk, monkeypatch):
  # Few rows, so tokens share rows and slots repeat rows within a token: the value gradient
  # must accumulate. 10 tokens in chunks of 3 or 4 leave a remainder in both passes.
  if fwd_chunk:
    monkeypatch.setattr(pkm_ops, 'FWD_CHUNK', fwd_chunk)
  k = jax.random.split(jax.random.key(3), 4)
  values = jax.random.normal(k[0], (7, D))
  idx = jax.random.randint(k[1], (10, 6), 0, 7)
  w = jax.random.normal(k[2], (10, 6))
  cot = jax.random.normal(k[3], (10, D))
  want, grads = _gather_reference(_np(values), np.asarray(idx), _np(w))
  want_dv, want_dw = grads(_np(cot))

  @jax.jit
  def value_and_grads(values, w):
    f = lambda v, w: gather_values(v, idx, w, chunk_size=chunk)
    y, vjp = jax.vjp(f, values, w)
    return y, vjp(cot)

  y, (dv, dw) = value_and_grads(values, w)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dv, want_dv, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw, want_dw, rtol=1e-5, atol=1e-5)


def test_gather_values_compute_dtype_and_clipped_indices():
  k = jax.random.split(jax.random.key(4), 2)
  values = jax.random.normal(k[0], (6, D))
  w = jax.random.normal(k[1], (3, 2))
  idx = jnp.array([[0, 9], [-1, 5], [2, 2]])  # out of range: clipped to rows 5 and 0
  clipped = np.clip(np.asarray(idx), 0, 5)
  y = gather_values(values, idx, w, dtype=jnp.bfloat16)
  assert y.dtype == jnp.bfloat16
  want = np.einsum('tsd,ts->td', _np(values)[clipped], _np(w))
  np.testing.assert_allclose(np.asarray(y, np.float32), want, rtol=2e-2, atol=2e-2)
  dv = jax.grad(lambda v: gather_values(v, idx, w).sum())(values)
  assert dv.dtype == values.dtype
  np.testing.assert_allclose(dv, _scatter_rows((6, D), clipped, _np(w), np.ones((3, D))),
                             rtol=1e-5, atol=1e-5)


# --- the layer ----------------------------------------------------------------------------

@pytest.mark.parametrize('query_proj,score_fn,normalize', [
    (True, 'softmax', 'per_head'), (True, 'softmax', 'joint'), (True, 'relu', 'auto'),
    (False, 'softmax', 'per_head'), (False, 'softmax', 'joint'), (False, 'relu', 'auto'),
])
def test_layer_matches_brute_force_reference(query_proj, score_fn, normalize):
  # relu is element-wise, so per-head and joint are the same function for it.
  layer = _layer(1, score_fn=score_fn, query_proj=query_proj, normalize=normalize)
  _randomise_batchnorm(layer)
  assert layer.mode == 'sparse'
  x = _x()
  want, rows = reference(layer, x)
  y, metrics = _run_with_metrics(layer, x)
  np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(metrics['value_usage'], len(rows) / N ** 2, atol=1e-6)


def test_query_bias_without_batchnorm_as_xlm_has_it():
  # XLM's query network is a Linear with a bias; with BatchNorm the bias would be subtracted
  # again, so it is on by default only without BatchNorm.
  assert _layer().b_query is None and _layer(query_proj=False).b_query is None
  layer = _layer(3, query_batchnorm=False)
  assert layer.b_query is not None and layer.bn_scale is None
  bias = _np(layer.b_query[...])
  # PyTorch's Linear bias init: U(-1/sqrt(d), 1/sqrt(d)).
  assert bias.shape == (H, KDIM) and np.abs(bias).max() <= D ** -0.5 and bias.std() > 0.1
  x = _x()
  np.testing.assert_allclose(_run(layer, x), reference(layer, x)[0], rtol=1e-4, atol=1e-5)
  # The bias changes the output (a reference that ignored it would not match).
  y = _run(layer, x)
  layer.b_query[...] = jnp.zeros_like(layer.b_query[...])
  assert not np.allclose(_run(layer, x), y, atol=1e-3)
  no_bias = _layer(3, query_batchnorm=False, query_bias=False)
  assert layer.cost().active_params == no_bias.cost().active_params + H * KDIM
  with pytest.raises(ValueError, match='query_bias=True needs query_proj=True'):
    _layer(query_proj=False, query_bias=True)


def test_auto_settings_follow_each_paper_and_forced_sparse_beyond_num_keys():
  assert not _layer().joint and _layer(query_proj=False).joint
  assert _layer(knn=N).mode == 'dense' and _layer(knn=N - 1).mode == 'sparse'
  # knn > num_keys in sparse mode: the half lists are clipped, the search stays exact.
  layer = _layer(2, knn=12, mode='sparse', query_proj=False)
  x = _x()
  np.testing.assert_allclose(_run(layer, x), reference(layer, x)[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('query_proj,score_fn', [(True, 'softmax'), (False, 'relu'),
                                                 (False, 'softmax')])
def test_dense_mode_equals_direct_formula(query_proj, score_fn):
  layer = _layer(4, knn=N, score_fn=score_fn, query_proj=query_proj)
  assert layer.mode == 'dense'
  _randomise_batchnorm(layer)
  x = _x()
  xf = _np(x).reshape(-1, D)
  if query_proj:
    q = np.einsum('td,dhk->thk', xf, _np(layer.w_query[...]))
    q = (q - _np(layer.bn_mean[...])) / np.sqrt(_np(layer.bn_var[...]) + 1e-5)
    q = q * _np(layer.bn_scale[...]) + _np(layer.bn_bias[...])
  else:
    q = np.repeat(xf[:, None], H, axis=1)
  half = layer.k_dim // 2
  z = 0
  for h in range(H):  # act(sum_h s1_h (+) s2_h) . V, slot i*num_keys + j
    s1 = q[:, h, :half] @ _np(layer.keys1[...])[h].T
    s2 = q[:, h, half:] @ _np(layer.keys2[...])[h].T
    z = z + (s1[:, :, None] + s2[:, None, :]).reshape(-1, N * N)
  w = _softmax(z) if score_fn == 'softmax' else np.maximum(z, 0)
  want = (w @ _np(layer.values[...])).reshape(x.shape)
  np.testing.assert_allclose(_run(layer, x), want, rtol=1e-4, atol=1e-5)
  if score_fn == 'relu':  # the relu really cuts: some slots off, some on
    assert 0 < (z > 0).mean() < 1


def test_gradients_reach_only_selected_value_rows():
  layer = _layer(5)
  x = _x()
  seg = jnp.array([[1, 1, 1, 0, 0], [1, 2, 2, 2, 0]])
  _, rows = reference(layer, x, seg, train=True)
  cot = jax.random.normal(jax.random.key(9), x.shape)
  loss = lambda m: (m(x, deterministic=False, segment_ids=seg)[0] * cot).sum()
  grads = nnx.jit(nnx.grad(loss))(layer)
  g = np.asarray(grads['values'][...])
  nonzero = set(np.flatnonzero(np.abs(g).sum(1) > 0).tolist())
  assert nonzero == rows
  assert 0 < len(rows) < N * N  # the test would be vacuous otherwise
  assert np.abs(np.asarray(grads['w_query'][...])).sum() > 0  # through scores and BatchNorm


def test_batchnorm_batch_stats_in_training_running_stats_in_eval():
  layer = _layer(6)
  _randomise_batchnorm(layer)
  x = _x(seed=1) * 2.0 + 0.5
  seg = jnp.array([[1, 1, 1, 1, 0], [1, 1, 2, 2, 2]])
  mean0, var0 = np.asarray(layer.bn_mean[...]), np.asarray(layer.bn_var[...])
  eval_want = reference(layer, x, seg)[0]
  train_want = reference(layer, x, seg, train=True)[0]
  assert not np.allclose(eval_want, train_want, atol=1e-3)
  np.testing.assert_allclose(_run(layer, x, seg, True), eval_want, rtol=1e-4, atol=1e-5)
  # Eval leaves the running stats alone; training moves them towards the batch stats.
  np.testing.assert_array_equal(layer.bn_mean[...], mean0)
  np.testing.assert_allclose(_run(layer, x, seg, False), train_want, rtol=1e-4, atol=1e-5)
  q = np.einsum('td,dhk->thk', _np(x).reshape(-1, D), _np(layer.w_query[...]))
  q = q[np.asarray(seg).reshape(-1) != 0]
  np.testing.assert_allclose(layer.bn_mean[...], 0.9 * mean0 + 0.1 * q.mean(0), rtol=1e-4,
                             atol=1e-6)
  np.testing.assert_allclose(layer.bn_var[...], 0.9 * var0 + 0.1 * q.var(0, ddof=1),
                             rtol=1e-4, atol=1e-6)
  # With running stats equal to this batch's stats, eval reproduces training.
  layer.bn_mean[...] = jnp.asarray(q.mean(0), jnp.float32)
  layer.bn_var[...] = jnp.asarray(q.var(0), jnp.float32)
  np.testing.assert_allclose(_run(layer, x, seg, True), train_want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('mode', ['sparse', 'dense'])
def test_padding_tokens_give_zero_and_do_not_touch_real_tokens(mode):
  layer, other = _layer(8, mode=mode), _layer(8, mode=mode)
  x = _x()
  seg = jnp.array([[1, 1, 1, 0, 0], [2, 2, 0, 0, 0]])
  pad = np.asarray(seg) == 0
  y = np.asarray(_run(layer, x, seg, False))
  assert np.all(y[pad] == 0)
  assert np.abs(y[~pad]).min() > 0
  # Garbage in the padding changes neither the real outputs nor the BatchNorm statistics.
  x2 = jnp.where(jnp.asarray(pad)[..., None], 100.0 * _x(seed=3), x)
  y2 = np.asarray(_run(other, x2, seg, False))
  np.testing.assert_allclose(y2[~pad], y[~pad], rtol=1e-5, atol=1e-6)
  assert np.all(y2[pad] == 0)
  np.testing.assert_allclose(other.bn_mean[...], layer.bn_mean[...], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(other.bn_var[...], layer.bn_var[...], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('kwargs', [
    dict(),                                              # sparse, query net, BatchNorm (train)
    dict(knn=N, query_proj=False, score_fn='relu'),      # dense, Csordás variant
    dict(query_proj=False, score_fn='relu'),             # sparse, Csordás variant (2-D scores)
])
def test_finite_difference_gradients(kwargs):
  # Built in float32 (initialisers already compiled), then every array cast to float64:
  # in float32 a finite difference step large enough to beat rounding flips top-k choices.
  layer = _layer(10, dtype=jnp.float64, **kwargs)
  x, cot = _x(seed=11), _x(seed=12)
  seg = jnp.array([[1, 1, 1, 0, 1], [1, 2, 2, 2, 0]])
  with jax.enable_x64(True):
    f64 = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), t)
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
    params, rest, x, cot = f64(params), f64(rest), f64(x), f64(cot)

    @jax.jit
    def f(x, params):
      y, _ = nnx.merge(graphdef, params, rest, copy=True)(x, deterministic=False,
                                                         segment_ids=seg)
      return (y * cot).sum()

    check_grads(f, (x, params), order=1, modes=('rev',), atol=1e-5, rtol=1e-5, eps=1e-6)


def test_dropout_only_in_training():
  layer = ProductKeyMemory(D, H, num_keys=N, knn=KNN, k_dim=KDIM, dropout=0.5,
                           input_dropout=0.1, rngs=nnx.Rngs(0, dropout=1))
  x = _x()
  np.testing.assert_array_equal(_run(layer, x), _run(layer, x))
  assert not np.allclose(_run(layer, x, deterministic=False),
                         _run(layer, x, deterministic=False))


def test_value_init_and_logical_axes():
  layer = _layer(value_init='csordas', num_layers=8)
  std = np.asarray(layer.values[...]).std()
  np.testing.assert_allclose(std, np.sqrt(2 / 8) / N, rtol=0.1)
  np.testing.assert_allclose(np.asarray(_layer().values[...]).std(), 1 / np.sqrt(D), rtol=0.1)
  keys = np.asarray(layer.keys1[...])
  assert np.abs(keys).max() <= 1 / np.sqrt(KDIM / 2) and keys.min() < 0 < keys.max()
  # Csordás et al.'s code: keys N(0, c²/d) and, by default, values N(0, c²/d) (c = 1/2 here).
  theirs = ProductKeyMemory(64, 4, num_keys=16, knn=16, query_proj=False, key_init='csordas',
                            value_init='scaled_normal', num_layers=8, rngs=nnx.Rngs(0))
  for w in (theirs.keys1, theirs.keys2, theirs.values):
    np.testing.assert_allclose(np.asarray(w[...]).std(), 0.5 / 8, rtol=0.05)
  assert np.abs(np.asarray(theirs.keys1[...])).max() > 1.5 * 0.5 / 8  # a normal, not bounded
  with pytest.raises(ValueError, match="key_init='csordas' needs num_layers"):
    _layer(key_init='csordas')
  specs = nnx.get_partition_spec(nnx.state(layer))
  assert tuple(specs['values'].get_value()) == ('values', 'embed')
  assert tuple(specs['keys1'].get_value()) == ('heads', 'keys', 'kv')
  assert tuple(specs['keys2'].get_value()) == ('heads', 'keys', 'kv')
  assert tuple(specs['w_query'].get_value()) == ('embed', 'heads', 'kv')
  assert tuple(specs['bn_mean'].get_value()) == ('heads', 'kv')
  assert isinstance(layer.bn_mean, nnx.BatchStat)


def test_cost_from_config_alone():
  sparse = nnx.eval_shape(lambda: ProductKeyMemory(D, 4, num_keys=N, knn=KNN, k_dim=8,
                                                   rngs=nnx.Rngs(0)))
  c = sparse.cost()
  assert c.flops == {'query': 2 * D * 4 * 8, 'keys': 2 * 4 * N * 8, 'values': 2 * 4 * KNN * D}
  assert c.active_params == D * 4 * 8 + 2 * 4 * 8 + 4 * N * 8 + 4 * KNN * D
  dense = nnx.eval_shape(lambda: ProductKeyMemory(D, 4, num_keys=N, knn=N, query_proj=False,
                                                  rngs=nnx.Rngs(0)))
  assert dense.cost().flops == {'keys': 2 * 4 * N * D, 'slot_sum': N * N,
                                'values': 2 * N * N * D}
  total = sum(v.size for v in jax.tree.leaves(nnx.state(dense, nnx.Param)))
  assert dense.cost().active_params == 4 * N * D + N * N * D == total  # touches everything


def test_rejects_bad_arguments():
  with pytest.raises(ValueError, match='knn=65 must be <= num_keys'):
    ProductKeyMemory(D, num_keys=N, knn=65, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='k_dim=7 must be even'):
    ProductKeyMemory(D, num_keys=N, knn=KNN, k_dim=7, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="unknown score_fn 'sigmoid'"):
    ProductKeyMemory(D, num_keys=N, knn=KNN, score_fn='sigmoid', rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="unknown normalize 'global'"):
    ProductKeyMemory(D, num_keys=N, knn=KNN, normalize='global', rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="unknown mode 'fast'"):
    ProductKeyMemory(D, num_keys=N, knn=KNN, mode='fast', rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='k_dim=8 must equal d_model=16'):
    ProductKeyMemory(D, num_keys=N, knn=KNN, k_dim=8, query_proj=False, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='needs num_layers'):
    ProductKeyMemory(D, num_keys=N, knn=KNN, value_init='csordas', rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='query_batchnorm=True needs query_proj'):
    ProductKeyMemory(D, num_keys=N, knn=KNN, query_proj=False, query_batchnorm=True,
                     rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='num_keys=0'):
    ProductKeyMemory(D, num_keys=0, knn=1, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='dropout=1.0'):
    ProductKeyMemory(D, num_keys=N, knn=KNN, dropout=1.0, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='knn=17 must be in'):
    product_key_topk(jnp.zeros((2, 4)), jnp.zeros((2, 4)), 17)
