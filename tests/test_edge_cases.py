"""Every FFN family (DenseFFN, TopKMoE, SigmaMoE, ProductKeyMemory) at the edges a study's
batches reach: no tokens at all ([0, L, d] and [B, 0, d]: an empty shard or microbatch) and
exactly one token, against plain formulas written here; and bfloat16 compute against float32,
gradients included. (The dispatch backends' own t = 0 / t = 1 checks: test_dispatch.py.)

Tiny shapes throughout: compile time dominates."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moescale.layers import DenseFFN, ProductKeyMemory, SigmaMoE, TopKMoE

D = 8


def _normal(shape, seed, scale=1.0):
  # numpy, not jax.random: fixed inputs need no sampler compile per shape.
  return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


# ------------------------------------------------------------------ plain references, [t, d]
# Each takes the layer (for its hyperparameters and batch statistics), its parameters as a
# plain dict and x [t, d], and returns y [t, d]; jnp, so that jax.grad gives the reference
# gradients. Choices (top-k experts, slots) come from lax.top_k on stop_gradient'ed scores.


def _dense_ref(layer, p, x):
  h = jax.nn.gelu(x @ p['w_in'] + p['b_in'], approximate=False)
  return h @ p['w_out'] + p['b_out']


def _topk_ref(layer, p, x):
  """top-k of the softmax, gates renormalised over the k, biased gelu experts. Nothing is
  dropped for capacity: valid for t <= 1 (ceil(1.0 * 2 * 1 / 4) = 1 slot for each of the two
  distinct experts)."""
  logits = x @ p['w_router']
  _, top = jax.lax.top_k(jax.lax.stop_gradient(logits), layer.top_k)        # [t, k]
  g = jnp.take_along_axis(jax.nn.softmax(logits, -1), top, -1)
  g = g / g.sum(-1, keepdims=True)
  h = jax.nn.gelu(jnp.einsum('td,tjdf->tjf', x, p['w_in'][top]) + p['b_in'][top],
                  approximate=False)
  out = jnp.einsum('tjf,tjfd->tjd', h, p['w_out'][top]) + p['b_out'][top]
  return jnp.einsum('tj,tjd->td', g, out)


def _sigma_ref(layer, p, x):
  """top-k of the logits, weights their raw sigmoid, relu experts without biases."""
  logits = x @ p['w_router']
  _, top = jax.lax.top_k(jax.lax.stop_gradient(logits), layer.top_k)
  s = jax.nn.sigmoid(jnp.take_along_axis(logits, top, -1))
  h = jax.nn.relu(jnp.einsum('td,tjdf->tjf', x, p['w_in'][top]))
  return jnp.einsum('tj,tjf,tjfd->td', s, h, p['w_out'][top])


def _pkm_ref(layer, p, x):
  """Brute-force product keys (all num_keys**2 slots scored), deterministic BatchNorm."""
  t, h, n, kd, knn = x.shape[0], layer.num_heads, layer.num_keys, layer.k_dim, layer.knn
  if 'w_query' in p:
    q = jnp.einsum('td,dhk->thk', x, p['w_query'])
    if 'bn_scale' in p:
      q = (q - layer.bn_mean[...]) / jnp.sqrt(layer.bn_var[...] + layer.batchnorm_eps)
      q = q * p['bn_scale'] + p['bn_bias']
  else:
    q = jnp.broadcast_to(x[:, None, :], (t, h, kd))
  s1 = jnp.einsum('thk,hnk->thn', q[..., :kd // 2], p['keys1'])
  s2 = jnp.einsum('thk,hnk->thn', q[..., kd // 2:], p['keys2'])
  full = (s1[..., :, None] + s2[..., None, :]).reshape(t, h, n * n)
  act = jax.nn.relu if layer.score_fn == 'relu' else lambda z: jax.nn.softmax(z, -1)
  if layer.mode == 'dense':                                  # heads summed, every slot
    return act(full.sum(1)) @ p['values']
  _, idx = jax.lax.top_k(jax.lax.stop_gradient(full), knn)  # [t, h, knn]
  s = jnp.take_along_axis(full, idx, -1)
  w = act(s.reshape(t, h * knn)).reshape(s.shape) if layer.joint else act(s)
  return jnp.einsum('thk,thkd->td', w, p['values'][idx])


def _loss_names(layer):
  """The family's auxiliary losses, each reported unweighted in aux.metrics whatever its
  weight (aux.losses leaves out those of weight 0, e.g. TopKMoE's router_z by default)."""
  if isinstance(layer, TopKMoE):
    return ('load_balance', 'router_z')
  if isinstance(layer, SigmaMoE):
    return ('entropy',)
  return ()


def _with_random_biases(layer, seed=9):
  """Nonzero biases (they start at 0), so that a lost bias term changes the results."""
  for i, name in enumerate(('b_in', 'b_out')):
    b = getattr(layer, name, None)
    if b is not None:
      b[...] = _normal(b[...].shape, seed + i, 0.5)
  return layer


# name -> (make(**kw) -> layer, reference). The MoEs on the platform's default dispatch (the
# C++ kernel of 'fused' here) and, the '_slots' ones, on 'slots', which needs the layers'
# capacity hint >= 1 at t = 0. Three PKM forms: XLA's ops with a query network, BatchNorm and
# per-head softmax; the C++ kernels with Csordás's variant (no query network, one softmax over
# all heads); dense mode (every slot, relu).
LAYERS = {
    'DenseFFN': (lambda **kw: _with_random_biases(
        DenseFFN(D, 16, activation='gelu', use_bias=True, rngs=nnx.Rngs(0), **kw)), _dense_ref),
    'TopKMoE': (lambda **kw: _with_random_biases(
        TopKMoE(D, 4, 8, 2, use_bias=True, rngs=nnx.Rngs(0), **kw)), _topk_ref),
    'TopKMoE_slots': (lambda **kw: _with_random_biases(
        TopKMoE(D, 4, 8, 2, use_bias=True, dispatch='slots', rngs=nnx.Rngs(0), **kw)),
                      _topk_ref),
    'SigmaMoE': (lambda **kw: SigmaMoE(D, 4, 8, 2, rngs=nnx.Rngs(0), **kw), _sigma_ref),
    'SigmaMoE_slots': (lambda **kw: SigmaMoE(D, 4, 8, 2, dispatch='slots', rngs=nnx.Rngs(0),
                                             **kw), _sigma_ref),
    'PKM': (lambda **kw: ProductKeyMemory(D, 2, num_keys=4, knn=2, k_dim=8, kernels='xla',
                                          rngs=nnx.Rngs(0), **kw), _pkm_ref),
    'PKM_csordas_cpu': (lambda **kw: ProductKeyMemory(
        D, 2, num_keys=4, knn=2, query_proj=False, kernels='cpu', rngs=nnx.Rngs(0), **kw),
                        _pkm_ref),
    'PKM_dense': (lambda **kw: ProductKeyMemory(D, 2, num_keys=4, knn=4, k_dim=8,
                                                score_fn='relu', kernels='xla',
                                                rngs=nnx.Rngs(0), **kw), _pkm_ref),
}


def _layer_cases():
  """(name, x shape) of every layer at t = 0 both ways and t = 1; the '_slots' variants only
  at t = 0 (their dispatch at t = 1: test_dispatch). The C++ kernels' marked (conftest.py)."""
  shapes = [(0, 3, D), (2, 0, D), (1, 1, D)]
  return [pytest.param(n, s, id=f"{n}-{'x'.join(map(str, s))}",
                       marks=[pytest.mark.cpu_kernels] if n.endswith('_cpu') else [])
          for n in LAYERS for s in (shapes[:1] if n.endswith('_slots') else shapes)]


@pytest.mark.parametrize('name,shape', _layer_cases())
def test_layer_on_zero_tokens_and_one_token(name, shape):
  """x [batch, length, d] with no tokens ([0, 3, d], [2, 0, d]) or one ([1, 1, d]): forward
  equals the plain reference; gradients of <y, c> wrt every parameter and x equal the
  reference's; the aux losses (weighted and unweighted) and metrics and the gradients of the
  unweighted losses are finite, and with no tokens every gradient is exactly 0. Before the
  fixes this test came with, t = 0 crashed TopKMoE (a group of t = 0 tokens: modulo by zero)
  and every PKM form (reshape(0, -1)), made SigmaMoE's entropy loss NaN (p̄ log p̄ = 0 * -inf),
  and gave the 'slots' dispatch of both MoEs a capacity of 0 (refused); undoing any of those
  fixes fails here."""
  make, reference = LAYERS[name]
  layer = make()
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
  names = _loss_names(layer)
  x = _normal(shape, 1)
  c = _normal(shape, 2)

  def losses(params, x):
    model = nnx.merge(graphdef, params, rest, copy=True)
    y, aux = model(x)
    assert set(aux.losses) <= set(names) <= set(aux.metrics)
    total_aux = sum((jnp.sum(aux.metrics[n]) for n in names), jnp.zeros(()))
    return jnp.stack([jnp.vdot(y, c), total_aux]), (y, aux)

  # One compile: rows of the Jacobian are the gradients of <y, c> and of the aux losses.
  (g_params, g_x), (y, aux) = jax.jit(
      jax.jacrev(losses, argnums=(0, 1), has_aux=True))(params, x)
  p = nnx.to_pure_dict(params)
  ref = lambda p, x: jnp.vdot(reference(layer, p, x.reshape(-1, D)).reshape(x.shape), c)
  want_y = reference(layer, p, x.reshape(-1, D)).reshape(shape)
  want_p, want_x = jax.jit(jax.grad(ref, argnums=(0, 1)))(p, x)

  assert y.shape == shape
  np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
  for leaf in jax.tree.leaves((aux, g_params, g_x)):
    assert np.isfinite(leaf).all()
  got_p = nnx.to_pure_dict(g_params)
  assert jax.tree.structure(got_p) == jax.tree.structure(want_p)
  for got, want in zip(jax.tree.leaves((got_p, g_x)), jax.tree.leaves((want_p, want_x))):
    np.testing.assert_allclose(got[0], want, rtol=1e-4, atol=1e-5)
  if 0 in shape:
    for g in jax.tree.leaves((g_params, g_x)):
      np.testing.assert_array_equal(g, 0.0)


# ------------------------------------------------------------------------- bfloat16 compute

# bfloat16 keeps 8 significant bits: each rounding is off by at most u = 2^-8 relative. A
# gradient here passes through about 8 of them (x and each weight cast, every matmul output,
# the activation, the cotangent), so each gradient, as a whole, may be off by about 8u = 2^-5
# of its norm (measured: at most ~0.6% here). A gradient term lost or zeroed is off by 100%.
BF16_RTOL = 8 * 2.0 ** -8


def _margin(scores, k):
  """Smallest gap, over the rows of scores [..., n], between the k-th and (k+1)-th largest."""
  s = -np.sort(-scores, axis=-1)
  return float((s[..., k - 1] - s[..., k]).min())


def _routing_scores(layer, p, x, cast):
  """(scores [..., n] in float64 of cast(x) and cast(parameters), k) of the top-k the layer
  routes by; None for a layer without routing. PKM: deterministic BatchNorm at its initial
  statistics and affine (mean 0, var 1, scale 1, bias 0)."""
  x = cast(x).reshape(-1, D)
  if isinstance(layer, (TopKMoE, SigmaMoE)):
    return x @ cast(p['w_router']), layer.top_k
  if isinstance(layer, ProductKeyMemory):
    q = np.einsum('td,dhk->thk', x, cast(p['w_query'])) / np.sqrt(1 + layer.batchnorm_eps)
    half = layer.k_dim // 2
    s1 = np.einsum('thk,hnk->thn', q[..., :half], cast(p['keys1']))
    s2 = np.einsum('thk,hnk->thn', q[..., half:], cast(p['keys2']))
    return (s1[..., :, None] + s2[..., None, :]).reshape(*s1.shape[:2], -1), layer.knn
  return None


def _check_routing_margin(layer, p, x):
  """The routers and PKM scores compute in float32 from the unrounded x in either dtype, so
  both layers route alike; this asserts the inputs make that robust: every top-k gap is
  wider than twice the most that rounding x and the routing weights to bf16 moves a score."""
  exact = _routing_scores(layer, p, x, lambda a: np.asarray(a, np.float64))
  if exact is None:
    return
  bf16 = lambda a: np.asarray(jnp.asarray(a).astype(jnp.bfloat16), np.float64)
  rounded, _ = _routing_scores(layer, p, x, bf16)
  scores, k = exact
  moved = np.abs(rounded - scores).max()
  assert _margin(scores, k) > 2 * moved, (_margin(scores, k), moved)


# name -> make(**kw) -> layer: one of each family (PKM with its query network and BatchNorm).
BF16_LAYERS = {name: LAYERS[name][0] for name in ('DenseFFN', 'TopKMoE', 'SigmaMoE', 'PKM')}


@pytest.mark.parametrize('name', list(BF16_LAYERS))
def test_bfloat16_gradients_track_float32(name):
  """dtype=bfloat16 (float32 parameters) against the same parameters in float32: gradients of
  <y, c> wrt every parameter and x within BF16_RTOL of the float32 ones, norm-wise per leaf.
  Routing is held equal: the routers and PKM scores compute in float32 from the unrounded x,
  and their top-k margins are asserted wider than bf16 rounding could close (so x, seed 8,
  and routers scaled by 4 were chosen for wide margins). Kills e.g. the
  bf16 XLA loop of 'fused' (the C++ kernel runs only float32) dropping its bias term of the
  weight gradient `dyb @ b_out`, or any weight gradient cast to zero (errors of ~100%)."""
  make = BF16_LAYERS[name]
  layer = make()
  if isinstance(layer, (TopKMoE, SigmaMoE)):
    layer.w_router[...] = layer.w_router[...] * 4.0      # sharper routing: wider margins
  graphdef32, params, rest = nnx.split(layer, nnx.Param, ...)
  graphdef16 = nnx.split(nnx.eval_shape(lambda: make(dtype=jnp.bfloat16)), nnx.Param, ...)[0]
  x = _normal((2, 4, D), 8)
  c = _normal((2, 4, D), 4)
  _check_routing_margin(layer, nnx.to_pure_dict(params), x)

  @jax.jit
  def run(params, x):
    def loss(graphdef):
      def f(params, x):
        y, _ = nnx.merge(graphdef, params, rest, copy=True)(x)
        return jnp.vdot(y.astype(jnp.float32), c), y
      return jax.grad(f, argnums=(0, 1), has_aux=True)(params, x)
    return loss(graphdef32), loss(graphdef16)

  (g32, y32), (g16, y16) = run(params, x)
  assert y32.dtype == jnp.float32 and y16.dtype == jnp.bfloat16
  rel = lambda a, b: float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64))
                           / np.linalg.norm(np.asarray(b, np.float64)))
  assert rel(y16, y32) < BF16_RTOL
  leaves32 = jax.tree.leaves_with_path(g32)
  leaves16 = jax.tree.leaves(g16)
  assert len(leaves32) == len(leaves16)
  for (path, want), got in zip(leaves32, leaves16):
    assert got.dtype == jnp.float32 and np.linalg.norm(want) > 0, path
    assert rel(got, want) < BF16_RTOL, (jax.tree_util.keystr(path), rel(got, want))
