"""Optimiser: optax AdamW with warmup + decay, clipping, masked weight decay, per-group LRs.

All of it is optax; this file only wires the papers' recipes into one constructor:
- Artetxe et al.: Adam(0.9, 0.98), linear warmup then linear decay to 0, weight decay 0.01 on
  every parameter (fairseq decays biases and norms too), no clipping.
- Csordás et al.: AdamW(0.9, 0.999) lr 2.5e-4, no weight decay, cosine to 0, clip 0.25.
Plain SGD is there for checks whose answer must scale with the gradient (Adam's update is
blind to a constant factor on every gradient: see tests/test_train_sharded.py).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

_DECAYS = ('cosine', 'linear', 'rsqrt', 'constant')
_NAMES = ('adamw', 'sgd')
_DECAYED = ('matrices', 'all')


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Everything that defines the update rule. gin binds it; Python builds it directly.

  name: 'adamw' (b1, b2, eps apply) or 'sgd' (plain gradient descent, no momentum).
  learning_rate: peak LR after warmup.
  decay: 'cosine' | 'linear' (to end_lr_fraction·peak at total_steps) | 'rsqrt' (∝ 1/sqrt(step)
    after warmup) | 'constant'.
  weight_decay: decoupled (AdamW), on the parameters weight_decay_params names.
  weight_decay_params: 'matrices' (not norms, biases or other 1-d parameters) | 'all' (every
    parameter, as fairseq's Adam decays them: Artetxe et al.'s recipe).
  clip_norm: global gradient-norm clipping (None or <= 0: off).
  group_lr: {regex on the parameter path: LR multiplier}, first match wins, e.g.
    {r'pkm.*values': 10.0} for PKM value tables (Lample et al. use a larger LR for values).
  skip_nonfinite: skip (apply no update for) a step whose gradients hold a NaN or an Inf, up
    to this many in a row (`optax.apply_if_finite`; the count is logged as skipped_steps);
    0: never skip, and the trainer stops the run at the first non-finite step it sees.
  """
  learning_rate: float = 3e-4
  name: str = 'adamw'
  warmup_steps: int = 0
  decay: str = 'cosine'
  end_lr_fraction: float = 0.0
  b1: float = 0.9
  b2: float = 0.98
  eps: float = 1e-8
  weight_decay: float = 0.0
  weight_decay_params: str = 'matrices'
  clip_norm: float | None = 1.0
  group_lr: Mapping[str, float] = dataclasses.field(default_factory=dict)
  skip_nonfinite: int = 0

  def __post_init__(self):
    if self.name not in _NAMES:
      raise ValueError(f'optimizer name={self.name!r}; valid: {_NAMES}')
    if self.decay not in _DECAYS:
      raise ValueError(f'decay={self.decay!r}; valid: {_DECAYS}')
    if self.weight_decay_params not in _DECAYED:
      raise ValueError(f'weight_decay_params={self.weight_decay_params!r}; valid: {_DECAYED}')
    if self.learning_rate <= 0:
      raise ValueError(f'learning_rate={self.learning_rate!r} must be > 0')
    if self.warmup_steps < 0:
      raise ValueError(f'warmup_steps={self.warmup_steps!r} must be >= 0')
    if not (isinstance(self.skip_nonfinite, int) and self.skip_nonfinite >= 0):
      raise ValueError(f'skip_nonfinite={self.skip_nonfinite!r} must be an integer >= 0')


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
  peak, warm = cfg.learning_rate, cfg.warmup_steps
  end = peak * cfg.end_lr_fraction
  rest = max(total_steps - warm, 1)
  if cfg.decay == 'cosine':
    after = optax.cosine_decay_schedule(peak, rest, alpha=cfg.end_lr_fraction)
  elif cfg.decay == 'linear':
    after = optax.linear_schedule(peak, end, rest)
  elif cfg.decay == 'rsqrt':
    # peak at the end of warmup, then peak * sqrt(warm / step): the Transformer schedule.
    offset = max(warm, 1)
    # join_schedules also evaluates this at negative steps (then discards it): clamp.
    after = lambda step: peak * jnp.sqrt(offset / jnp.maximum(step + offset, offset))
  else:
    after = optax.constant_schedule(peak)
  if warm == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warm), after], [warm])


def path_str(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)


def decay_mask(params: nnx.State):
  """True for parameters that get weight decay: matrices, not norms / biases / scalars."""
  def one(path, x):
    name = path_str(path).lower()
    return getattr(x, 'ndim', 0) >= 2 and 'norm' not in name and 'bias' not in name
  return jax.tree_util.tree_map_with_path(one, params)


def _group_labels(params: nnx.State, group_lr: Mapping[str, float]):
  patterns = [(re.compile(p), p) for p in group_lr]
  def one(path, _):
    name = path_str(path)
    return next((p for rx, p in patterns if rx.search(name)), '__default__')
  return jax.tree_util.tree_map_with_path(one, params)


def make_optimizer(cfg: OptimizerConfig, total_steps: int, params: nnx.State
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(transformation, schedule) for `params` (an nnx.State of nnx.Param, abstract is fine)."""
  schedule = learning_rate_schedule(cfg, total_steps)
  mask = decay_mask if cfg.weight_decay_params == 'matrices' else None  # None: every parameter

  def rule(lr):
    if cfg.name == 'sgd':
      # Decoupled decay, as AdamW's: lr * (g + wd * p) is a step of lr*wd*p towards zero.
      return optax.chain(optax.add_decayed_weights(cfg.weight_decay, mask=mask), optax.sgd(lr))
    return optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                       mask=mask)

  if cfg.group_lr:
    groups = {p: rule(lambda s, m=m: schedule(s) * m) for p, m in cfg.group_lr.items()}
    groups['__default__'] = rule(schedule)
    opt = optax.multi_transform(groups, _group_labels(params, cfg.group_lr))
  else:
    opt = rule(schedule)
  if cfg.clip_norm and cfg.clip_norm > 0:
    opt = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt)
  if cfg.skip_nonfinite:
    opt = optax.apply_if_finite(opt, max_consecutive_errors=cfg.skip_nonfinite)
  return opt, schedule


def skipped_steps(opt_state) -> jax.Array | None:
  """The steps `skip_nonfinite` has skipped so far (None when it is off)."""
  for node in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(
      x, optax.ApplyIfFiniteState)):
    if isinstance(node, optax.ApplyIfFiniteState):
      return node.total_notfinite
  return None
