"""Which kernels run a sparse PKM read: XLA's own ops, or moescale's C++ kernels on XLA:CPU.

    kernels = get_kernels('auto')          # or 'xla', 'cpu'
    product_key_topk(s1, s2, knn, kernels=kernels); gather_values(..., kernels=kernels)

'auto' picks `CpuKernels` on XLA:CPU under a mesh of at most one device, if the C++ kernels
build, otherwise `pkm_ops.XLA` (the rule, and why the mesh matters: `kernels.cpu.choose`).

Why C++ kernels on CPU (2-core dev VM, 16k tokens, 4 heads, knn 32, d 256, fp32, medians of
interleaved runs in one process):
  - the search (`product_topk`: both halves' top-knn and the best knn of their pairs, one
    kernel; its gradient another): 86 ms + 35 ms for the gradient, against 780-800 ms for
    XLA's 'split' form (three TopK calls) and 320 ms for that form on the C++ top-k. Same
    slots: equal scores in slot order, as lax.top_k over all num_keys**2 sums.
  - top-k of [65536, 128] rows: XLA's TopK 292 ms (k 32) / 179 ms (k 16), these 47 / 19 ms,
    the same values and indices (ties in index order).
  - the value read, forward + backward: XLA (pkm_ops._gather_reduce) 912 ms, these 341 ms;
    forward alone 256 vs 116 ms. XLA's gathers are latency-bound row loads; these prefetch.
The whole PKM layer, fwd + bwd: 0.72-0.82 s against 2.37 s on XLA's ops (`moescale bench`).
They compute in float32 only: other dtypes (bf16 compute, float64 gradient checks) take XLA's
ops inside the same strategy, call by call.

Einsum letters as in pkm_ops: t tokens, s slots per token, d value width, r value rows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from moescale.kernels import cpu
from moescale.layers import pkm_ops

KERNELS = ('auto', 'xla', 'cpu')


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
    return tuple(jax.ffi.ffi_call(cpu.TOP_K, out, vmap_method='broadcast_all')(x))

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
  return tuple(jax.ffi.ffi_call(cpu.PRODUCT_TOP_K, out, vmap_method='broadcast_all')(s1, s2))


def _product_topk_fwd(s1, s2, knn, n):
  scores, slots = _product_topk(s1, s2, knn, n)
  return (scores, slots), slots


def _product_topk_bwd(knn, n, slots, grads):
  out = jax.ShapeDtypeStruct(slots.shape[:-1] + (n,), jnp.float32)
  ds1, ds2 = jax.ffi.ffi_call(cpu.PRODUCT_TOP_K_GRAD, (out, out), vmap_method='broadcast_all')(
      slots, grads[0].astype(jnp.float32))
  return ds1, ds2


_product_topk.defvjp(_product_topk_fwd, _product_topk_bwd)


def _call(target, shape, *args):
  return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(shape, jnp.float32),
                          vmap_method='sequential')(*args)


@jax.custom_vjp
def _gather_reduce(values, indices, weights):
  """values [r, d], indices [t, s] int32 in range, weights [t, s] -> [t, d], all float32."""
  return _call(cpu.GATHER_REDUCE, (indices.shape[0], values.shape[1]), values, indices, weights)


def _gather_reduce_fwd(values, indices, weights):
  return _gather_reduce(values, indices, weights), (values, indices, weights)


def _gather_reduce_bwd(res, dy):
  values, indices, weights = res
  dy = dy.astype(jnp.float32)
  dweights = _call(cpu.GATHER_DOT, weights.shape, values, indices, dy)     # <dy[t], v[idx]>
  dvalues = _call(cpu.SCATTER_ADD, values.shape, indices, weights, dy)    # v[idx] += w dy[t]
  return dvalues, None, dweights


_gather_reduce.defvjp(_gather_reduce_fwd, _gather_reduce_bwd)

CPU = CpuKernels()


def get_kernels(name: str = 'auto') -> pkm_ops.XlaKernels:
  """The kernels by name; 'auto' as the module docstring says (call it while tracing, under
  the mesh the layer runs in)."""
  return cpu.choose(name, 'PKM kernels', CPU, pkm_ops.XLA, KERNELS)
