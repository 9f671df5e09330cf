"""The 'fused' dispatch's C++ kernel (cpu/moe_ffn.cc via cpu/moe_ffn.py) beyond the shared
reference tests of test_dispatch.py: every activation it implements, shapes that reach its
edges (experts with more rows than one 512-row chunk, every GEMM past one 256-deep slice of K
and one 512-column block of small_gemm.h's GemmPacked, ragged 16-column strips, empty
experts), and the registry's choice of it ('moe_ffn' op)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moescale import kernel_registry
from moescale import sharding as shd
from moescale.cpu import build, moe_ffn
from moescale.layers import common, dispatch, dispatch_fused

# Skipped only where the kernels are not expected; a failed build fails (conftest.py).
pytestmark = pytest.mark.cpu_kernels


def _problem(t, d, f, e, k, bias, seed=0, drop=0.15):
  r = np.random.RandomState(seed)
  x = r.randn(t, d).astype(np.float32)
  index = np.stack([r.choice(e, k, replace=False) for _ in range(t)]).astype(np.int32)
  index[r.rand(t, k) < drop] = e                                   # dropped: the sentinel
  weights = (r.rand(t, k) * (index < e)).astype(np.float32)
  experts = dispatch.ExpertWeights(
      (r.randn(e, d, f) / d**0.5).astype(np.float32),
      (r.randn(e, f, d) / f**0.5).astype(np.float32),
      r.randn(e, f).astype(np.float32) if bias else None,
      r.randn(e, d).astype(np.float32) if bias else None)
  return x, index, weights, experts


def _numpy_loop(x, index, weights, experts, act):
  """The definition, token by token and choice by choice, in float64."""
  y = np.zeros(x.shape, np.float64)
  for t in range(x.shape[0]):
    for j in range(index.shape[1]):
      e = index[t, j]
      if e >= experts.w_in.shape[0]:
        continue
      h = x[t].astype(np.float64) @ experts.w_in[e]
      if experts.b_in is not None:
        h = h + experts.b_in[e]
      out = act(h) @ experts.w_out[e]
      if experts.b_out is not None:
        out = out + experts.b_out[e]
      y[t] += weights[t, j] * out
  return y


def _grads(backend, x, index, weights, experts, act, cot):
  loss = lambda x, w, ex: jnp.vdot(backend(x, index, w, ex, act), cot)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(x, weights, experts)


NUMPY_ACTS = {
    'relu': lambda h: np.maximum(h, 0),
    'gelu': lambda h: 0.5 * h * (1 + np.vectorize(math.erf)(h / 2**0.5)),
    'gelu_tanh': lambda h: 0.5 * h * (1 + np.tanh((2 / np.pi)**0.5 * (h + 0.044715 * h**3))),
    'silu': lambda h: h / (1 + np.exp(-h)),
}


@pytest.mark.parametrize('act', sorted(NUMPY_ACTS))
@pytest.mark.parametrize('t,d,f,e,k,bias', [
    (37, 12, 20, 5, 2, False),     # ragged strips (f 20, d 12), one empty expert likely
    (700, 300, 24, 2, 1, True),    # experts of ~300 rows; d past one 256-deep slice
    (1300, 8, 40, 2, 1, False),    # an expert with more rows than one 512-row chunk
])
def test_kernel_matches_a_numpy_loop_and_the_reference_gradients(act, t, d, f, e, k, bias):
  x, index, weights, experts = _problem(t, d, f, e, k, bias, seed=t)
  _check_kernel(x, index, weights, experts, act)


def test_every_gemm_past_a_256_deep_slice_and_a_512_column_block():
  """d = 520 and f = 528, two experts of > 256 rows each: each of the kernel's GEMMs (forward
  x w_in [K d, N f] and act w_out [K f, N d]; backward dy w_out^T [K d, N f], x^T dpre [K rows,
  N f], (w act)^T dy [K rows, N d], dpre w_in^T [K f, N d]) runs a second and third 256-deep
  slice of K and a second 512-column block of N (8 and 16 columns: a ragged and a full strip,
  so both packings of a transposed B). The other cases never pass 512 columns, nor K = f >
  256. Kills GemmPacked's strip column `n0 + 16 * s` written `16 * s` (every column block
  written over the first), which every other case of this file passes (checked on a mutated
  build). One activation: the GEMMs do not depend on it."""
  t, d, f, e = 280, 520, 528, 2
  x, index, weights, experts = _problem(t, d, f, e, 2, True, seed=5, drop=0.04)
  assert (np.bincount(index[index < e], minlength=e) > 256).all()
  _check_kernel(x, index, weights, experts, 'silu')


def _check_kernel(x, index, weights, experts, act):
  """The kernel's forward against `_numpy_loop`, its gradients against ReferenceLoop's (x,
  weights, every expert weight and bias), and exactly zero gradient for dropped weights."""
  fn = common.activation_fn(act)
  t, d = x.shape
  e = experts.w_in.shape[0]
  kernel = dispatch.get_backend('fused', kernels='cpu')
  y = jax.jit(lambda x: kernel(x, index, weights, experts, fn))(x)
  np.testing.assert_allclose(y, _numpy_loop(x, index, weights, experts, NUMPY_ACTS[act]),
                             rtol=2e-5, atol=2e-5)
  cot = np.random.RandomState(1).randn(t, d).astype(np.float32)
  got = _grads(kernel, x, index, weights, experts, fn, cot)
  want = _grads(dispatch.ReferenceLoop(), x, index, weights, experts, fn, cot)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4 * max(1.0, float(np.abs(b).max())))
  # Dropped assignments get exactly zero weight gradient.
  np.testing.assert_array_equal(np.where(index == e, got[1][1], 0.0), 0.0)


def test_activation_tails_and_jax_gelu_alias():
  # Values far into each activation's tails, where erf / tanh / exp saturate.
  h = np.linspace(-30, 30, 97, dtype=np.float32)
  x = h[:, None] * np.eye(1, 8, dtype=np.float32)          # pre-activation h in hidden unit 0
  experts = dispatch.ExpertWeights(np.eye(8, 16, dtype=np.float32)[None],
                                   np.eye(16, 8, dtype=np.float32)[None])
  index, weights = np.zeros((97, 1), np.int32), np.ones((97, 1), np.float32)
  kernel = dispatch.get_backend('fused', kernels='cpu')
  for fn in [*(common.activation_fn(n) for n in NUMPY_ACTS), jax.nn.gelu]:
    got = _grads(kernel, x, index, weights, experts, fn, x)
    want = _grads(dispatch.ReferenceLoop(), x, index, weights, experts, fn, x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      # atol: XLA's float32 tanh is ~1e-7 from -1 in the far tail (1 + tanh is 0 here), which
      # the gradient at h ~ -6 scales by h**3 * dy: ~5e-5 of values up to ~30.
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
  assert common.activation_name(jax.nn.gelu) == 'gelu_tanh'
  assert common.activation_name(lambda h: h) is None


def _custom_calls(fn, *args):
  text = jax.jit(fn).lower(*args).as_text()
  return text.count(build.MOE_FFN)


def test_float32_named_activations_take_the_kernel_others_the_xla_loop():
  x, index, weights, experts = _problem(40, 8, 16, 4, 2, False)
  kernel = dispatch.get_backend('fused', kernels='cpu')
  run = lambda act, cast=lambda a: a: lambda x: kernel(
      cast(x), index, cast(weights), jax.tree.map(cast, experts), act)
  assert _custom_calls(run(jax.nn.relu), x) == 1
  # An activation the kernel does not know, and bfloat16: the XLA loop, same results.
  square = lambda h: h * h
  assert _custom_calls(run(square), x) == 0
  bf16 = lambda a: a.astype(jnp.bfloat16)
  assert _custom_calls(run(jax.nn.relu, bf16), x) == 0
  want = jax.jit(lambda x: dispatch_fused.Fused(kernels='xla')(x, index, weights, experts,
                                                               square))(x)
  np.testing.assert_allclose(jax.jit(run(square))(x), want, rtol=1e-6)


def test_deterministic_and_all_dropped():
  x, index, weights, experts = _problem(300, 16, 32, 8, 2, True)
  kernel = dispatch.get_backend('fused', kernels='cpu')
  run = jax.jit(lambda index: kernel(x, index, weights, experts, jax.nn.relu))
  np.testing.assert_array_equal(run(index), run(index))   # the combine's order is fixed
  np.testing.assert_array_equal(run(np.full_like(index, 8)), 0.0)
  # Out-of-range ids are dropped, as the reference loop ignores them.
  bad = index.copy()
  bad[0] = [-1, 11]
  np.testing.assert_allclose(run(bad), dispatch.ReferenceLoop()(x, bad, weights, experts,
                                                                jax.nn.relu), atol=1e-5)


def test_kernel_choice():
  select = lambda name: kernel_registry.select('moe_ffn', name, dispatch_fused.XLA)
  on_host = lambda name: kernel_registry.on_host('moe_ffn', name, dispatch_fused.XLA)
  assert select('xla') is dispatch_fused.XLA
  assert select('cpu') is moe_ffn.CPU
  assert on_host('auto') is moe_ffn.CPU                  # XLA:CPU, no mesh
  x, index, weights, experts = _problem(40, 8, 16, 4, 2, False)
  auto = lambda x: dispatch.get_backend('fused')(x, index, weights, experts, jax.nn.relu)
  assert _custom_calls(auto, x) == 1
  with jax.set_mesh(shd.make_mesh(devices=jax.devices()[:2])):
    # A custom call cannot be split over devices: XLA's loop, which GSPMD splits.
    assert on_host('auto') is dispatch_fused.XLA
    assert _custom_calls(auto, x) == 0
    with pytest.raises(RuntimeError, match=r"moe_ffn kernels 'cpu' are unavailable: .*mesh of 2"):
      select('cpu')
  with pytest.raises(ValueError, match=r"'fused' dispatch kernels 'gpu'.*'auto', 'xla', 'cpu'"):
    dispatch.get_backend('fused', kernels='gpu')
