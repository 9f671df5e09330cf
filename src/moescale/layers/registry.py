"""The FFN families moescale knows: one registry that gin, the study API, accounting and the
command line all read.

    @register_family                       # in the family's own module (or a notebook cell)
    class GatedFFN(nnx.Module): ...

A family is a class built as `Family(d_model, <its hyperparameters>, dtype=..., param_dtype=...,
rngs=...)` and called as `y, aux = layer(x, deterministic=..., segment_ids=...)`, with a
`cost()` for accounting (`layers.common` has the contract). Registered, it is a gin configurable
(`TransformerLM.sparse_ffn = @GatedFFN`) and a `study.Component('GatedFFN', ...)` name.

The built-in families are the modules of `BUILTIN`, imported the first time the registry is
read, so `import moescale.layers` stays light. A new built-in family is one file plus one line
here.
"""

from __future__ import annotations

import importlib
from typing import Callable, TypeVar

BUILTIN = (
    'moescale.layers.dense',        # DenseFFN (and Top-K activation)
    'moescale.layers.topk_moe',     # TopKMoE (GShard / Switch / fairseq top-k)
    'moescale.layers.sigma_moe',    # SigmaMoE (Csordás et al. 2023)
    'moescale.layers.pkm',          # ProductKeyMemory (Lample et al. 2019)
)

_FAMILIES: dict[str, type] = {}
_LOADED: list[bool] = []
T = TypeVar('T', bound=type)


def register_family(cls: T | None = None, *, name: str | None = None) -> T | Callable[[T], T]:
  """Registers an FFN family class under `name` (default: the class name); usable as a plain
  call or a decorator, with or without arguments. Registering a name again replaces it (a
  notebook cell run twice defines a new class)."""
  def add(family: T) -> T:
    if not isinstance(family, type):
      raise TypeError(f'register_family takes a class, got {family!r}')
    _FAMILIES[name or family.__name__] = family
    return family
  return add if cls is None else add(cls)


def _load_builtins() -> None:
  if not _LOADED:
    _LOADED.append(True)
    for module in BUILTIN:
      importlib.import_module(module)


def families() -> dict[str, type]:
  """{name: class} of every registered family, built-ins first."""
  _load_builtins()
  return dict(_FAMILIES)


def get_family(name: str) -> type:
  """The family registered under `name`; a ValueError listing the registered ones otherwise."""
  registered = families()
  if name not in registered:
    raise ValueError(f'unknown FFN family {name!r}; registered: {sorted(registered)} '
                     '(add one with moescale.layers.register_family)')
  return registered[name]
