"""moescale's C++ XLA:CPU kernels for the PKM (cpu/pkm_*.cc via cpu/pkm.py, the 'pkm' op of
kernel_registry): each equals a plain reference, the layer computes the same with either
kernels, 'auto' lowers them only where they apply, and a machine without a compiler gets a
clear reason."""

import itertools
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moescale import kernel_registry
from moescale import sharding as shd
from moescale.cpu import build
from moescale.cpu import pkm as cpu_pkm
from moescale.layers import ProductKeyMemory, pkm_ops

# Skipped only where the kernels are not expected; a failed build fails (conftest.py).
pytestmark = pytest.mark.cpu_kernels


def _select(name):
  return kernel_registry.select('pkm', name, pkm_ops.XLA)


def _on_host(name):
  return kernel_registry.on_host('pkm', name, pkm_ops.XLA)


@pytest.fixture(scope='module')
def kernels():
  return _select('cpu')   # loaded: conftest.py failed the test otherwise


# n <= 256 takes the rank-counting top-k, longer rows the insertion one (pkm_search.cc).
@pytest.mark.parametrize('n,k', [(1, 1), (7, 3), (128, 16), (256, 32), (290, 32), (5, 5)])
def test_top_k_equals_a_stable_sort_ties_and_infinities_included(kernels, n, k):
  # Integer values tie everywhere; -inf fills some entries (the split search masks with it).
  x = jax.random.randint(jax.random.key(n), (3, 37, n), -4, 5).astype(jnp.float32)
  x = jnp.where(jax.random.bernoulli(jax.random.key(k), 0.1, x.shape), -jnp.inf, x)
  values, indices = jax.jit(lambda x: kernels.top_k(x, k))(x)
  want_idx = np.argsort(-np.asarray(x), axis=-1, kind='stable')[..., :k]  # lower index first
  np.testing.assert_array_equal(indices, want_idx)
  np.testing.assert_array_equal(values, np.take_along_axis(np.asarray(x), want_idx, -1))
  # ... which is what lax.top_k returns, and under vmap too.
  ref = jax.lax.top_k(x, k)
  np.testing.assert_array_equal(indices, ref[1])
  vm = jax.vmap(lambda r: kernels.top_k(r, k))(x)
  np.testing.assert_array_equal(vm[1], ref[1])


@pytest.mark.parametrize('knn,n,form', [(4, 8, 'split'), (8, 32, 'split'), (13, 8, 'split'),
                                        (6, 8, 'pairs'), (4, 8, 'full')])
def test_product_search_with_cpu_kernels_equals_brute_force(kernels, knn, n, form):
  k1, k2 = jax.random.split(jax.random.key(knn))
  s1, s2 = jax.random.normal(k1, (9, 2, n)), jax.random.normal(k2, (9, 2, n))
  scores, idx = jax.jit(lambda a, b: pkm_ops.product_key_topk(a, b, knn, form, kernels))(s1, s2)
  full = (np.asarray(s1)[..., :, None] + np.asarray(s2)[..., None, :]).reshape(9, 2, n * n)
  want = -np.sort(-full, axis=-1)[..., :knn]
  np.testing.assert_allclose(scores, want, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.take_along_axis(full, np.asarray(idx), -1), want, atol=1e-6)
  # The same slots as XLA's top-k picks (no ties in normal samples), and the same gradient
  # (the kernel's own VJP against take_along_axis's transpose; rows repeat across slots).
  _, xla_idx = pkm_ops.product_key_topk(s1, s2, knn, form)
  np.testing.assert_array_equal(idx, xla_idx)
  w = jax.random.normal(jax.random.key(7), idx.shape)
  grad = lambda k: jax.jit(jax.grad(
      lambda a, b: jnp.vdot(pkm_ops.product_key_topk(a, b, knn, form, k)[0], w), (0, 1)))(s1, s2)
  for got, want in zip(grad(kernels), grad(pkm_ops.XLA)):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('knn,n', [(32, 16), (5, 3), (9, 3), (1, 4)])
def test_product_search_kernel_equals_top_k_of_the_full_table_ties_included(kernels, knn, n):
  # Integer scores tie everywhere and -inf masks some: the kernel's heap merge must still give
  # lax.top_k of all n^2 sums (equal sums in slot order), for knn below, at and above n.
  k1, k2, k3 = jax.random.split(jax.random.key(knn * n), 3)
  s1, s2 = (jax.random.randint(k, (4, 7, n), -3, 4).astype(jnp.float32) for k in (k1, k2))
  s1 = jnp.where(jax.random.bernoulli(k3, 0.1, s1.shape), -jnp.inf, s1)
  slots = jax.jit(lambda a, b: kernels.product_topk(a, b, knn, 'split')[1])(s1, s2)
  full = (s1[..., :, None] + s2[..., None, :]).reshape(4, 7, n * n)
  np.testing.assert_array_equal(slots, jax.lax.top_k(full, knn)[1])
  np.testing.assert_array_equal(jax.vmap(lambda a, b: kernels.product_topk(a, b, knn, 'split')[1])(
      s1, s2), slots)


def test_top_k_rows_with_nan_give_distinct_indices_and_leave_other_rows_exact(kernels):
  x = jax.random.normal(jax.random.key(0), (4, 128))
  x = x.at[1, 5].set(jnp.nan).at[2].set(jnp.nan)
  _, idx = kernels.top_k(x, 16)
  for row in np.asarray(idx):
    assert len(set(row.tolist())) == 16 and row.min() >= 0 and row.max() < 128
  np.testing.assert_array_equal(idx[::3], jax.lax.top_k(x[::3], 16)[1])


def test_gather_values_and_gradients_equal_plain_loops(kernels):
  # Few rows, so tokens share rows and a token's slots repeat rows: the value gradient must
  # accumulate. d = 19 leaves a tail after the kernels' 8-wide dot; 300 tokens and 64 rows
  # split over threads where the machine has several.
  t, s, r, d = 300, 12, 64, 19
  k = jax.random.split(jax.random.key(7), 4)
  values = jax.random.normal(k[0], (r, d))
  idx = jax.random.randint(k[1], (t, s), 0, r)
  w = jax.random.normal(k[2], (t, s))
  cot = jax.random.normal(k[3], (t, d))

  @jax.jit
  def run(values, w):
    y, vjp = jax.vjp(lambda v, w: pkm_ops.gather_values(v, idx, w, kernels=kernels), values, w)
    return y, vjp(cot)

  y, (dv, dw) = run(values, w)
  v64, i, w64, c64 = (np.asarray(a, np.float64) for a in (values, idx, w, cot))
  i = i.astype(int)
  np.testing.assert_allclose(y, np.einsum('tsd,ts->td', v64[i], w64), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw, np.einsum('tsd,td->ts', v64[i], c64), rtol=1e-5, atol=1e-5)
  want_dv = np.zeros((r, d))
  for a, b in itertools.product(range(t), range(s)):
    want_dv[i[a, b]] += w64[a, b] * c64[a]
  np.testing.assert_allclose(dv, want_dv, rtol=1e-5, atol=1e-4)


def test_other_dtypes_take_xla_ops_inside_the_cpu_strategy(kernels):
  values = jax.random.normal(jax.random.key(0), (6, 8))
  idx = jnp.array([[0, 5], [2, 2]], jnp.int32)
  w = jnp.array([[0.5, -1.0], [2.0, 1.0]])
  for dtype in (jnp.bfloat16, jnp.float16):
    got = pkm_ops.gather_values(values, idx, w, dtype, kernels=kernels)
    want = pkm_ops.gather_values(values, idx, w, dtype)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, want)
  x = jax.random.normal(jax.random.key(1), (4, 9)).astype(jnp.bfloat16)
  np.testing.assert_array_equal(kernels.top_k(x, 3)[1], jax.lax.top_k(x, 3)[1])


@pytest.mark.parametrize('query_proj', [True, False])
def test_layer_is_the_same_with_cpu_and_xla_kernels(kernels, query_proj):
  x = jax.random.normal(jax.random.key(2), (2, 33, 32))
  outs = {}
  for name in ('xla', 'cpu'):
    layer = ProductKeyMemory(32, num_heads=2, num_keys=16, knn=8, query_proj=query_proj,
                             score_fn='relu', kernels=name, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def loss(params, x):
      y, _ = nnx.merge(graphdef, params, rest, copy=True)(x, deterministic=True)
      return jnp.sum(jnp.sin(y))
    outs[name] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)
  a, b = outs['xla'], outs['cpu']
  np.testing.assert_allclose(a[0], b[0], rtol=1e-5)
  for ga, gb in zip(jax.tree.leaves(a[1]), jax.tree.leaves(b[1])):
    np.testing.assert_allclose(ga, gb, rtol=1e-4, atol=1e-5)


def _layer_custom_calls(kernels='auto'):
  """The moescale custom calls in the program of a sparse PKM's forward and backward, traced
  under the current mesh."""
  layer = ProductKeyMemory(32, num_heads=2, num_keys=16, knn=8, query_proj=False,
                           score_fn='relu', kernels=kernels, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
  x = jax.random.normal(jax.random.key(2), (2, 8, 32))

  def loss(params, x):
    return jnp.sum(nnx.merge(graphdef, params, rest, copy=True)(x, deterministic=True)[0])
  text = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(params, x).as_text()
  return {c for c in re.findall(r'custom_call @([\w.$-]+)', text) if c.startswith('moescale')}


def test_auto_uses_cpu_kernels_on_one_device_and_xla_under_a_device_mesh(kernels):
  assert kernels is cpu_pkm.CPU
  assert _on_host('auto') is kernels                   # no mesh: one device's program
  # The layer's program built for this host runs the search and the value read as kernels.
  want = {build.PRODUCT_TOP_K, build.PRODUCT_TOP_K_GRAD, build.GATHER_REDUCE,
          build.GATHER_DOT, build.SCATTER_ADD}
  assert _layer_custom_calls() == want
  with jax.set_mesh(shd.make_mesh(devices=jax.devices()[:1])):
    assert _on_host('auto') is kernels
    assert _layer_custom_calls() == want
  if jax.device_count() > 1:  # a custom call cannot be split: XLA's ops, which GSPMD splits
    with jax.set_mesh(shd.make_mesh()):
      assert _on_host('auto') is pkm_ops.XLA
      assert _layer_custom_calls() == set()
      with pytest.raises(RuntimeError, match=r"pkm kernels 'cpu' are unavailable: .*mesh"):
        _select('cpu')
  assert _select('xla') is pkm_ops.XLA
  assert _layer_custom_calls('xla') == set()


def test_bad_names_and_a_missing_compiler_are_clear_errors(tmp_path, monkeypatch):
  with pytest.raises(ValueError, match=r"unknown kernels 'gpu'.*'auto', 'xla', 'cpu'"):
    ProductKeyMemory(32, num_keys=16, knn=8, kernels='gpu', rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"unknown pkm kernels 'fast'"):
    _select('fast')
  monkeypatch.setenv('CXX', str(tmp_path / 'no-such-compiler'))
  with pytest.raises(build.KernelBuildError, match='no-such-compiler'):
    build.build(tmp_path / 'cache')
  assert not list((tmp_path / 'cache').glob('*'))  # no half-written library left behind
  monkeypatch.setattr(build, 'load', lambda: False)
  monkeypatch.setattr(build, 'failure', lambda: 'no C++ compiler found')
  with pytest.raises(RuntimeError, match="kernels 'cpu' are unavailable: no C.. compiler"):
    _select('cpu')
  assert _on_host('auto') is pkm_ops.XLA      # auto falls back silently
  assert _layer_custom_calls() == set()       # and its program has no kernel in it


def test_library_name_follows_the_source_and_a_built_library_is_reused(kernels, tmp_path,
                                                                        monkeypatch):
  built = build.library_path()                     # what `load()` built or found
  assert built.exists()
  cached = build.library_path(tmp_path)
  assert cached.name == built.name and cached.parent == tmp_path
  shutil.copy(built, cached)
  monkeypatch.setattr(build.subprocess, 'Popen', lambda *a, **k: pytest.fail('recompiled'))
  assert build.build(tmp_path) == cached           # found, not compiled again
  edited = tmp_path / 'pkm_search.cc'
  edited.write_text(build.SOURCES[0].read_text() + '\n// edited\n')
  monkeypatch.setattr(build, 'SOURCES', (edited, *build.SOURCES[1:]))
  assert build.library_path(tmp_path) != cached    # an edited source builds its own library
