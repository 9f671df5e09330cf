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

Bad input fails `parse` with one paragraph naming the bad value and the close valid names
(moescale.gin_checks): unknown configurables and parameters, unparseable values, missing files,
and, with check_bindings (the command line's --gin flags), a macro a binding sets that no
config uses (a mistyped `--gin.TRAIN_STEPZ=5` would otherwise train with the default; the rule
is in gin_checks' docstring).
"""

from __future__ import annotations

import logging
import os
import pathlib
import re
import tokenize
from typing import Sequence

import gin

from moescale import gin_checks

_REGISTERED = False
_CONFIGURED: dict = {}
_FAMILIES_REGISTERED: set[str] = set()
_EXTRA: list = []
# Every configurable moescale registered, by name: the valid names an error suggests from.
_KNOWN: dict = {}
# Macros moescale's Python reads by name (`query`), not through a `%NAME` of a config: binding
# one is never an unused macro (`moescale count` reads MODEL and the context lengths).
READ_BY_CODE = ('MODEL', 'TASK_FEATURE_LENGTHS', 'MAX_LENGTH', 'SEGMENT_LENGTH', 'MEM_LEN')


class _NoSearchMisses(logging.Filter):
  """gin's resource reader logs an ERROR on the root logger for each search path a gin file
  is not under ('ERROR root: Path not found: runs/tiny.gin') before finding it under the next:
  noise, and misleading. A file found nowhere is an exception (`parse`), not this line."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.module == 'resource_reader' and str(record.msg).startswith('Path not'))


def _external(fn, module: str, name: str | None = None):
  _KNOWN[name or fn.__name__] = fn
  return gin.external_configurable(fn, name=name, module=module)


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
      _external(cls, 'moescale.layers', name=name)
      _FAMILIES_REGISTERED.add(name)


def register() -> None:
  """Registers every gin-bindable constructor (idempotent). Imports no TensorFlow: the seqio
  data source is registered by name and imported only when a config calls it."""
  global _REGISTERED
  _register_families()
  if _REGISTERED:
    return
  logging.getLogger().addFilter(_NoSearchMisses())
  from moescale import model as model_lib
  from moescale.train import optim, step, trainer
  from moescale import launch

  _external(model_lib.TransformerLM, 'moescale.model')
  # `INIT_SCALE = @depth_scale()`: Csordás et al.'s c = sqrt(2 / num_layers), computed from
  # the NUM_LAYERS macro rather than written out per setting.
  from moescale.layers import common
  _external(common.depth_scale, 'moescale.layers')
  for cls in (optim.OptimizerConfig, step.StepConfig, trainer.MeshConfig, trainer.TrainConfig):
    _external(cls, 'moescale.train')
  _external(launch.seqio_data, 'moescale.data')
  _external(launch.synthetic_data, 'moescale.data')
  from moescale.model import classifier
  _external(classifier.ClassifierLM, 'moescale.model')
  _CONFIGURED['run_training'] = _external(launch.run_training, 'moescale')
  _REGISTERED = True


def register_configurable(fn, module: str) -> None:
  """One more gin-bindable constructor, from a package above this edge (moescale.pairs'
  `Pair`, the one thing pair files bind); idempotent."""
  if fn not in _EXTRA:
    _external(fn, module)
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


def _missing(gin_file: str, searched: Sequence[str], shipped: pathlib.Path | None,
             where: str = '') -> FileNotFoundError:
  """The error for a gin file found nowhere, with the shipped files of a close name."""
  hint = ''
  if shipped is not None:
    rels = sorted(p.relative_to(shipped).as_posix() for p in shipped.rglob('*.gin'))
    same = [r for r in rels if os.path.basename(r) == os.path.basename(gin_file)]
    # Compared without '.gin', which every name shares: 'nope.gin' is close to no file.
    stems = {r.removesuffix('.gin'): r for r in rels}
    hits = same or [stems[h] for h in gin_checks.matches(gin_file.removesuffix('.gin'), stems)]
    hint = gin_checks.did_you_mean(hits) or (
        f" Shipped runs: {', '.join(r for r in rels if r.startswith('runs/'))}.")
  return FileNotFoundError(f'gin file {gin_file!r} not found as given nor in {list(searched)}.'
                           f'{hint}{where}')


_UNABLE_TO_OPEN = re.compile(
    r'Unable to open file: (.*?)\. Searched config paths: \[.*?\]\.(\n.*)?', re.S)


def _parse_all(files: Sequence[str], bindings: Sequence[str], roots, shipped) -> None:
  """gin's parse of files then bindings, its syntax errors and missing includes said clearly."""
  try:
    for path in files:
      try:
        gin.parse_config_file(path)
      except (SyntaxError, tokenize.TokenError) as e:
        raise gin_checks.file_syntax_error(e, path) from None
    for binding in bindings:  # one at a time: gin's error names that binding, not 'line 3'
      gin.parse_config(binding)
  except OSError as e:  # an `include` gin found under no search path
    m = _UNABLE_TO_OPEN.match(str(e))
    if m is None:
      raise
    raise _missing(m.group(1), roots, shipped, m.group(2) or '') from e


def parse(gin_files: Sequence[str], bindings: Sequence[str] = (),
          search_paths: Sequence[str] = (), finalize: bool = True,
          check_bindings: bool = False) -> None:
  """Clears gin, registers moescale, and parses files + bindings (finalizing checks
  %gin.REQUIRED). Bad input raises FileNotFoundError or gin_checks.ConfigError (a ValueError)
  saying what is valid; a binding is parsed on its own first, so a syntax error names it.

  check_bindings: also refuse a macro the bindings set that nothing uses, and a %NAME they use
  that nothing sets (gin_checks' rule), as the command line does for a user's --gin flags.
  Off by default: a program may pass one list of bindings to many file sets (MODEL_DIR to a
  model file that has no run), where an unused one is no typo."""
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
    hit = next((c for c in [f] + [os.path.join(r, f) for r in roots] if os.path.isfile(c)), None)
    if hit is None:
      raise _missing(f, roots, shipped)
    resolved.append(hit)
  statements = gin_checks.binding_statements(bindings)
  try:
    _parse_all(resolved, bindings, roots, shipped)
    if check_bindings:
      gin_checks.check_macros(statements, READ_BY_CODE)
    if finalize:
      gin.finalize()
  except gin_checks.ConfigError:
    raise
  except ValueError as e:
    raise gin_checks.ConfigError(gin_checks.explain(str(e), _KNOWN)) from e


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


def data_shape(where: str = 'the config') -> tuple[int, str | None, bool]:
  """(sequence length of a training row, the seqio task or None, whether rows are contiguous
  Transformer-XL streams) of the parsed run's data source (`run_training.data`), read from
  its bindings without building it (no seqio import). where: names the config in errors."""
  import inspect
  ref = gin.query_parameter('run_training.data')
  name = ref.configurable.name.rsplit('.', 1)[-1]
  bindings = gin.get_bindings(name)
  if name == 'seqio_data':
    return (int(bindings['task_feature_lengths']['targets']),
            bindings.get('mixture_or_task_name'), bool(bindings.get('stream', False)))
  if name == 'synthetic_data':
    default = inspect.signature(ref.configurable.wrapped).parameters['length'].default
    return int(bindings.get('length', default)), None, False
  raise ValueError(f'{where}: run_training.data = @{name}(): not a data source whose sequence '
                   'length moescale knows (seqio_data, synthetic_data)')


def parse_run(run_dir: str, bindings: Sequence[str] = ()):
  """(model constructor, TrainConfig, data-source factory) of run_dir/config.gin with
  `bindings` applied over it: what evaluation, fine-tuning and `moescale collect` read a run
  directory by. The data source is returned unbuilt (its seqio import costs seconds)."""
  path = os.path.join(run_dir, 'config.gin')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{run_dir} has no config.gin: not a run directory (moescale '
                            'train and the study code write one beside the checkpoints)')
  parse([path], list(bindings), finalize=False)
  return run_parts()


def run_parts():
  """(model constructor, TrainConfig, data-source factory) of the parsed run (`run_training`'s
  bindings), the data source unbuilt."""
  # `%MODEL` (a macro) evaluates to the constructor; `@ClassifierLM` (a reference, as a
  # fine-tuned run binds it) is the constructor itself.
  model_ref = gin.query_parameter('run_training.model')
  model_fn = (model_ref.scoped_configurable_fn() if model_ref.evaluate
              else model_ref.scoped_configurable_fn)
  config = gin.query_parameter('run_training.config').scoped_configurable_fn()
  return model_fn, config, gin.query_parameter('run_training.data').scoped_configurable_fn
