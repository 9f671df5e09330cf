"""The contract of the MoE dispatch: expert weights, the backend protocol, the reference loop.

Every backend module (dispatch_fused, dispatch_capacity, dispatch_ragged)
and the expert-parallel wrapper build on these and on nothing of `dispatch`, the registry
that chooses among them: the layers import downwards only. See dispatch.py for the math and
the list of backends.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Protocol

import jax
import jax.numpy as jnp

Array = jax.Array


class ExpertWeights(NamedTuple):
  """Stacked expert parameters, leading expert axis. A pytree, so it passes through jit/grad.

  w_in:  [e, d, f]    w_out: [e, f, d]    b_in: [e, f] or None    b_out: [e, d] or None
  """
  w_in: Array
  w_out: Array
  b_in: Array | None = None
  b_out: Array | None = None

  @property
  def num_experts(self) -> int:
    return self.w_in.shape[0]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ExpertDropout:
  """Dropout on the experts' hidden units, Switch Transformer's "expert dropout" (Fedus et al.
  2021, sec. 2.4 and Table 4: 0.4 inside the experts when fine-tuning, 0.1 elsewhere; in their
  Mesh TensorFlow code, `moe_dropout_rate` on act(x @ w_in) before w_out):

      FFN_e(x) = (act(x @ w_in[e] + b_in[e]) * m) @ w_out[e] + b_out[e],
      m[u] = 0 with probability `rate`, else 1 / (1 - rate), for each hidden unit u

  drawn afresh for every assignment (token, choice). The mask is a function of (key, the
  assignment's id, u) only, never of where a backend puts the assignment's row: every backend,
  the reference loop and the expert-parallel exchanges draw the same mask, so a backend can be
  tested against the reference and a run gives the same model on 1 device and on 8.

  key: a PRNG key. pair: [t, k] int32, the id of each assignment (token * k + j over the whole
  batch; the expert-parallel exchanges carry it with the rows). units: f, the experts' hidden
  width; unit_offset: the first of the units this device computes (nonzero only where the
  tensor axis splits expert_size). rate in (0, 1).
  """
  key: Array
  pair: Array
  unit_offset: Array | int = 0
  rate: float = dataclasses.field(default=0.0, metadata=dict(static=True))
  units: int = dataclasses.field(default=0, metadata=dict(static=True))

  def __post_init__(self):
    if isinstance(self.rate, float) and not 0.0 < self.rate < 1.0:
      raise ValueError(f'expert dropout rate={self.rate!r} must be in (0, 1)')

  def scale(self, pair_rows: Array, width: int, dtype) -> Array:
    """[rows, width]: 0 or 1 / (1 - rate) for rows holding the given assignment ids (any id for
    a padding row: its hidden is multiplied by weight 0 anyway)."""
    flat = self.pair.reshape(-1)
    # Padding rows point past the end (pair t*k): clipped to any real id. No ids at all (t = 0
    # tokens): take refuses an empty axis, and every row is padding.
    ids = jnp.take(flat, pair_rows, mode='clip') if flat.shape[0] else jnp.zeros_like(pair_rows)
    return self.scale_of_ids(ids, width, dtype)

  def scale_of_ids(self, ids: Array, width: int, dtype) -> Array:
    """[rows, width] for rows whose assignment ids are `ids` [rows] (already global)."""
    def one(i):
      u = jax.random.uniform(jax.random.fold_in(self.key, i), (self.units,))
      return jax.lax.dynamic_slice_in_dim(u, self.unit_offset, width)
    keep = jax.vmap(one)(ids.astype(jnp.uint32)) >= self.rate
    return jnp.where(keep, 1.0 / (1.0 - self.rate), 0.0).astype(dtype)


class DispatchBackend(Protocol):
  """`backend(x, expert_index, weights, experts, activation, capacity=None, dropout=None) -> y`.

  x: [t, d]; expert_index: [t, k] int32 in [0, num_experts] (num_experts = dropped);
  weights: [t, k]; returns y: [t, d] in x.dtype. `capacity` (slots per expert) is a hint a
  backend may use to bound its buffers; routing has already dropped what does not fit.
  `dropout`: an ExpertDropout to apply to the experts' hidden units (training), or None.
  """
  name: str

  def __call__(self, x: Array, expert_index: Array, weights: Array, experts: ExpertWeights,
               activation: Callable[[Array], Array], capacity: int | None = None,
               dropout: ExpertDropout | None = None) -> Array:
    ...


def check_assignment_shapes(x: Array, expert_index: Array, weights: Array,
                            experts: ExpertWeights) -> None:
  """Shape checks shared by all backends: clear errors instead of an XLA shape failure."""
  if x.ndim != 2:
    raise ValueError(f'dispatch expects x as [tokens, d_model], got shape {x.shape}')
  if expert_index.shape != weights.shape or expert_index.shape[0] != x.shape[0]:
    raise ValueError(
        f'expert_index {expert_index.shape} and weights {weights.shape} must both be '
        f'[tokens={x.shape[0]}, k]')
  if experts.w_in.shape[1] != x.shape[1]:
    raise ValueError(f'w_in {experts.w_in.shape} does not take d_model={x.shape[1]}')


class ReferenceLoop:
  """Every expert on every token, masked: the definition, for tests. O(E) times the work.

  accumulate: dtype of the running sum (float32; None: x's own dtype, e.g. float64 for finite
  differences).
  """
  name = 'reference'

  def __init__(self, accumulate=jnp.float32):
    self.accumulate = accumulate

  def __call__(self, x, expert_index, weights, experts, activation, capacity=None,
               dropout=None):
    check_assignment_shapes(x, expert_index, weights, experts)
    acc = x.dtype if self.accumulate is None else self.accumulate
    y = jnp.zeros(x.shape, acc)
    f = experts.w_in.shape[2]
    # With dropout each choice j has its own mask, so each (expert, choice) is computed apart.
    masks = [None if dropout is None else dropout.scale_of_ids(dropout.pair[:, j], f, x.dtype)
             for j in range(expert_index.shape[1])]
    for e in range(experts.num_experts):
      h = x @ experts.w_in[e]
      if experts.b_in is not None:
        h = h + experts.b_in[e]
      h = activation(h)
      for j, m in enumerate(masks if dropout is not None else [None]):
        out = (h if m is None else h * m) @ experts.w_out[e]
        if experts.b_out is not None:
          out = out + experts.b_out[e]
        picked = expert_index == e if m is None else (expert_index[:, j] == e)[:, None]
        w = weights if m is None else weights[:, j:j + 1]
        gate = jnp.sum(jnp.where(picked, w, 0.0), axis=-1)  # [t]
        y = y + gate[:, None].astype(acc) * out.astype(acc)
    return y.astype(x.dtype)
