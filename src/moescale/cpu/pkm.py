"""The product-key memory's sparse read as C++ kernels on XLA:CPU (pkm_search.cc,
pkm_gather.cc): a drop-in `pkm_ops.XlaKernels` strategy, registered as the 'pkm' op's 'cpu'
kernels (moescale.cpu).

  - the search (`product_topk`): both halves' top-knn and the best knn of their pairs as one
    kernel (rank-counting top-k, a best-pair-first walk of the sorted lists), its gradient as
    another. XLA's form is three TopK calls, each a serial partial sort per row. Same slots:
    equal scores in slot order, as lax.top_k over all num_keys**2 sums.
  - `top_k`: lax.top_k's values and indices (ties in index order).
  - the value read (`gather_reduce`) and its VJP: XLA's gathers are latency-bound row loads;
    these prefetch.
They compute in float32 only: other dtypes (bf16 compute, float64 gradient checks) take XLA's
ops inside the same strategy, call by call. docs/performance.md has the measurements.

Einsum letters as in pkm_ops: t tokens, s slots per token, d value width, r value rows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from moescale.cpu import build
from moescale.layers import pkm_ops


def _f32(*arrays) -> bool:
  return all(jnp.dtype(a.dtype) == jnp.float32 for a in arrays)


class CpuKernels(pkm_ops.XlaKernels):
  """moescale's C++ handlers (kernels/pkm_search.cc, pkm_gather.cc) for float32; XLA's ops
  for other dtypes."""
  name = 'cpu'

  def top_k_each(self, xs, k):
    return tuple(v for x in xs for v in self.top_k(x, k))

  def top_k(self, x, k):
    if not _f32(x):
      return super().top_k(x, k)
    shape = x.shape[:-1] + (k,)
    out = (jax.ShapeDtypeStruct(shape, jnp.float32), jax.ShapeDtypeStruct(shape, jnp.int32))
    # Rows are independent: a vmapped call is one call on the broadcast batch.
    return tuple(jax.ffi.ffi_call(build.TOP_K, out, vmap_method='broadcast_all')(x))

  def product_topk(self, s1, s2, knn, form):
    """The whole search as one kernel, its gradient as another (every form has the same
    result; equal scores in slot order, as lax.top_k over all num_keys**2 sums)."""
    if not _f32(s1, s2):
      return super().product_topk(s1, s2, knn, form)
    return _product_topk(s1, s2, knn, s1.shape[-1])

  def gather_reduce(self, values, indices, weights, dtype, chunk):
    if not (_f32(values, weights) and jnp.dtype(dtype) == jnp.float32):
      return super().gather_reduce(values, indices, weights, dtype, chunk)
    return _gather_reduce(values, indices, weights)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _product_topk(s1, s2, knn, n):
  """s1, s2 [..., n] float32 -> (scores [..., knn], slots [..., knn] int32)."""
  shape = s1.shape[:-1] + (knn,)
  out = (jax.ShapeDtypeStruct(shape, jnp.float32), jax.ShapeDtypeStruct(shape, jnp.int32))
  # Rows are independent: a vmapped call is one call on the broadcast batch.
  return tuple(jax.ffi.ffi_call(build.PRODUCT_TOP_K, out, vmap_method='broadcast_all')(s1, s2))


def _product_topk_fwd(s1, s2, knn, n):
  scores, slots = _product_topk(s1, s2, knn, n)
  return (scores, slots), slots


def _product_topk_bwd(knn, n, slots, grads):
  out = jax.ShapeDtypeStruct(slots.shape[:-1] + (n,), jnp.float32)
  ds1, ds2 = jax.ffi.ffi_call(build.PRODUCT_TOP_K_GRAD, (out, out), vmap_method='broadcast_all')(
      slots, grads[0].astype(jnp.float32))
  return ds1, ds2


_product_topk.defvjp(_product_topk_fwd, _product_topk_bwd)


def _call(target, shape, *args):
  return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(shape, jnp.float32),
                          vmap_method='sequential')(*args)


@jax.custom_vjp
def _gather_reduce(values, indices, weights):
  """values [r, d], indices [t, s] int32 in range, weights [t, s] -> [t, d], all float32."""
  return _call(build.GATHER_REDUCE, (indices.shape[0], values.shape[1]), values, indices, weights)


def _gather_reduce_fwd(values, indices, weights):
  return _gather_reduce(values, indices, weights), (values, indices, weights)


def _gather_reduce_bwd(res, dy):
  values, indices, weights = res
  dy = dy.astype(jnp.float32)
  dweights = _call(build.GATHER_DOT, weights.shape, values, indices, dy)     # <dy[t], v[idx]>
  dvalues = _call(build.SCATTER_ADD, values.shape, indices, weights, dy)    # v[idx] += w dy[t]
  return dvalues, None, dweights


_gather_reduce.defvjp(_gather_reduce_fwd, _gather_reduce_bwd)

CPU = CpuKernels()
