"""`Experiment`: one run (a model, its data, its training settings) with its abstract counts,
its run directory (config.gin and config.json) and its launch (`moescale.train.trainer`)."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable, Mapping

from moescale import accounting
from moescale.study.specs import (DataSpec, ModelSpec, _json_value, _train_gin_lines,
                                  train_config)


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

  def launch(self, model_dir: str, data=None, progress: bool = True) -> dict:
    """Trains (or resumes) in model_dir; returns the trainer's summary.

    data: the built data source to read (default: this experiment's DataSpec, built now); a
    study passes one source to all its runs of the same data, so each split is read and
    tokenized once. progress: the trainer's own progress bar (off under a study's display;
    config.gin keeps the run's setting)."""
    if self.data is None:
      raise ValueError(f'{self.name}: no data spec to train on')
    from moescale.train import trainer
    self.write(model_dir)
    cfg = self.train_config(model_dir)
    if not progress:
      cfg = dataclasses.replace(cfg, progress=False)
    return trainer.train(self.model_fn(), self.data.build() if data is None else data, cfg,
                         flops_per_token=self.counts.flops_per_token)
