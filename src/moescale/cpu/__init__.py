"""moescale's CPU speed stack, behind one boundary: C++ kernels for XLA:CPU (jax.ffi, compiled
on first use with the system compiler) and the host-heap setting.

    build.py       compile, cache, load and register the library (the *.cc / *.h beside it)
    pkm.py         the product-key memory's search and value read      op 'pkm'
    moe_ffn.py     the 'fused' MoE dispatch as one kernel              op 'moe_ffn'
    attention.py   softmax(q k^T) v                                    op 'attention'
    heap.py        keep XLA:CPU's per-step temporaries in the heap (the command line calls it)

Nothing in layers/, model/ or train/ imports this package. `moescale.kernel_registry` imports
it the first time a layer asks for 'auto' or 'cpu' kernels, and the registrations below plug
each binding in as the 'cpu' kernels of its op; every binding is a drop-in subclass of the
plain XLA strategy it replaces. docs/performance.md has what they measure.
"""

from __future__ import annotations

import jax

from moescale import kernel_registry
from moescale.cpu import build


def unusable() -> str | None:
  """Why the C++ kernels cannot run in the program being traced (None: they can)."""
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.size > 1:
    # XLA cannot split a custom call: it would gather every operand onto every device and
    # repeat the whole call there.
    return f'the program runs on a mesh of {mesh.size} devices'
  if not build.load():
    return build.failure()
  return None


def _pkm():
  from moescale.cpu import pkm
  return pkm.CPU


def _moe_ffn():
  from moescale.cpu import moe_ffn
  return moe_ffn.CPU


def _attention():
  from moescale.cpu import attention
  return attention.CPU


kernel_registry.register('pkm', 'cpu', _pkm, unusable)
kernel_registry.register('moe_ffn', 'cpu', _moe_ffn, unusable)
kernel_registry.register('attention', 'cpu', _attention, unusable)
