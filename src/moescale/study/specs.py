"""The serialisable specs of one run: a model (`ModelSpec`, its FFNs as `Component`s), its
data (`DataSpec`) and its training settings (`train_config`), each written as gin bindings
(`gin_lines`) and as JSON (`_json_value`); `REQUIRED` marks a value the user must supply.

Names resolve as gin binds them: 'TransformerLM' or a family of `moescale.layers.registry`.
Nothing here imports the model, the trainer or the data until a spec is built.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping


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
