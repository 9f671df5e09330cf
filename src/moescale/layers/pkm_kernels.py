"""Which kernels run a sparse PKM read: XLA's own ops, or moescale's C++ kernels on XLA:CPU.

    kernels = get_kernels('auto')          # or 'xla', 'cpu'
    product_key_topk(s1, s2, knn, kernels=kernels); gather_values(..., kernels=kernels)

'auto' picks `CpuKernels` when the default backend is XLA:CPU, the current mesh (jax.set_mesh)
has at most one device and the C++ kernels build (kernels/cpu.py); otherwise `pkm_ops.XLA`.
Why the mesh matters: XLA cannot split a custom call, so under a multi-device mesh it would
gather every operand onto every device and repeat the whole read there.

Why C++ kernels on CPU (2-core dev VM, 16k tokens, 4 heads, knn 32, d 256, fp32, medians of
interleaved runs in one process):
  - top-k of [65536, 128] rows: XLA's TopK 292 ms (k 32) / 179 ms (k 16), these 105 / 51 ms,
    the same values and indices (ties in index order).
  - the value read, forward + backward: XLA (pkm_ops._gather_reduce) 912 ms, these 341 ms;
    forward alone 256 vs 116 ms. XLA's gathers are latency-bound row loads; these prefetch.
They compute in float32 only: other dtypes (bf16 compute, float64 gradient checks) take XLA's
ops inside the same strategy, call by call.

Einsum letters as in pkm_ops: t tokens, s slots per token, d value width, r value rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moescale.kernels import cpu
from moescale.layers import pkm_ops

KERNELS = ('auto', 'xla', 'cpu')


def _f32(*arrays) -> bool:
  return all(jnp.dtype(a.dtype) == jnp.float32 for a in arrays)


class CpuKernels(pkm_ops.XlaKernels):
  """moescale's C++ handlers (kernels/pkm_cpu.cc) for float32; XLA's ops for other dtypes."""
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

  def gather_reduce(self, values, indices, weights, dtype, chunk):
    if not (_f32(values, weights) and jnp.dtype(dtype) == jnp.float32):
      return super().gather_reduce(values, indices, weights, dtype, chunk)
    return _gather_reduce(values, indices, weights)


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
  if name not in KERNELS:
    raise ValueError(f'unknown PKM kernels {name!r}; valid: {list(KERNELS)}')
  if name == 'xla':
    return pkm_ops.XLA
  if name == 'cpu':
    if not cpu.load():
      raise RuntimeError(f"PKM kernels='cpu' are unavailable: {cpu.failure()}; use 'auto' "
                         "or 'xla'")
    return CPU
  mesh = jax.sharding.get_abstract_mesh()
  if jax.default_backend() == 'cpu' and (mesh.empty or mesh.size <= 1) and cpu.load():
    return CPU
  return pkm_ops.XLA
