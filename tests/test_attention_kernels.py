"""The C++ attention kernel (cpu/attention.cc via cpu/attention.py) against XLA's form, and the
registry's choice of it ('attention' op).

Its products run small_gemm.h's plain Gemm (register tiles of 6 rows x 16 columns, no slices of
K nor blocks of columns, unlike moe_ffn.cc's GemmPacked): T = 37 and D = 12 already reach its
ragged row and column tiles, so no case needs the 256-deep / 512-column shapes of
test_dispatch_fused_cpu (the kernels live in moescale/cpu/)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moescale import kernel_registry
from moescale import sharding as shd
from moescale.cpu import attention as cpu_attention
from moescale.cpu import build
from moescale.model import attention_kernels as ak
from moescale.model.attention import Attention

CPU = cpu_attention.CPU

# Skipped only where the kernels are not expected; a failed build fails (conftest.py).
pytestmark = pytest.mark.cpu_kernels


def _qkv(b, t, h, d, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  return [jax.random.normal(k, (b, t, h, d)) for k in keys]


def _reference_loop(q, k, v, seg, scale):
  """Plain numpy, one query at a time: softmax over the keys it sees, then the weighted sum."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  b, t, h, _ = q.shape
  seg = np.ones((b, t), int) if seg is None else np.asarray(seg)
  out = np.zeros_like(q)
  for bi in range(b):
    for hi in range(h):
      for i in range(t):
        seen = [j for j in range(i + 1) if seg[bi, j] == seg[bi, i]]
        s = np.array([q[bi, i, hi] @ k[bi, j, hi] for j in seen]) * scale
        p = np.exp(s - s.max())
        out[bi, i, hi] = (p / p.sum()) @ v[bi, seen, hi]
  return out


PACKED = np.array([[1] * 10 + [2] * 20 + [0] * 7,   # two documents, then padding
                   [3] * 37])


@pytest.mark.parametrize('shape,segments', [
    ((2, 37, 3, 12), PACKED),   # T and D off the 8- and 16-lane tiles, packed rows
    ((2, 37, 3, 12), None),
    ((1, 5, 1, 3), None),
    ((2, 64, 2, 32), 'ones'),
])
def test_kernel_matches_xla_and_a_reference_loop(shape, segments):
  q, k, v, dout = _qkv(*shape)
  seg = jnp.ones(shape[:2], jnp.int32) if isinstance(segments, str) else (
      None if segments is None else jnp.asarray(segments))
  scale = shape[-1] ** -0.5

  def run(kernels):
    f = lambda q, k, v: kernels.attend(q, k, v, seg, scale=scale)
    out = jax.jit(f)(q, k, v)
    grads = jax.jit(jax.grad(lambda *a: (f(*a) * dout).sum(), argnums=(0, 1, 2)))(q, k, v)
    return out, grads

  (out_c, grads_c), (out_x, grads_x) = run(CPU), run(ak.XLA)
  np.testing.assert_allclose(out_c, _reference_loop(q, k, v, seg, scale), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out_c, out_x, rtol=1e-5, atol=1e-5)
  for gc, gx in zip(grads_c, grads_x):
    np.testing.assert_allclose(gc, gx, rtol=1e-4, atol=2e-5)


def test_padding_sees_only_padding_and_documents_do_not_mix():
  q, k, v, _ = _qkv(2, 37, 3, 12, seed=3)
  seg = jnp.asarray(PACKED)
  out = CPU.attend(q, k, v, seg, scale=0.3)
  # Changing the second document's values leaves the first document's outputs alone.
  v2 = v.at[0, 10:30].add(5.0)
  out2 = CPU.attend(q, k, v2, seg, scale=0.3)
  np.testing.assert_array_equal(out[0, :10], out2[0, :10])
  assert not np.allclose(out[0, 10:30], out2[0, 10:30])
  np.testing.assert_array_equal(out[0, 30:], out2[0, 30:])


def test_vmap_is_one_call_on_the_batch():
  q, k, v, _ = _qkv(6, 16, 2, 8)
  seg = jnp.ones((6, 16), jnp.int32)
  qs, ks, vs, ss = (a.reshape(2, 3, *a.shape[1:]) for a in (q, k, v, seg))
  f = lambda q, k, v, s: CPU.attend(q, k, v, s, scale=0.5)
  np.testing.assert_allclose(jax.vmap(f)(qs, ks, vs, ss).reshape(q.shape), f(q, k, v, seg),
                             rtol=1e-6, atol=1e-6)


def test_dropout_and_other_dtypes_take_xlas_ops():
  q, k, v, _ = _qkv(2, 16, 2, 8)
  rngs_a, rngs_b = nnx.Rngs(dropout=7), nnx.Rngs(dropout=7)
  a = CPU.attend(q, k, v, None, scale=0.5, dropout=0.5, deterministic=False, rngs=rngs_a)
  b = ak.XLA.attend(q, k, v, None, scale=0.5, dropout=0.5, deterministic=False, rngs=rngs_b)
  np.testing.assert_array_equal(a, b)
  lo = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  out = CPU.attend(*lo, None, scale=0.5)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(out, ak.XLA.attend(*lo, None, scale=0.5))


def _module_custom_calls(dropout=0.0, deterministic=True):
  """The moescale custom calls in the program of an Attention module's forward and backward
  (kernels='auto'), traced under the current mesh."""
  m = Attention(16, 2, kernels='auto', dropout=dropout, rngs=nnx.Rngs(0))
  g, p, rest = nnx.split(m, nnx.Param, ...)
  x = jax.random.normal(jax.random.key(0), (2, 8, 16))

  def loss(p, x):
    return (nnx.merge(g, p, rest, copy=True)(x, deterministic=deterministic) ** 2).sum()
  text = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(p, x).as_text()
  return {c for c in re.findall(r'custom_call @([\w.$-]+)', text) if c.startswith('moescale')}


def test_kernel_choice():
  with pytest.raises(ValueError, match=r"unknown attention kernels 'cuda'.*'auto', 'xla', 'cpu'"):
    ak.get_kernels('cuda')
  assert ak.get_kernels('xla') is ak.XLA and ak.get_kernels('cpu') is CPU
  on_host = lambda: kernel_registry.on_host('attention', 'auto', ak.XLA)
  assert on_host() is CPU                          # XLA:CPU, no mesh
  assert _module_custom_calls() == {build.ATTENTION, build.ATTENTION_GRAD}
  # Attention dropout in training: XLA's ops (its RNG draws stay out of a platform branch).
  assert ak.get_kernels('auto', dropping=True) is ak.XLA
  assert ak.get_kernels('cpu', dropping=True) is ak.XLA
  assert _module_custom_calls(dropout=0.1, deterministic=False) == set()
  assert _module_custom_calls(dropout=0.1) == {build.ATTENTION, build.ATTENTION_GRAD}
  with jax.set_mesh(shd.make_mesh(devices=jax.devices()[:2])):
    assert on_host() is ak.XLA                     # a custom call cannot be split over devices
    assert _module_custom_calls() == set()
  with pytest.raises(ValueError, match=r"kernels='fast' is not one of"):
    Attention(16, 2, kernels='fast', rngs=nnx.Rngs(0))


def test_attention_module_same_either_way():
  x = jax.random.normal(jax.random.key(0), (2, 24, 16))
  seg = jnp.asarray([[1] * 10 + [2] * 14, [1] * 20 + [0] * 4])
  outs = {}
  for kernels in ('xla', 'cpu'):
    m = Attention(16, 2, kernels=kernels, rotary=True, rngs=nnx.Rngs(0))
    g, p = nnx.split(m)
    loss = lambda p: (nnx.merge(g, p)(x, segment_ids=seg) ** 2).sum()
    outs[kernels] = (m(x, segment_ids=seg), jax.grad(loss)(p))
  np.testing.assert_allclose(outs['cpu'][0], outs['xla'][0], rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(outs['cpu'][1]), jax.tree.leaves(outs['xla'][1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
