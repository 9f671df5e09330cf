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
                  plus 64·T·h² per MoE layer for its second expert.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

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

  def as_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d['train_flops_per_token_standard'] = self.train_flops_per_token['standard']
    return d


def _num_params(tree) -> int:
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def abstract_model(model_fn: Callable[..., nnx.Module], seed: int = 0) -> nnx.Module:
  return nnx.eval_shape(lambda: model_fn(rngs=nnx.Rngs(seed)))


def count(model_fn_or_model, context_length: int, query_length: int | None = None
          ) -> ModelCount:
  """Counts a model given as a constructor `model_fn(rngs)` or an (abstract) instance."""
  model = (model_fn_or_model if isinstance(model_fn_or_model, nnx.Module)
           else abstract_model(model_fn_or_model))
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
                    context_length=context_length, layers=layers)


def forward_flops_per_token(model_fn, context_length: int) -> float:
  return count(model_fn, context_length).flops_per_token
