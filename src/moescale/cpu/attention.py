"""softmax(scale q k^T + mask) v as a C++ kernel on XLA:CPU (attention.cc), forward and a
recomputing backward: a drop-in `attention_kernels.XlaAttention`, registered as the
'attention' op's 'cpu' kernels.

Why: XLA's form transposes q, k and v to [b, h, t, k] and back, runs the mask, softmax and
their gradients as separate passes over [b, h, q, t] and sends the batched dots to Eigen; the
kernel keeps one head's scores in cache between small GEMMs. It runs on the calling thread:
XLA:CPU already runs parallel microbatches' calls side by side. It computes float32 without
attention dropout; other dtypes take XLA's ops inside the same strategy, call by call.
docs/performance.md has the measurements.

Einsum letters: b batch, q query positions, t key positions, h heads, k head_dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from moescale.cpu import build
from moescale.model import attention_kernels


class CpuAttention(attention_kernels.XlaAttention):
  """kernels/attention.cc for float32 without dropout; XLA's ops otherwise."""
  name = 'cpu'

  def attend(self, q, k, v, segment_ids, *, scale, dropout=0.0, deterministic=True, rngs=None):
    dropping = dropout > 0 and not deterministic
    if dropping or any(jnp.dtype(a.dtype) != jnp.float32 for a in (q, k, v)):
      return super().attend(q, k, v, segment_ids, scale=scale, dropout=dropout,
                            deterministic=deterministic, rngs=rngs)
    if segment_ids is None:
      segment_ids = jnp.ones(q.shape[:2], jnp.int32)
    return _attention(q, k, v, segment_ids.astype(jnp.int32), float(scale))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, segment_ids, scale):
  return _attention_fwd(q, k, v, segment_ids, scale)[0]


def _attention_fwd(q, k, v, segment_ids, scale):
  b, t, h, _ = q.shape
  out = (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct((b, h, t), jnp.float32))
  # Heads are independent: a vmapped call is one call on the broadcast batch.
  o, lse = jax.ffi.ffi_call(build.ATTENTION, out, vmap_method='broadcast_all')(
      q, k, v, segment_ids, scale=np.float32(scale))
  return o, (q, k, v, segment_ids, lse)


def _attention_bwd(scale, res, do):
  q, k, v, segment_ids, lse = res
  out = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v))
  dq, dk, dv = jax.ffi.ffi_call(build.ATTENTION_GRAD, out, vmap_method='broadcast_all')(
      q, k, v, segment_ids, lse, do.astype(jnp.float32), scale=np.float32(scale))
  return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)


CPU = CpuAttention()
