"""Parameters and FLOPs of a model, from abstract shapes only (nothing is materialised).

The model is built under `nnx.eval_shape`, so even the 1.1T-parameter configuration counts in
seconds. Parameter totals come from the abstract parameter tree; FLOPs and active parameters
from each sublayer's own `cost()` (every FFN family and attention module reports its own), so
this file never names an FFN family.

Conventions (2 FLOPs per multiply-accumulate; element-wise work not counted):
- forward FLOPs per token: attention projections, attention scores and weighted values over
  `context_length` keys (the full square, as Kaplan et al. and Megatron count), each FFN's
  components (routers, experts, PKM keys/values), and the output layer 2·d·V.
- training FLOPs per token:
    'standard'    3 x forward (forward + backward)
    'recompute'   4 x forward (activation recomputation, Megatron's count)
    'artetxe'     4 x forward of everything but the output layer and routers, plus 3 x the
                  output layer: this reproduces the formula behind Artetxe et al.'s plots,
                  C = 96·T·l·h²·(1 + s/(6h) + V/(16·l·h)) for a dense model with d_ff = 4h,
                  plus 64·T·h² per MoE layer for its second expert. `artetxe_formula`
                  is that closed form itself, for comparison.

Categories (`flops_by_category`, `params_by_category`): attention projections, attention
scores (incl. Transformer-XL's relative-position terms) and the output layer, from the model's
own component names; each FFN sublayer's FLOPs and parameters under the category its `cost()`
names ('ffn' unless the family says otherwise: ProductKeyMemory says 'pkm'); parameters also
count the embedding and the LayerNorms.

Speed: building a model under `nnx.eval_shape` costs time quadratic in the number of
parameter arrays traced (with jax 0.10 / flax 0.12 every RNG draw's failed `tracer.sharding`
lookup builds an error message by scanning the jaxpr traced so far), so `count(constructor)`
builds the model with `scan_layers=True` when the constructor takes it: the stacked blocks
trace once, not once per layer, and the counts are the same by construction. The 1.1T model
counts in ~0.2 s.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from typing import Callable, Mapping

import jax
from flax import nnx


@dataclasses.dataclass(frozen=True)
class ModelCount:
  total_params: int
  active_params: int
  embedding_params: int
  flops_per_token: float                       # forward
  flops_breakdown: dict[str, float]            # forward, by component, summed over layers
  train_flops_per_token: dict[str, float]      # by convention: standard, recompute, artetxe
  context_length: int
  layers: list[dict]                           # per layer: ffn type, params, active, flops
  flops_by_category: dict[str, float] = dataclasses.field(default_factory=dict)  # forward
  params_by_category: dict[str, int] = dataclasses.field(default_factory=dict)

  def as_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d['train_flops_per_token_standard'] = self.train_flops_per_token['standard']
    return d

  def train_flops(self, tokens: float, convention: str = 'standard') -> float:
    """Training FLOPs for `tokens` tokens under a convention ('standard', 'recompute',
    'artetxe')."""
    if convention not in self.train_flops_per_token:
      raise ValueError(f'unknown convention {convention!r}; valid: '
                       f'{sorted(self.train_flops_per_token)}')
    return self.train_flops_per_token[convention] * tokens


CONVENTIONS = ('standard', 'recompute', 'artetxe')

# The model's own components -> category. Every FFN sublayer's components go to the category
# its `cost()` names (`layers.common.Cost.category`, 'ffn' unless the family says otherwise), so
# this file never names a family.
MODEL_CATEGORIES: Mapping[str, str] = {
    'attn_qkvo': 'attention_projections',
    'attn_scores': 'attention_scores', 'attn_values': 'attention_scores',
    'attn_relative': 'attention_scores',
    'output': 'output',
}
# Always reported (0.0 if unused); a family's own category is added where it is used.
CATEGORIES = ('attention_projections', 'attention_scores', 'ffn', 'output')


def artetxe_formula(num_layers: int, d_model: int, vocab_size: int = 50261,
                    seq_len: int = 2048, tokens: float = 300e9, moe_layers: int = 0) -> float:
  """The training compute Artetxe et al. plot (Megatron's count with recomputation):
  96·T·l·h²·(1 + s/(6h) + V/(16·l·h)) for a dense model with d_ff = 4h, plus 64·T·h² for
  each of `moe_layers` top-2 MoE layers (their second expert)."""
  l, h = num_layers, d_model
  dense = 96.0 * tokens * l * h * h * (1 + seq_len / (6.0 * h) + vocab_size / (16.0 * l * h))
  return dense + 64.0 * tokens * moe_layers * h * h


def _num_params(tree) -> int:
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def abstract_model(model_fn: Callable[..., nnx.Module], seed: int = 0) -> nnx.Module:
  """The model `model_fn(rngs=...)` builds, with abstract (shape-only) parameters."""
  return nnx.eval_shape(lambda: model_fn(rngs=nnx.Rngs(seed)))


def _takes_scan_layers(model_fn) -> bool:
  fn = model_fn
  while isinstance(fn, functools.partial):
    fn = fn.func
  # A class (nnx.Module's metaclass hides the signature): look at its __init__.
  target = fn.__init__ if isinstance(fn, type) else fn
  try:
    params = inspect.signature(target).parameters
  except (TypeError, ValueError):
    return False
  return 'scan_layers' in params


def _param_category(path: tuple[str, ...], ffn_categories: Mapping[tuple, str]) -> str:
  if path[0] == 'embed':
    return 'embedding'
  if path[0] in ('unembed', 'output_bias'):
    return 'output'
  if path[0] == 'position_table':
    return 'positions'
  if path[0] == 'final_norm' or any(p in ('attention_norm', 'ffn_norm') for p in path):
    return 'norms'
  if 'attention' in path:
    return 'attention'
  if 'ffn' in path:
    return ffn_categories.get(path[:path.index('ffn') + 1], 'ffn')
  return 'other'


def _build(model_fn_or_model) -> nnx.Module:
  if isinstance(model_fn_or_model, nnx.Module):
    return model_fn_or_model
  if _takes_scan_layers(model_fn_or_model):
    # Same parameters, traced once per repeating group instead of once per layer.
    return abstract_model(functools.partial(model_fn_or_model, scan_layers=True))
  return abstract_model(model_fn_or_model)


def count(model_fn_or_model, context_length: int, query_length: int | None = None
          ) -> ModelCount:
  """Counts a model given as a constructor `model_fn(rngs)` or an (abstract) instance.

  context_length: keys each query attends to (the full square: pass the sequence length, or
    segment + memory for Transformer-XL); query_length: queries per segment (Transformer-XL's
    position projection is shared by them), default context_length.
  """
  model = _build(model_fn_or_model)
  total = _num_params(nnx.state(model, nnx.Param))
  # Stacked (scanned) blocks hold every group's weights in one module: per-layer counts divide.
  groups = 1 if model.blocks is not None else model.num_groups

  breakdown: dict[str, float] = {}
  categories = dict.fromkeys(CATEGORIES, 0.0)
  layers = []
  inactive = 0
  attn = dict(model.attention_layers())

  def add(flops, category_of):
    for k, v in flops.items():
      breakdown[k] = breakdown.get(k, 0.0) + float(v)
      cat = category_of(k)
      categories[cat] = categories.get(cat, 0.0) + float(v)

  for n, ffn in model.ffn_layers():
    fc = ffn.cost()
    ac = attn[n].cost(context_length, query_length)
    ffn_total = _num_params(nnx.state(ffn, nnx.Param)) // groups
    inactive += ffn_total - fc.active_params
    add(fc.flops, lambda _: fc.category)
    add(ac.flops, lambda k: MODEL_CATEGORIES.get(k, 'other'))
    layers.append({'layer': n, 'ffn': type(ffn).__name__, 'ffn_params': ffn_total,
                   'ffn_active_params': fc.active_params, 'ffn_flops': fc.total_flops,
                   'attention_flops': ac.total_flops})
  add({'output': 2.0 * model.d_model * model.vocab_size}, MODEL_CATEGORIES.get)
  forward = float(sum(breakdown.values()))
  routers = sum(v for k, v in breakdown.items() if 'router' in k)
  train = {
      'standard': 3.0 * forward,
      'recompute': 4.0 * forward,
      'artetxe': 4.0 * (forward - breakdown['output'] - routers) + 3.0 * breakdown['output'],
  }
  return ModelCount(total_params=total, active_params=total - inactive,
                    embedding_params=_num_params(nnx.state(model, nnx.Param)['embed']),
                    flops_per_token=forward, flops_breakdown=breakdown,
                    train_flops_per_token=train, context_length=context_length,
                    layers=layers, flops_by_category=categories,
                    params_by_category=params_by_category(model))


def params_by_category(model: nnx.Module) -> dict[str, int]:
  """Parameters by category: embedding, positions, attention, norms, output, other, and each
  FFN sublayer's own category ('ffn' unless its cost() names another)."""
  ffn_categories = {path: ffn.cost().category for path, ffn in _ffn_modules(model)}
  out = dict.fromkeys(('embedding', 'positions', 'attention', 'norms', 'ffn', 'output'), 0)
  for path, leaf in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    path = tuple(str(p) for p in path)
    value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
    cat = _param_category(path, ffn_categories)
    out[cat] = out.get(cat, 0) + int(math.prod(value.shape))
  return out


def _ffn_modules(model: nnx.Module):
  """(path of the FFN sublayer as strings, module) for each distinct FFN module."""
  for path, module in nnx.iter_graph(model):
    path = tuple(str(p) for p in path)
    if path and path[-1] == 'ffn' and isinstance(module, nnx.Module):
      yield path, module


def forward_flops_per_token(model_fn, context_length: int) -> float:
  return count(model_fn, context_length).flops_per_token
