"""The gin edge: registers moescale's plain-Python constructors and parses t5x-style flags.

Nothing below this module knows gin exists. Every configurable here is an ordinary class or
function that works without gin; registering them is the only thing gin adds.

Flags, as in t5x:
    --gin_file=F            repeatable; looked up in --gin_search_paths, the working directory,
                            then the configs shipped in the package (moescale/gin)
    --gin.NAME=VALUE        one binding, VALUE a gin/Python literal: --gin.MODEL_DIR="'runs/x'"
    --gin_bindings='A=1'    repeatable, any gin binding
    --gin_search_paths=a,b  extra directories for --gin_file and gin `include`s

Shipped configs include each other by package path, as t5x's do (`include
'moescale/gin/models/decoder.gin'`): gin's own resource reader finds them wherever moescale is
installed (each config folder is a package for that), so nothing depends on the working
directory. A user's config includes them the same way.
"""

from __future__ import annotations

import os
import pathlib
from typing import Sequence

import gin

_REGISTERED = False
_CONFIGURED: dict = {}
_FAMILIES_REGISTERED: set[str] = set()
_EXTRA: list = []


def shipped_gin_dir() -> pathlib.Path | None:
  """The configs shipped with the package (moescale/gin), or $MOESCALE_GIN_DIR."""
  env = os.environ.get('MOESCALE_GIN_DIR')
  if env:
    return pathlib.Path(env)
  here = pathlib.Path(__file__).parent / 'gin'
  return here if here.is_dir() else None


def _register_families() -> None:
  """Every family of the layers registry is a gin configurable, including ones registered
  after the first parse (a user's own family)."""
  from moescale.layers import registry
  for name, cls in registry.families().items():
    if name not in _FAMILIES_REGISTERED:
      gin.external_configurable(cls, name=name, module='moescale.layers')
      _FAMILIES_REGISTERED.add(name)


def register() -> None:
  """Registers every gin-bindable constructor (idempotent). Imports no TensorFlow: the seqio
  data source is registered by name and imported only when a config calls it."""
  global _REGISTERED
  _register_families()
  if _REGISTERED:
    return
  from moescale import model as model_lib
  from moescale.train import optim, step, trainer
  from moescale import launch

  gin.external_configurable(model_lib.TransformerLM, module='moescale.model')
  # `INIT_SCALE = @depth_scale()`: Csordás et al.'s c = sqrt(2 / num_layers), computed from
  # the NUM_LAYERS macro rather than written out per setting.
  from moescale.layers import common
  gin.external_configurable(common.depth_scale, module='moescale.layers')
  for cls in (optim.OptimizerConfig, step.StepConfig, trainer.MeshConfig, trainer.TrainConfig):
    gin.external_configurable(cls, module='moescale.train')
  gin.external_configurable(launch.seqio_data, module='moescale.data')
  gin.external_configurable(launch.synthetic_data, module='moescale.data')
  from moescale.model import classifier
  gin.external_configurable(classifier.ClassifierLM, module='moescale.model')
  _CONFIGURED['run_training'] = gin.external_configurable(launch.run_training,
                                                          module='moescale')
  _REGISTERED = True


def register_configurable(fn, module: str) -> None:
  """One more gin-bindable constructor, from a package above this edge (moescale.pairs'
  `Pair`, the one thing pair files bind); idempotent."""
  if fn not in _EXTRA:
    gin.external_configurable(fn, module=module)
    _EXTRA.append(fn)


def configured(name: str):
  """The gin-wrapped version of a registered function (bindings applied when called)."""
  register()
  return _CONFIGURED[name]


def split_gin_flags(argv: Sequence[str]) -> tuple[list[str], list[str], list[str], list[str]]:
  """(gin_files, bindings, search_paths, remaining argv) from t5x-style flags."""
  files, bindings, paths, rest = [], [], [], []
  args = list(argv)
  i = 0
  while i < len(args):
    a = args[i]
    def value():
      nonlocal i
      if '=' in a:
        return a.split('=', 1)[1]
      i += 1
      if i >= len(args):
        raise ValueError(f'flag {a} needs a value')
      return args[i]
    if a.startswith('--gin_file'):
      files.append(value())
    elif a.startswith('--gin_bindings'):
      bindings.append(value())
    elif a.startswith('--gin_search_paths'):
      paths.extend(p for p in value().split(',') if p)
    elif a.startswith('--gin.'):
      if '=' not in a:
        raise ValueError(f'{a}: expected --gin.NAME=VALUE')
      name, val = a[len('--gin.'):].split('=', 1)
      bindings.append(f'{name} = {val}')
    else:
      rest.append(a)
    i += 1
  return files, bindings, paths, rest


def parse(gin_files: Sequence[str], bindings: Sequence[str] = (),
          search_paths: Sequence[str] = (), finalize: bool = True) -> None:
  """Clears gin, registers moescale, and parses files + bindings (finalizing checks
  %gin.REQUIRED). Unknown files or names raise errors that say what is valid."""
  register()
  gin.clear_config()
  roots = [*search_paths, os.getcwd()]
  shipped = shipped_gin_dir()
  if shipped is not None:
    roots.append(str(shipped))
  for r in roots:
    gin.add_config_file_search_path(r)
  resolved = []
  for f in gin_files:
    cands = [f] + [os.path.join(r, f) for r in roots]
    hit = next((c for c in cands if os.path.isfile(c)), None)
    if hit is None:
      raise FileNotFoundError(f'gin file {f!r} not found in {roots}' +
                              (f'; shipped files: see {shipped}' if shipped else ''))
    resolved.append(hit)
  gin.parse_config_files_and_bindings(resolved, list(bindings), finalize_config=finalize)


def query(name: str, default=None):
  """A macro's value (e.g. 'MODEL_DIR'), or default when unbound. A `@ref` comes back as the
  configured callable, a `@ref()` evaluated."""
  try:
    value = gin.query_parameter(f'%{name}')
  except ValueError:
    return default
  if isinstance(value, gin.config.ConfigurableReference):
    fn = value.scoped_configurable_fn
    return fn() if value.evaluate else fn
  return value
