"""The 'fused' dispatch backend against ReferenceLoop (forward and every gradient), its block
sizes, its memory behaviour and the packed-key sort it relies on. Tiny shapes."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from moescale.layers import dispatch, dispatch_ops
from moescale.layers.dispatch_fused import Fused, choose_block_size

E, D, F = 5, 6, 10
EMPTY = 3  # no token is routed here: an expert with an empty group


def _problem(t=13, k=2, bias=True, seed=0, drop=0.2):
  """Random routing (duplicates within a token allowed), dropped entries with nonzero weight
  (must still be skipped), one empty expert."""
  ks = jax.random.split(jax.random.key(seed), 9)
  x = jax.random.normal(ks[0], (t, D))
  index = jax.random.randint(ks[1], (t, k), 0, E - 1)
  index = jnp.where(index >= EMPTY, index + 1, index)
  index = jnp.where(jax.random.uniform(ks[2], (t, k)) < drop, E, index).astype(jnp.int32)
  weights = jax.random.uniform(ks[3], (t, k), minval=0.1)
  experts = dispatch.ExpertWeights(
      jax.random.normal(ks[4], (E, D, F)) / D**0.5, jax.random.normal(ks[5], (E, F, D)) / F**0.5,
      jax.random.normal(ks[6], (E, F)) if bias else None,
      jax.random.normal(ks[7], (E, D)) if bias else None)
  return x, index, weights, experts, jax.random.normal(ks[8], (t, D))


def _value_and_grads(backend, x, index, weights, experts, cotangent):
  def loss(x, weights, experts):
    y = backend(x, index, weights, experts, jax.nn.gelu)
    return jnp.vdot(y, cotangent), y
  (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
      x, weights, experts)
  return y, grads


@pytest.mark.parametrize('k,bias,block_size,granule', [
    (1, False, 4, 2), (2, True, 4, 2), (4, False, 8, 2), (4, True, 4, 4), (2, False, None, None)])
def test_fused_matches_reference_forward_and_gradients(k, bias, block_size, granule):
  x, index, weights, experts, cot = _problem(k=k, bias=bias, seed=k)
  want_y, want_g = _value_and_grads(dispatch.ReferenceLoop(), x, index, weights, experts, cot)
  got_y, got_g = _value_and_grads(Fused(block_size, granule), x, index, weights, experts, cot)
  np.testing.assert_allclose(got_y, want_y, rtol=1e-5, atol=1e-5)
  assert jax.tree.structure(got_g) == jax.tree.structure(want_g)
  for got, want in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(got_g[2].w_in[EMPTY], 0.0)
  np.testing.assert_array_equal(jnp.where(index == E, got_g[1], 0.0), 0.0)


def test_fused_is_the_cpu_default_and_registered():
  assert dispatch.default_backend_name('cpu') == 'fused'
  assert isinstance(dispatch.get_backend('fused', block_size=8), Fused)
  assert 'fused' in dispatch.available_backends()


def test_fused_duplicates_out_of_range_ids_all_dropped_and_one_expert():
  x, index, weights, experts, _ = _problem(t=9, k=3)
  index = index.at[0].set(jnp.array([1, 1, 2])).at[1].set(jnp.array([-1, E + 3, 0]))
  run = jax.jit(lambda index: Fused(4, 2)(x, index, weights, experts, jax.nn.gelu))
  want = jax.jit(lambda index: dispatch.ReferenceLoop()(x, index, weights, experts, jax.nn.gelu))
  np.testing.assert_allclose(run(index), want(index), atol=1e-5)
  np.testing.assert_array_equal(run(jnp.full_like(index, E)), 0.0)
  # Blocks larger than all the rows (one expert on one device of an expert-parallel mesh).
  one = dispatch.ExpertWeights(experts.w_in[:1], experts.w_out[:1])
  index1 = jnp.array([[0, 1]] * 6, jnp.int32)
  got = jax.jit(lambda x: Fused(64, 16)(x, index1, weights[:6, :2], one, jax.nn.relu))(x[:6])
  np.testing.assert_allclose(
      got, dispatch.ReferenceLoop()(x[:6], index1, weights[:6, :2], one, jax.nn.relu),
      rtol=1e-5, atol=1e-5)


def test_fused_bf16_keeps_dtype_and_tracks_fp32():
  x, index, weights, experts, _ = _problem(bias=False)
  run = jax.jit(lambda x, e: Fused(4, 2)(x, index, weights, e, jax.nn.gelu))
  y16 = run(x.astype(jnp.bfloat16), jax.tree.map(lambda a: a.astype(jnp.bfloat16), experts))
  assert y16.dtype == jnp.bfloat16
  y32 = dispatch.ReferenceLoop()(x, index, weights, experts, jax.nn.gelu)
  np.testing.assert_allclose(y16.astype(jnp.float32), y32, atol=0.1, rtol=0.05)


def _shapes_in(jaxpr):
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      yield tuple(getattr(var.aval, 'shape', ()))
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from _shapes_in(sub)


def test_fused_keeps_no_weight_copies_and_no_row_buffers():
  t, k = 40, 4
  x, index, weights, experts, cot = _problem(t=t, k=k, bias=False)

  def shapes(backend):
    grad = jax.grad(lambda x, w, e: jnp.vdot(backend(x, index, w, e, jax.nn.relu), cot),
                    argnums=(0, 1, 2))
    return set(_shapes_in(jax.make_jaxpr(grad)(x, weights, experts).jaxpr))
  fused = shapes(Fused(4, 2))
  # No stacked expert weights (one copy per loop iteration, as autodiff of the loop would keep)
  assert not {s for s in fused if len(s) == 3 and s[1:] in ((D, F), (F, D)) and s[0] not in (1, E)}
  # and no permuted [rows >= t*k, d] buffer: only [t, d] (x, y, dx) and block-sized rows,
  # where the unfused 'blocked' backend has several (the check can fail).
  row_buffers = lambda shapes: {s for s in shapes if len(s) == 2 and s[1] == D and s[0] >= t * k}
  assert not row_buffers(fused)
  assert row_buffers(shapes(dispatch.get_backend('blocked', block_size=4, granule=2)))


def test_choose_block_size_multiples_bounded_classes():
  for n, e in [(65536, 16), (65536, 128), (32768, 512), (4096, 16), (52, 5), (1, 1)]:
    block, granule = choose_block_size(n, e)
    assert block % granule == 0 and 16 <= block <= 1024 and block // granule <= 16
  assert choose_block_size(65536, 128) == (1024, 64)   # measured best-ish for σ-MoE, 128 experts


def test_packed_sort_equals_stable_argsort():
  index = jax.random.randint(jax.random.key(5), (300, 3), -2, E + 3).astype(jnp.int32)
  s = jax.jit(dispatch_ops.sort_and_rank, static_argnums=1)(index, E)
  flat = np.asarray(index).reshape(-1)
  flat = np.where((flat < 0) | (flat > E), E, flat)
  order = np.argsort(flat, kind='stable')
  np.testing.assert_array_equal(s.order, order)
  np.testing.assert_array_equal(s.sorted_expert, flat[order])
  np.testing.assert_array_equal(s.group_sizes, np.bincount(flat, minlength=E + 1)[:E])
