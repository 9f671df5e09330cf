"""The contract of the MoE dispatch: expert weights, the backend protocol, the reference loop.

Every backend module (dispatch_fused, dispatch_capacity, dispatch_ragged)
and the expert-parallel wrapper build on these and on nothing of `dispatch`, the registry
that chooses among them: the layers import downwards only. See dispatch.py for the math and
the list of backends.
"""

from __future__ import annotations

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


class DispatchBackend(Protocol):
  """`backend(x, expert_index, weights, experts, activation, capacity=None) -> y`.

  x: [t, d]; expert_index: [t, k] int32 in [0, num_experts] (num_experts = dropped);
  weights: [t, k]; returns y: [t, d] in x.dtype. `capacity` (slots per expert) is a hint a
  backend may use to bound its buffers; routing has already dropped what does not fit.
  """
  name: str

  def __call__(self, x: Array, expert_index: Array, weights: Array, experts: ExpertWeights,
               activation: Callable[[Array], Array], capacity: int | None = None) -> Array:
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

  def __call__(self, x, expert_index, weights, experts, activation, capacity=None):
    check_assignment_shapes(x, expert_index, weights, experts)
    acc = x.dtype if self.accumulate is None else self.accumulate
    y = jnp.zeros(x.shape, acc)
    for e in range(experts.num_experts):
      h = x @ experts.w_in[e]
      if experts.b_in is not None:
        h = h + experts.b_in[e]
      out = activation(h) @ experts.w_out[e]
      if experts.b_out is not None:
        out = out + experts.b_out[e]
      gate = jnp.sum(jnp.where(expert_index == e, weights, 0.0), axis=-1)  # [t]
      y = y + gate[:, None].astype(acc) * out.astype(acc)
    return y.astype(x.dtype)
