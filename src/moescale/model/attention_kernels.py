"""What computes the attention core softmax(scale q k^T + mask) v: XLA's ops or a C++ kernel.

    kernels = get_kernels('auto')                     # or 'xla', 'cpu'
    heads = kernels.attend(q, k, v, segment_ids, scale=..., dropout=..., ...)

'auto' picks `CpuAttention` on XLA:CPU under a mesh of at most one device, if the C++ kernels
build, otherwise `XLA` (the rule, and why the mesh matters: `kernels.cpu.choose`).

Why a kernel on CPU (2-core dev VM, fp32): in the d_model 128 train steps of `moescale bench`
(16 rows of 128 tokens, 4 heads of 32; MFU, median over rounds, side by side) the dense model
went 39.2% -> 44.1% at 1 parallel microbatch and 46.1% -> 49.0% at 2. XLA's form transposes q,
k and v to [b, h, t, k] and back, runs the mask, softmax and their gradients as separate passes
over [b, h, q, t] and sends the batched dots to Eigen (the core alone, fwd+bwd of the batch
above: 16.4-16.8 ms on both cores); the kernel keeps one head's scores in cache between small
GEMMs (one head fwd 50-65 us, bwd 116-141 us on one core). The kernel runs on the calling
thread: XLA:CPU already runs the parallel microbatches' calls side by side (a second thread
per call measured no faster in the step).
It computes float32 without attention dropout; other dtypes, or dropout in training, take
XLA's ops inside the same strategy, call by call.

Einsum letters: b batch, q query positions, t key positions, h heads, k head_dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moescale.kernels import cpu
from moescale.layers import common

KERNELS = ('auto', 'xla', 'cpu')
# Masked scores get a large finite negative number, not -inf: a row is never fully masked (a
# token always sees itself), but a finite fill keeps the backward pass NaN-free even if it were.
_MASKED = -1e30


def attention_mask(segment_ids: jax.Array | None, qlen: int, mlen: int = 0) -> jax.Array:
  """Which keys each query may see: [batch or 1, 1, qlen, mlen + qlen] bool.

  Causal by index within the row: query i (the i-th current token) sees memory slots 0..mlen-1
  and current tokens 0..i. With segment_ids [batch, qlen] (0 = padding, as seqio packs), a
  current token sees only tokens of its own segment; padding sees only padding, so no real
  token ever attends to padding and no row is empty. The memory (Transformer-XL, unpacked
  streams) precedes the row and is visible to every non-padding query.
  """
  q_index = jnp.arange(qlen)[:, None]
  k_index = jnp.arange(qlen)[None, :]
  causal = (k_index <= q_index)[None, None]                       # [1, 1, q, q]
  if segment_ids is None:
    current = causal
    mem_visible = jnp.ones((1, 1, qlen, mlen), bool)
  else:
    same = segment_ids[:, :, None] == segment_ids[:, None, :]     # [b, q, q]
    current = causal & same[:, None]
    mem_visible = jnp.broadcast_to((segment_ids != 0)[:, None, :, None],
                                   (segment_ids.shape[0], 1, qlen, mlen))
  if mlen == 0:
    return current
  current = jnp.broadcast_to(current, mem_visible.shape[:1] + current.shape[1:])
  return jnp.concatenate([mem_visible, current], axis=-1)


def softmax_attend(scores: jax.Array, mask: jax.Array, v: jax.Array, dropout: float,
                   deterministic: bool, rngs: nnx.Rngs | None) -> jax.Array:
  """scores: [b, h, q, t] float32 (already scaled); v: [b, t, h, k] -> [b, q, h, k]."""
  scores = jnp.where(mask, scores, _MASKED)
  probs = jax.nn.softmax(scores, axis=-1)
  probs = common.dropout(probs, dropout, deterministic, rngs)
  return jnp.einsum('bhqt,bthk->bqhk', probs.astype(v.dtype), v)


class XlaAttention:
  """The reference: XLA's einsums, mask and softmax (any dtype, dropout, any platform)."""
  name = 'xla'

  def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None,
             *, scale: float, dropout: float = 0.0, deterministic: bool = True,
             rngs: nnx.Rngs | None = None) -> jax.Array:
    """q, k, v: [b, t, h, k]; segment_ids: [b, t] int or None -> [b, q, h, k] in v's dtype.

    Query i sees key j iff j <= i and (with segment_ids) both are in one segment. Scores and
    softmax in float32 whatever the inputs' dtype.
    """
    scores = jnp.einsum('bqhk,bthk->bhqt', q.astype(jnp.float32), k.astype(jnp.float32))
    mask = attention_mask(segment_ids, q.shape[1])
    return softmax_attend(scores * scale, mask, v, dropout, deterministic, rngs)


class CpuAttention(XlaAttention):
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
  o, lse = jax.ffi.ffi_call(cpu.ATTENTION, out, vmap_method='broadcast_all')(
      q, k, v, segment_ids, scale=np.float32(scale))
  return o, (q, k, v, segment_ids, lse)


def _attention_bwd(scale, res, do):
  q, k, v, segment_ids, lse = res
  out = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v))
  dq, dk, dv = jax.ffi.ffi_call(cpu.ATTENTION_GRAD, out, vmap_method='broadcast_all')(
      q, k, v, segment_ids, lse, do.astype(jnp.float32), scale=np.float32(scale))
  return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)

XLA = XlaAttention()
CPU = CpuAttention()


def get_kernels(name: str = 'auto') -> XlaAttention:
  """The attention kernels by name; 'auto' as the module docstring says (call it while
  tracing, under the mesh the model runs in)."""
  return cpu.choose(name, 'attention kernels', CPU, XLA, KERNELS)
