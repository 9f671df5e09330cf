"""Packages whose names load on first use: `import moescale.evaluate` (or `.analysis`,
`.data`) costs nothing until a name is read, so `moescale --help` and the commands that read
no data never import TensorFlow, JAX's runtime or matplotlib through them.

    __getattr__, __dir__, __all__ = lazy.names(__name__, {'load_run': 'run', ...})
"""

from __future__ import annotations

import importlib
from typing import Callable, Mapping


def names(package: str, where: Mapping[str, str]) -> tuple[Callable, Callable, list[str]]:
  """(__getattr__, __dir__, __all__) for `package`, whose name N lives in submodule where[N]."""
  public = sorted(where)

  def getattr_(name):
    if name in where:
      return getattr(importlib.import_module(f'{package}.{where[name]}'), name)
    raise AttributeError(f'module {package!r} has no attribute {name!r}')

  def dir_():
    return sorted(set(public) | set(vars(importlib.import_module(package))))

  return getattr_, dir_, public
