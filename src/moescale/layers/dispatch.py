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

    'fused'    sort by expert, loop over expert-homogeneous row blocks that gather and combine
               their own rows, hand-written VJP (dispatch_fused.py). Dropless. The XLA:CPU
               choice; its loop is a kernel strategy a platform may replace (moescale.cpu runs
               it as one C++ kernel; 'fused:kernels=xla' keeps the XLA loop).
    'ragged'   sort, `jax.lax.ragged_dot` (dispatch_ragged.py). Dropless. Native grouped
               matmul on GPU/TPU; lowered densely (E times the work) on XLA:CPU.
    'slots'    gather into [E, capacity, d] slots by index, batched matmul, gather back
               (dispatch_capacity.py). Needs `capacity`; drops what does not fit.
    'onehot'   GShard's one-hot dispatch/combine einsums over [t, e, c]: benchmark baseline.
    'auto'     'fused' in a program built for CPU, 'ragged' in any other
               (`jax.lax.platform_dependent`: the target platform decides, not the host).
               Both branches are traced, so 'auto' (like 'ragged') needs a mesh of Auto axes,
               as `moescale.sharding.make_mesh` makes: JAX 0.10's ragged_dot has no sharding
               rule for Explicit axes (`jax.make_mesh`'s default).

Expert dropout (`ExpertDropout`, fine-tuning) masks the hidden units act(x @ w_in[e] + b_in[e])
of each assignment with a mask drawn from (key, the assignment's id, unit): every backend, and
the expert-parallel exchanges, which carry the ids with the rows, compute the same model.
'fused' runs its XLA loop then (a platform kernel computes the unmasked FFN only).

A family resolves its backend once, at construction: `Dispatch(spec, exchange=...,
exchange_capacity_factor=...)`. Nothing ambient decides how it runs, except the mesh JAX
itself is tracing under (`jax.set_mesh`): with an `expert` axis > 1 the backend runs expert
parallel, tokens exchanged as the family chose (expert_parallel.py).

The shared math (sort, row layouts, permute, combine, all with gather-only VJPs) is in
dispatch_ops.py; `moescale bench` measures the backends against a FLOP-matched dense layer.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Callable

import jax
import jax.numpy as jnp

from moescale.layers import dispatch_capacity, dispatch_fused, dispatch_ragged
from moescale import sharding as shd
from moescale.layers import expert_parallel
# The plain functions of the math and the contract, re-exported for the families and users.
from moescale.layers.dispatch_ops import RowLayout, combine, permute, sort_assignments  # noqa: F401
from moescale.layers.dispatch_types import (  # noqa: F401
    DispatchBackend, ExpertDropout, ExpertWeights, ReferenceLoop, check_assignment_shapes)


class Auto:
  """'auto': the backend that suits the platform the program is built for."""
  name = 'auto'

  def __init__(self, cpu: DispatchBackend | None = None,
               default: DispatchBackend | None = None):
    self.cpu = cpu or dispatch_fused.Fused()
    self.default = default or dispatch_ragged.Ragged()

  def __call__(self, x, expert_index, weights, experts, activation, capacity=None,
               dropout=None):
    branch = lambda backend: (lambda x, i, w, e, m: backend(x, i, w, e, activation, capacity, m))
    return jax.lax.platform_dependent(x, expert_index, weights, experts, dropout,
                                      cpu=branch(self.cpu), default=branch(self.default))


_BACKENDS: dict[str, Callable[..., DispatchBackend]] = {
    'auto': Auto,
    'reference': ReferenceLoop,
    'fused': dispatch_fused.Fused,
    'ragged': dispatch_ragged.Ragged,
    'slots': dispatch_capacity.Slots,
    'onehot': dispatch_capacity.OneHot,
}


def register_backend(name: str, factory: Callable[..., DispatchBackend]) -> None:
  """Adds (or replaces) a backend; `factory(**options)` builds it (see `get_backend`)."""
  _BACKENDS[name] = factory


def available_backends() -> list[str]:
  return sorted(_BACKENDS)


def parse_spec(spec: str) -> tuple[str, dict]:
  """'fused:kernels=xla' or 'fused:block_size=64:granule=16' -> (name, {options}): integer
  values as ints, others as strings."""
  name, *opts = spec.split(':')
  options = {}
  for opt in opts:
    key, eq, value = opt.partition('=')
    if not (key and eq):
      raise ValueError(f'dispatch backend option {opt!r} in {spec!r} is not key=value')
    options[key] = int(value) if value.lstrip('-').isdigit() else value
  return name, options


def get_backend(backend: str | DispatchBackend = 'auto', **options) -> DispatchBackend:
  """A backend by name (with options after colons, as a gin binding can give them:
  `TopKMoE.dispatch = 'fused:kernels=xla'`) or an instance passed through. `options` go to
  the backend's constructor too (`get_backend('fused', block_size=64)`)."""
  if not isinstance(backend, str):
    return backend
  name, spec_options = parse_spec(backend)
  options = {**spec_options, **options}
  try:
    factory = _BACKENDS[name]
  except KeyError:
    raise ValueError(
        f'unknown dispatch backend {name!r}; valid: {available_backends()}') from None
  try:
    return factory(**options)
  except TypeError as e:
    valid = [p for p in inspect.signature(factory).parameters if p != 'self']
    raise ValueError(f'dispatch backend {name!r} does not take options {options} ({e}); '
                     f'its options: {valid}') from None


@dataclasses.dataclass(frozen=True)
class Dispatch:
  """How a family runs its experts, fixed at construction: a backend (a spec or an instance)
  and, under an expert-parallel mesh, the token exchange ('ring' or 'all_to_all', see
  expert_parallel.py) with its optional capacity factor.

  `dispatch(x, expert_index, weights, experts, activation, capacity, dropout)` -> y [t, d];
  `dispatch.apply(...)` -> (y, fraction of routed assignments the exchange dropped). `dropout`:
  an ExpertDropout on the experts' hidden units, or None.
  """
  backend: str | DispatchBackend = 'auto'
  exchange: str = expert_parallel.DEFAULT_EXCHANGE
  exchange_capacity_factor: float | None = None

  def __post_init__(self):
    get_backend(self.backend)  # an unknown name or option fails here, at construction
    expert_parallel.check_exchange(self.exchange, self.exchange_capacity_factor)

  def __call__(self, x, expert_index, weights, experts, activation, capacity=None,
               dropout=None):
    return self.apply(x, expert_index, weights, experts, activation, capacity, dropout)[0]

  def apply(self, x, expert_index, weights, experts, activation, capacity=None, dropout=None):
    backend = get_backend(self.backend)
    # Under a mesh that splits the rows or the experts, each device runs the backend on its
    # own rows inside shard_map (with one expert shard: its rows through every expert).
    # Left to GSPMD, a backend's sort or gather along the token axis cannot be split, and
    # every device gathers every token: measured on Csordás et al.'s WT103-small σ-MoE over 8
    # data-parallel devices, 0.82 GiB sent a device a step (38 all-reduces inside the layer
    # loop, an all-gather of every expert index) where its dense twin sends 0.11 GiB.
    if expert_parallel.expert_shards() > 1 or shd.batch_shards() > 1:
      ep = expert_parallel.ExpertParallel(backend, self.exchange, self.exchange_capacity_factor)
      return ep.apply(x, expert_index, weights, experts, activation, capacity, dropout)
    # Without dropout, the six-argument call: a user's backend need not know about dropout.
    extra = {} if dropout is None else {'dropout': dropout}
    y = backend(x, expert_index, weights, experts, activation, capacity, **extra)
    return y, jnp.zeros(())
