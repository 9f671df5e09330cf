"""Where platform kernels plug in: the one hook between the plain JAX of layers/ and model/ and
a provider of faster kernels for one platform (moescale.cpu: C++ kernels for XLA:CPU).

An op ('pkm', 'moe_ffn', 'attention') has a plain implementation, a strategy object of XLA's
ops that runs everywhere. A provider registers a faster one for a platform:

    kernel_registry.register('pkm', 'cpu', factory, usable)    # in the provider's package

and a layer asks for its kernels by name when it traces:

    kernels = kernel_registry.select('pkm', 'auto', pkm_ops.XLA)
    kernels.product_topk(s1, s2, knn, form)     # same methods as the plain strategy

'xla' is the plain strategy. A platform name ('cpu') is that platform's kernels, or a
RuntimeError saying why they are unavailable. 'auto' follows the platform the program is
*built for*, not the host (`jax.lax.platform_dependent`): a program lowered for TPU or GPU
from a CPU machine (`jax.export`) contains no CPU-only kernel, and one lowered for CPU uses
the provider's kernels where `usable()` says they apply (e.g. not under a multi-device mesh,
where XLA cannot split a custom call and would repeat it whole on every device).

Providers are imported the first time a name needs them (`PROVIDERS`), so layers never import
them and a machine without them computes the same results with XLA's ops.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

import jax
import numpy as np

# Platform -> the package that registers its kernels when imported.
PROVIDERS = {'cpu': 'moescale.cpu'}
NAMES = ('auto', 'xla', *PROVIDERS)

_KERNELS: dict[tuple[str, str], tuple[Callable[[], Any], Callable[[], str | None]]] = {}


def register(op: str, platform: str, factory: Callable[[], Any],
             unusable: Callable[[], str | None] = lambda: None) -> None:
  """Registers `factory()` as `op`'s kernels on `platform`. `unusable()` (called while a
  program traces) returns why they cannot run in the current program (None: they can)."""
  _KERNELS[op, platform] = (factory, unusable)


def _provided(op: str, platform: str):
  if (op, platform) not in _KERNELS and platform in PROVIDERS:
    importlib.import_module(PROVIDERS[platform])
  return _KERNELS.get((op, platform))


def select(op: str, name: str, plain: Any) -> Any:
  """`op`'s kernels by name ('auto', 'xla' or a platform), with `plain` as XLA's."""
  if name not in NAMES:
    raise ValueError(f'unknown {op} kernels {name!r}; valid: {list(NAMES)}')
  if name == 'xla':
    return plain
  if name != 'auto':
    entry = _provided(op, name)
    why = 'none registered' if entry is None else entry[1]()
    if why:
      raise RuntimeError(f"{op} kernels {name!r} are unavailable: {why}; use 'auto' or 'xla'")
    return entry[0]()
  return PlatformDependent(op, plain)


def on_host(op: str, name: str, plain: Any) -> Any:
  """The kernels a program built for this host's default platform would run (for reports:
  which of them a benchmark measured)."""
  kernels = select(op, name, plain)
  return kernels._cpu() if isinstance(kernels, PlatformDependent) else kernels


def _is_data(value) -> bool:
  return any(isinstance(leaf, (jax.Array, np.ndarray)) for leaf in jax.tree.leaves(value))


class PlatformDependent:
  """The 'auto' kernels: each call (a method of the plain strategy, or the strategy itself)
  lowers the CPU provider's version into a program built for CPU, when it is usable there,
  and the plain version into every other program. Array arguments go through
  `jax.lax.platform_dependent`; the others (sizes, callables) stay static."""

  def __init__(self, op: str, plain: Any):
    self.op, self.plain = op, plain
    self.name = 'auto'

  def _cpu(self):
    # Decided while tracing: a CPU host that builds its kernels, under a mesh they can use.
    entry = _provided(self.op, 'cpu') if jax.default_backend() == 'cpu' else None
    return self.plain if entry is None or entry[1]() else entry[0]()

  def _call(self, method: str | None, args, kwargs):
    dynamic = [i for i, a in enumerate(args) if _is_data(a)]

    def branch(impl):
      fn = impl if method is None else getattr(impl, method)

      def run(*values):
        full = list(args)
        for i, v in zip(dynamic, values):
          full[i] = v
        return fn(*full, **kwargs)
      return run

    cpu = self._cpu()
    if cpu is self.plain:  # nothing to choose between: no conditional in the program
      return branch(self.plain)(*(args[i] for i in dynamic))
    return jax.lax.platform_dependent(*(args[i] for i in dynamic), cpu=branch(cpu),
                                      default=branch(self.plain))

  def __call__(self, *args, **kwargs):
    return self._call(None, args, kwargs)

  def __getattr__(self, method: str):
    if method.startswith('_') or not callable(getattr(self.plain, method, None)):
      raise AttributeError(method)
    return lambda *args, **kwargs: self._call(method, args, kwargs)
