"""The math of the product-key memory (layers/pkm.py): product search and value reads.

Plain functions, each with a plain reference in tests/test_pkm.py. Einsum letters: t tokens,
s selected slots per token, d value width, r value rows, n sub-keys per half.

Why the sparse value read has a hand-written VJP: autodiff of `take` + einsum holds the gathered
rows [t, s, d] (2 GiB at 16k tokens, 4 heads, knn 32, d 256) in the forward pass and builds the
same [t, s, d] tensor again for the scatter-add of the backward pass. Here the forward pass is a
gather-reduce that never materialises [t, s, d] (XLA fuses the gathers into the sum), and the
backward pass walks the tokens in chunks: the weight gradient is a batched dot against the
chunk's rows, the value gradient a scatter-add of the chunk's w * dy rows into one [r, d] buffer.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

SLOT_BLOCK = 32     # gathers fused into one sum: one pass over [t, d] per block of slots
GRAD_CHUNK = 16     # tokens per backward step: a [16, s, d] block of rows stays in cache
FWD_CHUNK = 2048    # tokens per forward step (see _gather_reduce)
TOPK_PARTS = 2      # independent top_k calls per selection (see _top_k_rows)


@functools.lru_cache(maxsize=None)
def candidate_pairs(knn: int, num_keys: int | None = None) -> np.ndarray:
  """[c, 2] int32 positions (i, j) in the two descending half lists that can reach the top-knn.

  Pair (i, j) is dominated by the (i+1)(j+1) - 1 pairs (i' <= i, j' <= j) whose sums are at
  least as large, so if (i+1)(j+1) > knn, knn pairs at least as good exist and (i, j) is not
  needed. That leaves c = sum_i floor(knn / i) ~ knn ln knn candidates instead of knn**2
  (695 instead of 16384 at knn = 128). Positions are clipped to the lists' length
  min(knn, num_keys).
  """
  m = knn if num_keys is None else min(knn, num_keys)
  pairs = [(i, j) for i in range(m) for j in range(m) if (i + 1) * (j + 1) <= knn]
  out = np.asarray(pairs, dtype=np.int32).reshape(-1, 2)
  out.setflags(write=False)
  return out


FORMS = ('split', 'pairs', 'full')


def product_key_topk(s1: jax.Array, s2: jax.Array, knn: int, form: str = 'split',
                     kernels: XlaKernels | None = None) -> tuple[jax.Array, jax.Array]:
  """The top-knn of s1[..., i] + s2[..., j] over all num_keys**2 pairs, via the half spaces.

  Args:
    s1, s2: [..., num_keys] sub-key scores of the two query halves.
    knn: how many slots to return, 1 <= knn <= num_keys**2.
    form: which candidate pairs are scored; all three return the same top-knn.
      'full': all knn**2 sums of the two top-knn lists (Lample et al.).
      'pairs': only the candidate_pairs(knn) of the two top-knn lists (~knn ln knn).
      'split' (default; 'pairs' when knn > num_keys): sorts only the top h = knn // 2 of each
        half. A position a >= h pairs only with the other list's first (candidate_pairs:
        (h+1)*2 > knn), so those candidates are s1[i] + max(s2) for *every* i, and
        max(s1) + s2[j] for every j: a superset of real pairs, which cannot change the
        top-knn. XLA:CPU's top_k is a partial sort per row whose cost is mostly sorting its k
        outputs, so two top-(knn/2) and one wider final top-knn beat three top-knn.
    kernels: whose ops run the search (default `XLA`; a platform may register faster ones,
      see moescale.kernel_registry). The C++ kernels for XLA:CPU run it as one kernel,
      whatever the form: same scores and slots.
  Returns:
    scores [..., knn] descending and slot indices [..., knn] int32 (i * num_keys + j).
  """
  kernels = kernels or XLA
  n = s1.shape[-1]
  if s2.shape[-1] != n:
    raise ValueError(f'half scores differ in num_keys: {s1.shape} vs {s2.shape}')
  if not 0 < knn <= n * n:
    raise ValueError(f'knn={knn!r} must be in [1, num_keys**2={n * n}]')
  if form not in FORMS:
    raise ValueError(f'unknown form {form!r}; valid: {list(FORMS)}')
  return kernels.product_topk(s1, s2, knn, form)


def _pair_topk(s1, s2, knn, form, kernels):
  """product_key_topk's 'pairs' and 'full' forms."""
  n = s1.shape[-1]
  m = min(knn, n)
  # lax.top_k, approx_max_k (exact on CPU) and a bitonic network cost about the same on
  # XLA:CPU; a full sort ~4x more.
  v1, i1, v2, i2 = kernels.top_k_each((s1, s2), m)
  if form == 'full':
    lead = s1.shape[:-1]
    cand = (v1[..., :, None] + v2[..., None, :]).reshape(*lead, m * m)
    cand_idx = (i1[..., :, None] * n + i2[..., None, :]).reshape(*lead, m * m)
  else:
    pairs = candidate_pairs(knn, n)
    a, b = pairs[:, 0], pairs[:, 1]
    cand = v1[..., a] + v2[..., b]
    cand_idx = i1[..., a] * n + i2[..., b]
  scores, pos = kernels.top_k(cand, knn)
  return scores, jnp.take_along_axis(cand_idx, pos, axis=-1).astype(jnp.int32)


def _top_k_call(xs, k):
  """lax.top_k of each x, kept as XLA:CPU's partial-sort TopK call.

  XLA lowers top_k to sort + slice and turns that back into its TopK call only while the sort
  has no other users; slicing the outputs again ([..., :1]) lets the simplifier fold the slices
  into the sort, which then stays a full sort of every row (several times slower). The barrier
  keeps the outputs opaque.
  """
  return jax.lax.optimization_barrier(tuple(v for x in xs for v in jax.lax.top_k(x, k)))


def _top_k_rows(x, k):
  """lax.top_k as TOPK_PARTS calls on slices of the leading axis.

  Meant to let XLA:CPU run the slices' TopK calls (each a serial loop over rows) on different
  threads, but it mostly does not: 1, 2 and 4 parts time within noise of each other in the
  whole layer; kept at 2."""
  parts = TOPK_PARTS if x.ndim > 1 and x.shape[0] >= TOPK_PARTS else 1
  if parts == 1:
    return jax.lax.top_k(x, k)
  outs = [jax.lax.top_k(c, k) for c in jnp.array_split(x, parts, axis=0)]
  return tuple(jnp.concatenate(o, axis=0) for o in zip(*outs))


def _split_topk(s1, s2, knn, kernels):
  """product_key_topk's 'split' form: c = inner + 2 * num_keys candidates."""
  n = s1.shape[-1]
  h = max(1, knn // 2)
  v1, i1, v2, i2 = kernels.top_k_each((s1, s2), h)
  # Inner pairs 1 <= a, b < h; row a = 0 and column b = 0 come whole from s1 and s2 below.
  inner = candidate_pairs(knn, h)
  inner = inner[(inner[:, 0] > 0) & (inner[:, 1] > 0)]
  a, b = inner[:, 0], inner[:, 1]
  j = jnp.arange(n, dtype=jnp.int32)
  col = s1 + v2[..., :1]                                   # (i, argmax s2) for every i
  # (argmax s1, j) for every j but argmax s2, which the column already has.
  row = jnp.where(j == i2[..., :1], -jnp.inf, v1[..., :1] + s2)
  cand = jnp.concatenate([v1[..., a] + v2[..., b], col, row], axis=-1)
  scores, pos = kernels.top_k(cand, knn)
  # Slots only for the knn winners (not a [..., c] table of them): pos -> (i, j).
  c = len(a)
  i = jnp.where(pos < c + n, pos - c, i1[..., :1])
  j = jnp.where(pos < c + n, i2[..., :1], pos - c - n)
  if c:
    inner_pos = jnp.minimum(pos, c - 1)
    take = lambda v, p: jnp.take_along_axis(v, p, axis=-1)
    i = jnp.where(pos < c, take(i1, jnp.asarray(a)[inner_pos]), i)
    j = jnp.where(pos < c, take(i2, jnp.asarray(b)[inner_pos]), j)
  return scores, (i * n + j).astype(jnp.int32)


def gather_values(values: jax.Array, indices: jax.Array, weights: jax.Array,
                  dtype=None, chunk_size: int | None = None,
                  kernels: XlaKernels | None = None) -> jax.Array:
  """y[t] = sum_s weights[t, s] * values[indices[t, s]]: a gather-reduce (EmbeddingBag 'sum').

  Args:
    values: [r, d] value table; indices: [t, s] int rows (clipped to [0, r)); weights: [t, s].
    dtype: compute dtype (rows are cast after the gather, never the whole table).
    chunk_size: tokens per step of the backward pass (default GRAD_CHUNK); it bounds the rows
      held at once to [chunk_size, s, d]. Neither pass materialises [t, s, d].
    kernels: whose gathers run the read (default `XLA`; see moescale.kernel_registry).
  Returns:
    [t, d] in dtype. Gradients: wrt weights a gathered dot, wrt values a scatter-add into a
    dense [r, d] buffer (rows no token read get zeros), none wrt indices.
  """
  dtype = jnp.dtype(dtype or values.dtype)
  indices = jnp.clip(indices, 0, values.shape[0] - 1).astype(jnp.int32)
  return (kernels or XLA).gather_reduce(values, indices, weights, dtype,
                                        chunk_size or GRAD_CHUNK)


class XlaKernels:
  """The search's top-k and the value read as XLA's own ops: every platform, every dtype.

  The strategy `product_key_topk` and `gather_values` call; moescale.cpu.pkm has the C++ ones
  (kernel_registry chooses).
  """
  name = 'xla'

  def top_k_each(self, xs, k):
    """(v0, i0, v1, i1, ...): lax.top_k of each x in xs (the two halves of the search)."""
    return _top_k_call(xs, k)

  def top_k(self, x, k):
    return _top_k_rows(x, k)

  def product_topk(self, s1, s2, knn, form):
    """product_key_topk after its checks: (scores, slots), differentiable wrt s1 and s2."""
    # The search runs on constants; the scores are then re-read at the chosen slots, so their
    # gradient is one scatter-add of [..., knn] into each of s1 and s2, not the transpose of
    # every top_k, gather and concatenation of the search.
    n = s1.shape[-1]
    sg = jax.lax.stop_gradient
    slots = self.product_slots(sg(s1), sg(s2), knn, form)
    take = lambda v, i: jnp.take_along_axis(v, i, axis=-1)
    return take(s1, slots // n) + take(s2, slots % n), slots

  def product_slots(self, s1, s2, knn, form):
    """[..., knn] int32 slots i * n + j of product_key_topk (checked arguments, no gradient)."""
    if form == 'split' and knn <= s1.shape[-1]:
      return _split_topk(s1, s2, knn, self)[1]
    return _pair_topk(s1, s2, knn, form, self)[1]

  def gather_reduce(self, values, indices, weights, dtype, chunk):
    """gather_values after its checks: indices int32 in range, dtype a jnp.dtype."""
    return _gather_reduce(values, indices, weights, dtype, chunk)


XLA = XlaKernels()


def _acc_dtype(dtype):
  return jnp.promote_types(dtype, jnp.float32)


def _rows(values, idx, dtype):
  return values.at[idx].get(mode='promise_in_bounds').astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _gather_reduce(values, indices, weights, dtype, chunk):
  t, d = indices.shape[0], values.shape[1]
  acc = _acc_dtype(dtype)

  def read(idx, w):
    y = jnp.zeros((idx.shape[0], d), acc)
    # Python sums of gathers: XLA fuses each block into one loop over [t, d] that reads the
    # rows straight from the table (an einsum over take() would write [t, s, d] first).
    for s0 in range(0, idx.shape[1], SLOT_BLOCK):
      y = y + sum((_rows(values, idx[:, s], dtype) * w[:, s, None].astype(dtype)).astype(acc)
                  for s in range(s0, min(s0 + SLOT_BLOCK, idx.shape[1])))
    return y

  if t <= FWD_CHUNK:
    return read(indices, weights).astype(dtype)
  # A loop over token chunks, so that indices and weights reach the gathers as materialised
  # arrays: fused into them, XLA redoes the product search's slot arithmetic for every column
  # of every row read.
  idx_c, w_c = _chunked(FWD_CHUNK, indices, weights)
  y = jax.lax.map(lambda xs: read(*xs), (idx_c, w_c))
  return y.reshape(-1, d)[:t].astype(dtype)


def _gather_reduce_fwd(values, indices, weights, dtype, chunk):
  return _gather_reduce(values, indices, weights, dtype, chunk), (values, indices, weights)


def _chunked(chunk, *arrays):
  """Pads the token axis to a multiple of chunk and splits it: [t, ...] -> [t/c, c, ...]."""
  t = arrays[0].shape[0]
  pad = -t % chunk
  return [jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)).reshape(-1, chunk, *a.shape[1:])
          for a in arrays]


def _gather_reduce_bwd(dtype, chunk, res, dy):
  values, indices, weights = res
  t, s = indices.shape
  acc = _acc_dtype(dtype)
  dy = dy.astype(dtype)
  chunk = max(1, min(chunk, t))
  # Padding tokens read row 0 with weight 0 and dy 0: they add nothing to either gradient.
  idx_c, w_c, dy_c = _chunked(chunk, indices, weights.astype(dtype), dy)

  def weight_grad(_, xs):  # dw[t, s] = <dy[t], values[idx[t, s]]>
    idx, g = xs
    return None, jnp.einsum('csd,cd->cs', _rows(values, idx, dtype), g,
                            preferred_element_type=acc)

  def value_grad(dv, xs):  # dv[idx[t, s]] += w[t, s] * dy[t]
    idx, w, g = xs
    upd = (w[..., None].astype(acc) * g[:, None].astype(acc)).reshape(-1, g.shape[-1])
    return dv.at[idx.reshape(-1)].add(upd, mode='promise_in_bounds'), None

  # Two scans, not one: measured on XLA:CPU, a scan doing both is slower than the two apart.
  _, dw = jax.lax.scan(weight_grad, None, (idx_c, dy_c))
  dv, _ = jax.lax.scan(value_grad, jnp.zeros(values.shape, acc), (idx_c, w_c, dy_c))
  dw = dw.reshape(-1, s)[:t].astype(weights.dtype)
  return dv.astype(values.dtype), None, dw


_gather_reduce.defvjp(_gather_reduce_fwd, _gather_reduce_bwd)


def masked_batch_norm(q: jax.Array, mask: jax.Array, eps: float) -> tuple[jax.Array, ...]:
  """Batch statistics of q [t, ...] over the tokens where mask [t] is True.

  Returns (normalised q, mean, biased var); padding tokens do not move the statistics.
  """
  m = mask.reshape(-1, *([1] * (q.ndim - 1))).astype(q.dtype)
  count = jnp.maximum(m.sum(), 1.0)
  mean = (q * m).sum(0) / count
  var = (jnp.square(q - mean) * m).sum(0) / count
  return (q - mean) * jax.lax.rsqrt(var + eps), mean, var


def score_weights(scores: jax.Array, score_fn: str, joint: bool) -> jax.Array:
  """Selected scores [t, heads, knn] -> weights: relu, or softmax per head / over heads*knn."""
  if score_fn == 'relu':
    return jax.nn.relu(scores)
  if joint:
    t, h, k = scores.shape  # sizes, not -1: reshape cannot infer one when t = 0
    return jax.nn.softmax(scores.reshape(t, h * k), axis=-1).reshape(scores.shape)
  return jax.nn.softmax(scores, axis=-1)
