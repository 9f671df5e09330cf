"""Experiments in Python, without gin: the same models, data and training settings the gin files
describe, expanded into grids of runs (sizes x FFN families x a matching rule).

    Component('TopKMoE', num_experts=512, expert_size=3072)   a constructor by name + kwargs
    ModelSpec(vocab_size=..., ffn=Component('DenseFFN', d_ff=3072), sparse_ffn=..., ...)
        TransformerLM's keyword arguments, FFNs as Components
    DataSpec('seqio', mixture_or_task_name=..., task_feature_lengths={'targets': 2048})
    Experiment(name, model, data, train={TrainConfig kwargs; mesh/optimizer/step as dicts})
    ScalingStudy(name, sizes, families, data, train, matching).expand() -> [Experiment]

Every run gets a directory with its operative configuration written twice: `config.gin`
(runnable as `moescale train --gin_file=DIR/config.gin`, and parsed back to the same model:
tests/test_study.py) and `config.json` (the specs plus the model's counts). `ScalingStudy.run`
trains the runs one after another in this process (`moescale.train.trainer.train`).

Matching: a `Matching(quantity='train_flops')` makes every family with a `knob` (a key of the
size dict its builder reads, e.g. 'expert_size' or 'd_ff') match the reference family in
that quantity, solving for the knob's integer value (`moescale.pairs.solve_integer`).
Counting is abstract (`moescale.accounting`), so a grid of 1T-parameter models expands in
seconds and nothing here imports TensorFlow until a seqio run trains.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable, Mapping, Sequence

from moescale import accounting



class _Required:
  """A value the user must supply (data the project does not ship); gin: %gin.REQUIRED."""

  def __repr__(self) -> str:
    return 'REQUIRED'


REQUIRED = _Required()


def _constructor(name: str):
  """A Component's class by name: 'TransformerLM' or a registered FFN family (the same names
  gin binds)."""
  from moescale import model
  from moescale.layers import registry
  if name == 'TransformerLM':
    return model.TransformerLM
  families = registry.families()
  if name not in families:
    raise ValueError(f'unknown constructor {name!r}; valid: TransformerLM or a registered '
                     f'FFN family {sorted(families)}')
  return families[name]


def _gin_value(v: Any) -> str:
  """A Python literal as gin text (gin parses Python literals)."""
  if v is REQUIRED:
    return '%gin.REQUIRED'
  if isinstance(v, (list, tuple)):
    inner = ', '.join(_gin_value(x) for x in v)
    return f'[{inner}]' if isinstance(v, list) else f'({inner}{"," if len(v) == 1 else ""})'
  if isinstance(v, dict):
    return '{' + ', '.join(f'{_gin_value(k)}: {_gin_value(x)}' for k, x in v.items()) + '}'
  if v is None or isinstance(v, (bool, int, float, str)):
    return repr(v)
  raise ValueError(f'{v!r} ({type(v).__name__}) cannot be written to gin: use literals')


def _json_value(v: Any) -> Any:
  if v is REQUIRED:
    return 'REQUIRED'
  if isinstance(v, Component):
    return {'constructor': v.name, **{k: _json_value(x) for k, x in v.kwargs.items()}}
  if isinstance(v, dict):
    return {str(k): _json_value(x) for k, x in v.items()}
  if isinstance(v, (list, tuple)):
    return [_json_value(x) for x in v]
  return v


@dataclasses.dataclass(frozen=True)
class Component:
  """A layer constructor by name (a registered FFN family: `moescale.layers.families()`) and
  its keyword arguments (all but d_model and rngs, which the model passes)."""
  name: str
  kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __init__(self, name: str, **kwargs):
    _constructor(name)  # fail early on a typo
    object.__setattr__(self, 'name', name)
    object.__setattr__(self, 'kwargs', dict(kwargs))

  def replace(self, **kwargs) -> Component:
    return Component(self.name, **{**self.kwargs, **kwargs})

  def build(self) -> Callable:
    return functools.partial(_constructor(self.name), **self.kwargs)

  def gin_lines(self, scope: str) -> list[str]:
    return [f'{scope}/{self.name}.{k} = {_gin_value(v)}' for k, v in self.kwargs.items()]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """TransformerLM's keyword arguments; `ffn` and `sparse_ffn` are Components (or None)."""
  kwargs: Mapping[str, Any]

  def __init__(self, **kwargs):
    for key in ('ffn', 'sparse_ffn'):
      v = kwargs.get(key)
      if v is not None and not isinstance(v, Component):
        raise ValueError(f'ModelSpec {key}= must be a Component, got {v!r}')
    if kwargs.get('ffn') is None:
      raise ValueError('ModelSpec needs ffn=Component(...)')
    object.__setattr__(self, 'kwargs', dict(kwargs))

  def __getitem__(self, key):
    return self.kwargs[key]

  def get(self, key, default=None):
    return self.kwargs.get(key, default)

  def replace(self, **kwargs) -> ModelSpec:
    return ModelSpec(**{**self.kwargs, **kwargs})

  def constructor(self) -> Callable:
    """`model_fn(rngs=...)`, as the trainer and accounting take it."""
    kw = {k: (v.build() if isinstance(v, Component) else v) for k, v in self.kwargs.items()}
    return functools.partial(_constructor('TransformerLM'), **kw)

  def gin_lines(self) -> list[str]:
    lines = ['MODEL = @TransformerLM']
    tail = []
    for k, v in self.kwargs.items():
      if isinstance(v, Component):
        # Scoped, so the dense and the sparse FFN may be the same class with other settings.
        lines.append(f'TransformerLM.{k} = @{k}/{v.name}')
        tail += v.gin_lines(k)
      else:
        lines.append(f'TransformerLM.{k} = {_gin_value(v)}')
    return lines + tail


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """'seqio' (moescale.launch.seqio_data) or 'synthetic' (launch.synthetic_data) + kwargs."""
  kind: str
  kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __init__(self, kind: str, **kwargs):
    if kind not in ('seqio', 'synthetic'):
      raise ValueError(f"DataSpec kind {kind!r}; valid: 'seqio', 'synthetic'")
    object.__setattr__(self, 'kind', kind)
    object.__setattr__(self, 'kwargs', dict(kwargs))

  @property
  def function(self) -> str:
    return f'{self.kind}_data'

  @property
  def sequence_length(self) -> int | None:
    if self.kind == 'seqio':
      return (self.kwargs.get('task_feature_lengths') or {}).get('targets')
    return self.kwargs.get('length', 32)

  def build(self):
    missing = [k for k, v in self.kwargs.items() if v is REQUIRED]
    if missing:
      raise ValueError(f'data {self.function}: {missing} must be set (data not shipped)')
    from moescale import launch
    return getattr(launch, self.function)(**self.kwargs)

  def gin_lines(self) -> list[str]:
    return [f'run_training.data = @{self.function}()'] + [
        f'{self.function}.{k} = {_gin_value(v)}' for k, v in self.kwargs.items()]


_TRAIN_NESTED = {'mesh': 'MeshConfig', 'optimizer': 'OptimizerConfig', 'step': 'StepConfig'}


def train_config(train: Mapping[str, Any], model_dir: str):
  """TrainConfig from a dict of its keyword arguments (mesh/optimizer/step as dicts)."""
  from moescale.train import optim, step, trainer
  classes = {'mesh': trainer.MeshConfig, 'optimizer': optim.OptimizerConfig,
             'step': step.StepConfig}
  kw = {k: (classes[k](**v) if k in classes else v) for k, v in train.items()}
  return trainer.TrainConfig(model_dir=model_dir, **kw)


def _train_gin_lines(train: Mapping[str, Any], model_dir: str) -> list[str]:
  lines = ['run_training.config = @TrainConfig()', f'TrainConfig.model_dir = {model_dir!r}']
  tail = []
  for k, v in train.items():
    if k in _TRAIN_NESTED:
      cls = _TRAIN_NESTED[k]
      lines.append(f'TrainConfig.{k} = @{cls}()')
      tail += [f'{cls}.{kk} = {_gin_value(vv)}' for kk, vv in v.items()]
    else:
      lines.append(f'TrainConfig.{k} = {_gin_value(v)}')
  return lines + tail


@dataclasses.dataclass(frozen=True)
class Experiment:
  """One run: a model, its data and its training settings (TrainConfig kwargs, no model_dir).

  meta: free-form labels (size, family, matched knob) copied into config.json.
  """
  name: str
  model: ModelSpec
  data: DataSpec | None = None
  train: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def model_fn(self) -> Callable:
    return self.model.constructor()

  def lengths(self) -> tuple[int, int | None]:
    """(keys per query, queries per segment) for attention FLOPs: the data's sequence length
    plus the Transformer-XL memory, else the model's max_length."""
    segment = self.data.sequence_length if self.data is not None else None
    if segment:
      return segment + int(self.model.get('mem_len', 0) or 0), segment
    return int(self.model.get('max_length', 2048)), None

  @functools.cached_property
  def counts(self) -> accounting.ModelCount:
    return accounting.count(self.model_fn(), *self.lengths())

  def train_config(self, model_dir: str):
    return train_config(self.train, model_dir)

  def to_gin(self, model_dir: str) -> str:
    lines = [f'# {self.name}: written by moescale.study; run with',
             f'#   moescale train --gin_file={os.path.join(model_dir, "config.gin")}',
             *self.model.gin_lines(), 'run_training.model = %MODEL']
    if self.data is not None:
      lines += self.data.gin_lines()
    lines += _train_gin_lines(self.train, model_dir)
    return '\n'.join(lines) + '\n'

  def to_json(self, model_dir: str) -> dict:
    c = self.counts
    return {
        'name': self.name, 'model_dir': model_dir, 'meta': _json_value(dict(self.meta)),
        'model': {'constructor': 'TransformerLM', **_json_value(dict(self.model.kwargs))},
        'data': (None if self.data is None else
                 {'function': self.data.function, **_json_value(dict(self.data.kwargs))}),
        'train': _json_value(dict(self.train)),
        'counts': {'total_params': c.total_params, 'active_params': c.active_params,
                   'forward_flops_per_token': c.flops_per_token,
                   'train_flops_per_token': c.train_flops_per_token,
                   'context_length': c.context_length,
                   'flops_by_category': c.flops_by_category,
                   'params_by_category': c.params_by_category},
    }

  def write(self, model_dir: str) -> str:
    """Writes model_dir/config.gin and model_dir/config.json; returns model_dir."""
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, 'config.gin'), 'w') as f:
      f.write(self.to_gin(model_dir))
    with open(os.path.join(model_dir, 'config.json'), 'w') as f:
      json.dump(self.to_json(model_dir), f, indent=1)
    return model_dir

  def launch(self, model_dir: str) -> dict:
    """Trains (or resumes) in model_dir; returns the trainer's summary."""
    if self.data is None:
      raise ValueError(f'{self.name}: no data spec to train on')
    from moescale.train import trainer
    self.write(model_dir)
    return trainer.train(self.model_fn(), self.data.build(), self.train_config(model_dir),
                         flops_per_token=self.counts.flops_per_token)


# ---------------------------------------------------------------------------------- grids


@dataclasses.dataclass(frozen=True)
class Family:
  """An FFN family of a study: `build(size) -> ModelSpec`, or None where it does not apply.

  knob: the key of the size dict that matching may change (e.g. 'expert_size', 'd_ff');
  None: the family is never adjusted.
  """
  name: str
  build: Callable[[Mapping[str, Any]], ModelSpec | None]
  knob: str | None = None


@dataclasses.dataclass(frozen=True)
class Matching:
  """How the families of one size relate.

  quantity: None (no matching: e.g. Artetxe's shape twins) or one of moescale.pairs.MATCHES;
  reference: the family the others match; convention: for 'train_flops';
  multiple_of: round the knob to a multiple (hardware-friendly sizes);
  tolerance: a solved knob further off than this raises (the knob cannot reach the target).
  """
  quantity: str | None = None
  reference: str = 'dense'
  convention: str = 'standard'
  multiple_of: int = 1
  tolerance: float = 0.01


@dataclasses.dataclass(frozen=True)
class ScalingStudy:
  """A grid: every size x every family, matched to the reference family per `matching`.

  sizes: name -> size dict (free-form; what the family builders read).
  data, train: a DataSpec / TrainConfig-kwargs dict, or a function (size name, size) -> one.
  Experiments are named '<size>/<family>' and live in root/<size>/<family>.
  """
  name: str
  sizes: Mapping[str, Mapping[str, Any]]
  families: Sequence[Family]
  data: DataSpec | Callable[[str, Mapping], DataSpec] | None = None
  train: Mapping[str, Any] | Callable[[str, Mapping], Mapping] = dataclasses.field(
      default_factory=dict)
  matching: Matching = Matching()

  def __post_init__(self):
    names = [f.name for f in self.families]
    if len(set(names)) != len(names):
      raise ValueError(f'family names repeat: {names}')
    q = self.matching.quantity
    if q is not None:
      from moescale import pairs
      if q not in pairs.MATCHES:
        raise ValueError(f'Matching.quantity={q!r}; valid: None or {list(pairs.MATCHES)}')
      if self.matching.reference not in names:
        raise ValueError(f'Matching.reference={self.matching.reference!r} is not a family: '
                         f'{names}')

  def _resolve(self, value, size_name, size):
    return value(size_name, size) if callable(value) else value

  def _experiment(self, size_name, size, family, meta) -> Experiment | None:
    spec = family.build(size)
    if spec is None:
      return None
    return Experiment(name=f'{size_name}/{family.name}', model=spec,
                      data=self._resolve(self.data, size_name, size),
                      train=dict(self._resolve(self.train, size_name, size) or {}),
                      meta={'study': self.name, 'size': size_name, 'family': family.name,
                            **meta})

  def expand(self, only: Sequence[str] | None = None) -> list[Experiment]:
    """The grid's experiments, matched. only: size names to expand (default all)."""
    m = self.matching
    out = []
    for size_name, size in self.sizes.items():
      if only and size_name not in only:
        continue
      ref = None
      if m.quantity is not None:
        ref_family = next(f for f in self.families if f.name == m.reference)
        ref = self._experiment(size_name, size, ref_family, {'role': 'reference'})
      for family in self.families:
        if ref is not None and family.name == m.reference:
          out.append(ref)
          continue
        if ref is None or family.knob is None:
          exp = self._experiment(size_name, size, family, {})
        else:
          exp = self._match(size_name, size, family, ref)
        if exp is not None:
          out.append(exp)
    return out

  def _match(self, size_name, size, family, ref: Experiment) -> Experiment | None:
    from moescale import pairs
    m = self.matching
    target = _quantity(ref.counts, m.quantity, m.convention)
    if family.build(size) is None:
      return None

    def evaluate(x: int) -> float:
      exp = self._experiment(size_name, {**size, family.knob: x}, family, {})
      return _quantity(exp.counts, m.quantity, m.convention)

    start = size.get(family.knob)
    if not isinstance(start, int):
      raise ValueError(f'{size_name}: size[{family.knob!r}] must be an int to match '
                       f'{family.name}, got {start!r}')
    value, q = pairs.solve_integer(evaluate, target, start, m.multiple_of)
    if abs(q / target - 1) > m.tolerance:
      raise ValueError(f'{size_name}/{family.name}: {family.knob}={value} gets {m.quantity} '
                       f'{q:.4g} vs {target:.4g} ({100 * (q / target - 1):+.2f}%), outside '
                       f'the tolerance {m.tolerance}')
    return self._experiment(size_name, {**size, family.knob: value}, family,
                            {'matched': {'quantity': m.quantity, 'convention': m.convention,
                                         'to': m.reference, 'knob': family.knob,
                                         'value': value, 'ratio': q / target}})

  def write(self, root: str, experiments: Sequence[Experiment] | None = None
            ) -> list[tuple[Experiment, str]]:
    """Writes every run directory (config.gin, config.json) and root/study.json."""
    experiments = self.expand() if experiments is None else experiments
    runs = [(e, e.write(os.path.join(root, e.name))) for e in experiments]
    with open(os.path.join(root, 'study.json'), 'w') as f:
      json.dump({'study': self.name, 'runs': [{'name': e.name, 'dir': d,
                                               'meta': _json_value(dict(e.meta))}
                                              for e, d in runs]}, f, indent=1)
    return runs

  def run(self, root: str, experiments: Sequence[Experiment] | None = None) -> list[dict]:
    """Writes every run directory, then trains the runs one after another."""
    runs = self.write(root, experiments)
    return [e.launch(d) for e, d in runs]


def run_from_args(study: 'ScalingStudy', root: str, only=None, families=None,
                  dry_run: bool = False, convention: str = 'standard') -> int:
  """What an experiment script does with its parsed flags: expand (optionally keeping some
  sizes / families), print the count table, then write the run directories (dry run) or
  train them one after another."""
  experiments = [e for e in study.expand(only)
                 if not families or e.meta['family'] in families]
  print(table(experiments, convention=convention))
  if dry_run:
    runs = study.write(root, experiments)
    print(f'wrote {len(runs)} run directories under {root}')
    return 0
  for summary in study.run(root, experiments):
    print(summary, end='\n\n')
  return 0


def _quantity(c: accounting.ModelCount, quantity: str, convention: str) -> float:
  if quantity == 'train_flops':
    return c.train_flops_per_token[convention]
  if quantity == 'forward_flops':
    return c.flops_per_token
  return float(getattr(c, quantity))


def table(experiments: Sequence[Experiment], convention: str = 'standard') -> str:
  """A text table of the experiments' counts (what the experiments scripts' --dry_run print)."""
  from moescale.pairs import human
  head = ('run', 'params', 'active', f'train FLOPs/token ({convention})', 'matched')
  rows = []
  for e in experiments:
    c = e.counts
    m = e.meta.get('matched')
    note = (f"{m['knob']}={m['value']} ({m['quantity']} ratio {m['ratio']:.4f})" if m
            else e.meta.get('role', ''))
    rows.append((e.name, human(c.total_params), human(c.active_params),
                 human(c.train_flops_per_token[convention], 'G'), note))
  widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
  fmt = '  '.join(f'{{:<{w}}}' for w in widths)
  return '\n'.join([fmt.format(*head), fmt.format(*('-' * w for w in widths))] +
                   [fmt.format(*r) for r in rows])
