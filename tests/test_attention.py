import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moescale.model import positions as P
from moescale.model.attention import Attention, RelativeAttention, attention_mask


def _x(shape, seed=0):
  return jax.random.normal(jax.random.key(seed), shape)


def _randomize(module, seed=1, scale=0.3):
  """Gives every parameter (biases included) random values so no term hides behind a zero."""
  state = nnx.state(module, nnx.Param)
  leaves, tree = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  new = [scale * jax.random.normal(k, l.shape, l.dtype) for k, l in zip(keys, leaves)]
  nnx.update(module, jax.tree.unflatten(tree, new))


def _softmax_ref(scores, allowed):
  scores = np.where(allowed, scores, -np.inf)
  e = np.exp(scores - scores.max())
  return e / e.sum()


def test_sinusoidal_matches_fairseq_formula():
  dim, half = 6, 3
  emb = np.asarray(P.sinusoidal_embedding(jnp.array([0, 1, 5]), dim))
  freqs = np.exp(np.arange(half) * -(math.log(10000.0) / (half - 1)))
  for row, p in enumerate([0, 1, 5]):
    np.testing.assert_allclose(emb[row], np.concatenate([np.sin(p * freqs), np.cos(p * freqs)]),
                               rtol=1e-6, atol=1e-6)
  odd = P.sinusoidal_embedding(jnp.array([3]), 7)
  assert odd.shape == (1, 7) and float(odd[0, -1]) == 0.0


def test_positions_from_segments_restart_per_segment():
  seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
  np.testing.assert_array_equal(P.positions_from_segments(seg),
                                [[0, 1, 2, 0, 1, 0, 0, 1], list(range(8))])


def test_rotary_scores_depend_only_on_distance():
  q, k = _x((1, 1, 1, 8), 0), _x((1, 1, 1, 8), 1)

  def score(pq, pk):
    rq = P.apply_rotary(q, jnp.array([[pq]]))
    rk = P.apply_rotary(k, jnp.array([[pk]]))
    return float(jnp.sum(rq * rk))

  assert score(3, 1) == pytest.approx(score(10, 8), rel=1e-5)
  assert score(3, 1) != pytest.approx(score(3, 2), rel=1e-3)
  np.testing.assert_allclose(P.apply_rotary(q, jnp.array([[0]])), q)


def test_rel_shift_aligns_distances_like_a_gather():
  qlen, klen = 3, 5
  x = _x((2, qlen, klen))
  shifted = np.asarray(P.rel_shift(x))
  mlen = klen - qlen
  for i in range(qlen):
    for j in range(mlen + i + 1):   # only the causal part is defined
      distance = mlen + i - j
      np.testing.assert_allclose(shifted[:, i, j], x[:, i, klen - 1 - distance])


def test_mask_causal_segments_and_memory():
  seg = jnp.array([[1, 1, 2, 0]])
  m = np.asarray(attention_mask(seg, 4, mlen=2))[0, 0]
  want = np.array([
      # mem mem  t0 t1 t2 t3
      [1, 1, 1, 0, 0, 0],
      [1, 1, 1, 1, 0, 0],
      [1, 1, 0, 0, 1, 0],    # segment 2 does not see segment 1
      [0, 0, 0, 0, 0, 1],    # padding sees only padding
  ], bool)
  np.testing.assert_array_equal(m, want)


def test_attention_matches_reference_loop_with_segments_and_rotary():
  d, h, dh, length = 8, 2, 4, 6
  attn = Attention(d, h, dh, rotary=True, rngs=nnx.Rngs(0))
  _randomize(attn)
  x = _x((1, length, d))
  seg = jnp.array([[1, 1, 1, 2, 2, 0]])
  pos = P.positions_from_segments(seg)
  y = np.asarray(attn(x, segment_ids=seg, positions=pos))

  p = {n: np.asarray(getattr(attn, n)[...]) for n in
       ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'q_bias', 'k_bias', 'v_bias', 'o_bias')}
  q = np.einsum('ld,dhk->lhk', x[0], p['q_proj']) + p['q_bias']
  k = np.einsum('ld,dhk->lhk', x[0], p['k_proj']) + p['k_bias']
  v = np.einsum('ld,dhk->lhk', x[0], p['v_proj']) + p['v_bias']
  q = np.asarray(P.apply_rotary(jnp.asarray(q)[None], pos))[0]
  k = np.asarray(P.apply_rotary(jnp.asarray(k)[None], pos))[0]
  want = np.zeros((length, d))
  for i in range(length):
    allowed = np.array([j <= i and seg[0, j] == seg[0, i] for j in range(length)])
    for head in range(h):
      w = _softmax_ref(k[:, head] @ q[i, head] / math.sqrt(dh), allowed)
      want[i] += (w @ v[:, head]) @ p['o_proj'][head]
  want += p['o_bias']
  np.testing.assert_allclose(y[0], want, rtol=1e-5, atol=1e-5)


def test_relative_attention_matches_reference_loop_with_memory():
  d, h, dh, qlen, mlen = 8, 2, 4, 3, 2
  attn = RelativeAttention(d, h, dh, use_bias=False, rngs=nnx.Rngs(0))
  _randomize(attn)  # non-zero u and v
  x, mem = _x((1, qlen, d), 1), _x((1, mlen, d), 2)
  y = np.asarray(attn(x, memory=mem))

  p = {n: np.asarray(getattr(attn, n)[...]) for n in
       ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'r_proj', 'content_bias', 'position_bias')}
  ctx = np.concatenate([mem[0], x[0]])
  q = np.einsum('ld,dhk->lhk', x[0], p['q_proj'])
  k = np.einsum('ld,dhk->lhk', ctx, p['k_proj'])
  v = np.einsum('ld,dhk->lhk', ctx, p['v_proj'])
  # R for a distance, from the sinusoid definition directly (row klen-1-dist of the table).
  table = np.asarray(P.relative_sinusoids(mlen + qlen, d))
  r_of = lambda dist: np.einsum('d,dhk->hk', table[mlen + qlen - 1 - dist], p['r_proj'])
  want = np.zeros((qlen, d))
  for i in range(qlen):
    n_keys = mlen + i + 1
    for head in range(h):
      s = np.array([(q[i, head] + p['content_bias'][head]) @ k[j, head]
                    + (q[i, head] + p['position_bias'][head]) @ r_of(mlen + i - j)[head]
                    for j in range(n_keys)]) / math.sqrt(dh)
      w = _softmax_ref(s, np.ones(n_keys, bool))
      want[i] += (w @ v[:n_keys, head]) @ p['o_proj'][head]
  np.testing.assert_allclose(y[0], want, rtol=1e-5, atol=1e-5)


def test_relative_encoding_of_distance_zero_is_sin0_cos0():
  r = np.asarray(P.relative_sinusoids(4, 6))
  np.testing.assert_allclose(r[-1], [0, 0, 0, 1, 1, 1], atol=1e-7)


def test_attention_cost_counts_projections_and_context():
  attn = Attention(16, 4, rngs=nnx.Rngs(0))
  c = attn.cost(context_length=10)
  assert c.flops['attn_qkvo'] == 2 * 4 * 16 * 16
  assert c.flops['attn_scores'] + c.flops['attn_values'] == 2 * 2 * 10 * 16
  assert c.active_params == 4 * 16 * 16 + 3 * 16 + 16
  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(attn, nnx.Param)))
  assert c.active_params == n_params
  rel = RelativeAttention(16, 4, rngs=nnx.Rngs(0))
  n_rel = sum(x.size for x in jax.tree.leaves(nnx.state(rel, nnx.Param)))
  rc = rel.cost(context_length=20, query_length=10)
  assert rc.active_params == n_rel
  assert rc.flops['attn_relative'] == 2 * 20 * 16 + 2 * 16 * 16 * 2


def test_attention_rejects_indivisible_heads_and_logs_logical_axes():
  with pytest.raises(ValueError, match='d_model=10 is not divisible by num_heads=4'):
    Attention(10, 4, rngs=nnx.Rngs(0))
  assert Attention(10, 4, head_dim=3, rngs=nnx.Rngs(0)).q_proj[...].shape == (10, 4, 3)
  with pytest.raises(ValueError, match='even head_dim'):
    Attention(12, 4, rotary=True, rngs=nnx.Rngs(0))
  specs = nnx.get_partition_spec(nnx.state(RelativeAttention(8, 2, rngs=nnx.Rngs(0))))
  assert tuple(specs['q_proj'].get_value()) == ('embed', 'heads', 'kv')
  assert tuple(specs['o_proj'].get_value()) == ('heads', 'kv', 'embed')
  assert tuple(specs['r_proj'].get_value()) == ('embed', 'heads', 'kv')
  assert tuple(specs['content_bias'].get_value()) == ('heads', 'kv')


def test_attention_softmax_in_float32_under_bfloat16():
  attn = Attention(8, 2, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  y = attn(_x((1, 4, 8)))
  assert y.dtype == jnp.bfloat16
  ref = Attention(8, 2, rngs=nnx.Rngs(0))(_x((1, 4, 8)))
  np.testing.assert_allclose(np.asarray(y, np.float32), ref, atol=5e-2)
