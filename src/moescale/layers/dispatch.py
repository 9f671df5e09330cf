"""The shared MoE dispatch: route -> permute -> grouped matmul -> unpermute -> combine.

Every MoE family (top-k MoE, sigma-MoE) reduces to the same computation once it has chosen,
for each token, `k` experts and `k` combine weights:

    y[t] = sum_j weights[t, j] * FFN_{expert_index[t, j]}(x[t])
    FFN_e(x) = act(x @ w_in[e] + b_in[e]) @ w_out[e] + b_out[e]

Einsum letters: t tokens, j choice (0..k-1), e expert, d d_model, f expert_size (hidden).

An assignment (t, j) whose `expert_index` equals `num_experts` (the sentinel) was dropped by
the router (over capacity, padding token): it is never computed and contributes nothing.
Routers must also give it weight 0, so that even a backend that computed it would add 0.

How the work is done is a *backend*: a small strategy object with one method. Backends are
interchangeable and each is tested against `ReferenceLoop`, the plain per-expert loop that
exists for tests only (it runs every expert on every token: E times the work):

    'blocked'  sort by expert, loop over expert-homogeneous row blocks, hand-written VJP
               (dispatch_blocked.py). Dropless.
    'fused'    'blocked' with permute and combine inside the loop: each block gathers its
               tokens' rows and scatter-adds its weighted output (dispatch_fused.py). Dropless.
               The XLA:CPU default.
    'ragged'   sort, `jax.lax.ragged_dot` (dispatch_ragged.py). Dropless. Native grouped
               matmul on GPU/TPU; lowered densely (E times the work) on XLA:CPU.
    'slots'    gather into [E, capacity, d] slots by index, batched matmul, gather back
               (dispatch_capacity.py). Needs `capacity`; drops what does not fit.
    'onehot'   GShard's one-hot dispatch/combine einsums over [t, e, c]: benchmark baseline.

The shared math (sort, row layouts, permute, combine, all with gather-only VJPs) is in
dispatch_ops.py. `python -m moescale.bench` measures the backends against a FLOP-matched dense
layer; `default_backend_name` encodes what it found.
"""

from __future__ import annotations

import importlib
from typing import Callable, NamedTuple, Protocol

import jax
import jax.numpy as jnp

# The plain functions of the math, re-exported: dispatch_ops depends on nothing here.
from moescale.layers.dispatch_ops import RowLayout, combine, permute, sort_assignments  # noqa: F401

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
  """Every expert on every token, masked: the definition, for tests. O(E) times the work."""
  name = 'reference'

  def __call__(self, x, expert_index, weights, experts, activation, capacity=None):
    check_assignment_shapes(x, expert_index, weights, experts)
    y = jnp.zeros(x.shape, jnp.float32)
    for e in range(experts.num_experts):
      h = x @ experts.w_in[e]
      if experts.b_in is not None:
        h = h + experts.b_in[e]
      out = activation(h) @ experts.w_out[e]
      if experts.b_out is not None:
        out = out + experts.b_out[e]
      gate = jnp.sum(jnp.where(expert_index == e, weights, 0.0), axis=-1)  # [t]
      y = y + gate[:, None].astype(jnp.float32) * out.astype(jnp.float32)
    return y.astype(x.dtype)


def _lazy(module: str, cls: str) -> Callable[..., DispatchBackend]:
  # Backends live in sibling modules that import this one; load them on first use.
  def factory(**kwargs) -> DispatchBackend:
    return getattr(importlib.import_module(f'moescale.layers.{module}'), cls)(**kwargs)
  return factory


_BACKENDS: dict[str, Callable[..., DispatchBackend]] = {
    'reference': ReferenceLoop,
    'blocked': _lazy('dispatch_blocked', 'Blocked'),
    'fused': _lazy('dispatch_fused', 'Fused'),
    'ragged': _lazy('dispatch_ragged', 'Ragged'),
    'slots': _lazy('dispatch_capacity', 'Slots'),
    'onehot': _lazy('dispatch_capacity', 'OneHot'),
}


def register_backend(name: str, factory: Callable[..., DispatchBackend]) -> None:
  """Adds (or replaces) a backend; `factory(**options)` builds it (see `get_backend`)."""
  _BACKENDS[name] = factory


def available_backends() -> list[str]:
  return sorted(_BACKENDS) + ['auto']


def default_backend_name(platform: str | None = None) -> str:
  """The measured-best backend for a platform (see `python -m moescale.bench`).

  XLA:CPU: 'fused' (ragged_dot is lowered densely there, E times the work; 'fused' measured
  0.92x / 1.01x / 1.36x / 1.66x the dense layer for top-2 at 8 / 64 / 256 / 512 experts where
  'blocked' gave 1.03x / 1.17x / 1.45x / 1.76x, and σ-MoE ~1.3-1.6x where 'blocked' gave
  1.7-2.1x). GPU / TPU: 'ragged', native grouped matmul there -- to be confirmed on GPU.
  """
  if platform is None:
    platform = jax.default_backend()
  return 'fused' if platform == 'cpu' else 'ragged'


def get_backend(backend: str | DispatchBackend = 'auto', **options) -> DispatchBackend:
  """A backend by name ('auto' picks by platform) or an instance passed through.

  `options` go to the backend's constructor (e.g. `get_backend('blocked', block_size=64)`).
  """
  if not isinstance(backend, str):
    from moescale.layers import expert_parallel
    return expert_parallel.wrap_for_mesh(backend)
  name = default_backend_name(jax.default_backend()) if backend == 'auto' else backend
  try:
    factory = _BACKENDS[name]
  except KeyError:
    raise ValueError(
        f'unknown dispatch backend {backend!r}; valid: {available_backends()}') from None
  # Under a mesh with an `expert` axis (the trainer sets one), experts run expert-parallel.
  from moescale.layers import expert_parallel
  return expert_parallel.wrap_for_mesh(factory(**options))
