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
               The XLA:CPU default, where it runs as one C++ kernel (dispatch_fused_cpu.py,
               kernels/moe_ffn.cc; 'fused:kernels=xla' keeps the XLA loop).
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

import inspect
from typing import Callable

import jax

# The registry imports every backend directly (all plain JAX); they and the expert-parallel
# wrapper build on dispatch_types, never on this module.
from moescale.layers import dispatch_blocked, dispatch_capacity, dispatch_fused, dispatch_ragged
from moescale.layers import expert_parallel
# The plain functions of the math and the contract, re-exported for the families and users.
from moescale.layers.dispatch_ops import RowLayout, combine, permute, sort_assignments  # noqa: F401
from moescale.layers.dispatch_types import (  # noqa: F401
    DispatchBackend, ExpertWeights, ReferenceLoop, check_assignment_shapes)


_BACKENDS: dict[str, Callable[..., DispatchBackend]] = {
    'reference': ReferenceLoop,
    'blocked': dispatch_blocked.Blocked,
    'fused': dispatch_fused.Fused,
    'ragged': dispatch_ragged.Ragged,
    'slots': dispatch_capacity.Slots,
    'onehot': dispatch_capacity.OneHot,
}


def register_backend(name: str, factory: Callable[..., DispatchBackend]) -> None:
  """Adds (or replaces) a backend; `factory(**options)` builds it (see `get_backend`)."""
  _BACKENDS[name] = factory


def available_backends() -> list[str]:
  return sorted(_BACKENDS) + ['auto']


def default_backend_name(platform: str | None = None) -> str:
  """The measured-best backend for a platform (see `python -m moescale.bench`).

  XLA:CPU: 'fused' (ragged_dot is lowered densely there, E times the work), which runs there as
  one C++ kernel (dispatch_fused_cpu). One `make bench` on the 2-core dev VM, 16k tokens,
  fwd+bwd against the FLOP-matched dense layer: top-2 at 8 / 64 / 256 / 512 experts 'fused'
  0.98x / 0.94x / 1.19x / 1.27x, its XLA loop ('fused:kernels=xla') 1.11x / 1.16x / 1.54x /
  1.90x, 'blocked' 1.23x / 1.36x / 1.83x / 2.16x, 'slots' (capacity 1.0) 1.03x / 1.14x /
  1.46x / 2.08x. At capacity 1.0 the router drops first and 'fused' computes the rest (bench
  row 'fused@capacity'): 0.94x / 0.95x / 1.12x / 1.19x, the fastest capacity path at every
  size. σ-MoE (8-128 experts) 'fused' 1.18-1.36x, its XLA loop 1.32-1.63x, 'blocked'
  1.78-2.00x.
  GPU / TPU: 'ragged', native grouped matmul there -- to be confirmed by measurement on a GPU.
  """
  if platform is None:
    platform = jax.default_backend()
  return 'fused' if platform == 'cpu' else 'ragged'


def parse_spec(spec: str) -> tuple[str, dict]:
  """'blocked:block_size=64:save_hidden=0' or 'fused:kernels=xla' -> (name, {options}):
  integer values as ints, others as strings."""
  name, *opts = spec.split(':')
  options = {}
  for opt in opts:
    key, eq, value = opt.partition('=')
    if not (key and eq):
      raise ValueError(f'dispatch backend option {opt!r} in {spec!r} is not key=value')
    options[key] = int(value) if value.lstrip('-').isdigit() else value
  return name, options


def get_backend(backend: str | DispatchBackend = 'auto', **options) -> DispatchBackend:
  """A backend by name ('auto' picks by platform) or an instance passed through.

  `options` go to the backend's constructor (e.g. `get_backend('blocked', block_size=64)`); a
  name may carry them too, as a gin binding can: `TopKMoE.dispatch = 'fused:kernels=xla'`.
  """
  if not isinstance(backend, str):
    return expert_parallel.wrap_for_mesh(backend)
  backend, spec_options = parse_spec(backend)
  options = {**spec_options, **options}
  name = default_backend_name(jax.default_backend()) if backend == 'auto' else backend
  try:
    factory = _BACKENDS[name]
  except KeyError:
    raise ValueError(
        f'unknown dispatch backend {backend!r}; valid: {available_backends()}') from None
  # Under a mesh with an `expert` axis (the trainer sets one), experts run expert-parallel.
  try:
    made = factory(**options)
  except TypeError as e:
    valid = [p for p in inspect.signature(factory).parameters if p != 'self']
    raise ValueError(f'dispatch backend {name!r} does not take options {options} ({e}); '
                     f'its options: {valid}') from None
  return expert_parallel.wrap_for_mesh(made)
