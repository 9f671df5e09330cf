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

Categories (`flops_by_category`, `params_by_category`) group the free-form component names
the sublayers report: attention projections, attention scores (incl. Transformer-XL's
relative-position terms), the FFN (dense, experts and routers), PKM (query, keys, values) and
the output layer; parameters also count the embedding and the LayerNorms.

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

# Component names reported by `cost()` -> category. Unknown names fall into 'other', so a new
# family still counts (and shows up) without editing this table.
FLOP_CATEGORIES: Mapping[str, str] = {
    'attn_qkvo': 'attention_projections',
    'attn_scores': 'attention_scores', 'attn_values': 'attention_scores',
    'attn_relative': 'attention_scores',
    'ffn_in': 'ffn', 'ffn_out': 'ffn', 'experts': 'ffn', 'router': 'ffn', 'selection': 'ffn',
    'query': 'pkm', 'keys': 'pkm', 'slot_sum': 'pkm', 'values': 'pkm',
    'output': 'output',
}
CATEGORIES = ('attention_projections', 'attention_scores', 'ffn', 'pkm', 'output', 'other')


def flops_by_category(breakdown: Mapping[str, float]) -> dict[str, float]:
  """Forward FLOPs by component -> by category (every category present, 0.0 if unused)."""
  out = {c: 0.0 for c in CATEGORIES}
  for k, v in breakdown.items():
    cat = FLOP_CATEGORIES.get(k, 'other')
    out[cat] += float(v)
  return out


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


def _param_category(path: tuple[str, ...], ffn_categories: Mapping[str, str]) -> str:
  if path[0] == 'embed':
    return 'embedding'
  if path[0] == 'unembed':
    return 'output'
  if path[0] == 'position_table':
    return 'positions'
  if path[0] == 'final_norm' or any(p in ('attention_norm', 'ffn_norm') for p in path):
    return 'norms'
  if 'attention' in path:
    return 'attention'
  if 'ffn' in path:
    # Which FFN? Its own cost() says: a layer reporting PKM components counts as 'pkm'.
    key = path[:path.index('ffn') + 1]
    return ffn_categories.get(key, 'ffn')
  return 'other'


def count(model_fn_or_model, context_length: int, query_length: int | None = None
          ) -> ModelCount:
  """Counts a model given as a constructor `model_fn(rngs)` or an (abstract) instance.

  context_length: keys each query attends to (the full square: pass the sequence length, or
    segment + memory for Transformer-XL); query_length: queries per segment (Transformer-XL's
    position projection is shared by them), default context_length.
  """
  if isinstance(model_fn_or_model, nnx.Module):
    model = model_fn_or_model
  elif _takes_scan_layers(model_fn_or_model):
    # Same parameters, traced once per repeating group instead of once per layer.
    model = abstract_model(functools.partial(model_fn_or_model, scan_layers=True))
  else:
    model = abstract_model(model_fn_or_model)
  total = _num_params(nnx.state(model, nnx.Param))
  # Stacked (scanned) blocks hold every group's weights in one module: per-layer counts divide.
  groups = getattr(model, 'num_groups', 1) if getattr(model, 'blocks', None) is None else 1

  breakdown: dict[str, float] = {}
  layers = []
  inactive = 0
  attn = dict(model.attention_layers())
  for n, ffn in model.ffn_layers():
    fc = ffn.cost()
    ac = attn[n].cost(context_length, query_length)
    ffn_total = _num_params(nnx.state(ffn, nnx.Param)) // groups
    inactive += ffn_total - fc.active_params
    for k, v in list(fc.flops.items()) + list(ac.flops.items()):
      breakdown[k] = breakdown.get(k, 0.0) + float(v)
    layers.append({'layer': n, 'ffn': type(ffn).__name__, 'ffn_params': ffn_total,
                   'ffn_active_params': fc.active_params, 'ffn_flops': fc.total_flops,
                   'attention_flops': ac.total_flops})
  vocab, d = model.vocab_size, model.d_model
  breakdown['output'] = 2.0 * d * vocab
  embedding = _num_params(nnx.state(model, nnx.Param)['embed'])
  forward = float(sum(breakdown.values()))
  routers = sum(v for k, v in breakdown.items() if 'router' in k or 'selection' in k)
  train = {
      'standard': 3.0 * forward,
      'recompute': 4.0 * forward,
      'artetxe': 4.0 * (forward - breakdown['output'] - routers) + 3.0 * breakdown['output'],
  }
  return ModelCount(total_params=total, active_params=total - inactive,
                    embedding_params=embedding, flops_per_token=forward,
                    flops_breakdown=breakdown, train_flops_per_token=train,
                    context_length=context_length, layers=layers,
                    flops_by_category=flops_by_category(breakdown),
                    params_by_category=params_by_category(model))


def params_by_category(model: nnx.Module) -> dict[str, int]:
  """Parameters by category: embedding, positions, attention, norms, ffn, pkm, output, other."""
  ffn_categories = {}
  for path, ffn in _ffn_modules(model):
    cats = {FLOP_CATEGORIES.get(k, 'other') for k in ffn.cost().flops}
    ffn_categories[path] = 'pkm' if 'pkm' in cats else 'ffn'
  out = {c: 0 for c in ('embedding', 'positions', 'attention', 'norms', 'ffn', 'pkm',
                        'output', 'other')}
  for path, leaf in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    path = tuple(str(p) for p in path)
    value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
    out[_param_category(path, ffn_categories)] += int(math.prod(value.shape))
  return out


def _ffn_modules(model: nnx.Module):
  """(path of the FFN sublayer as strings, module) for each distinct FFN module."""
  for path, module in nnx.iter_graph(model):
    path = tuple(str(p) for p in path)
    if path and path[-1] == 'ffn' and isinstance(module, nnx.Module):
      yield path, module


def forward_flops_per_token(model_fn, context_length: int) -> float:
  return count(model_fn, context_length).flops_per_token
