"""The interchangeable FFN sublayers: one family a file, one shared dispatch for the MoEs.

Every family is built as `Family(d_model=..., <hyperparameters>, rngs=nnx.Rngs(seed))`, called
as `layer(x, deterministic=..., segment_ids=None)` on x: [batch, length, d_model], records its
auxiliary losses and metrics with `common.record_losses` / `record_metrics`, and reports its
per-token cost with `cost() -> common.Cost`.
"""

import importlib

from moescale.layers.common import AuxLoss, Cost, RoutingMetric

_FAMILIES = {
    'DenseFFN': 'moescale.layers.dense',
    'TopKMoE': 'moescale.layers.topk_moe',
    'SigmaMoE': 'moescale.layers.sigma_moe',
    'ProductKeyMemory': 'moescale.layers.pkm',
}

__all__ = ['AuxLoss', 'Cost', 'RoutingMetric', *_FAMILIES]


def __getattr__(name):
  # Families load on first use so a broken or heavy family never slows `import moescale.layers`.
  if name in _FAMILIES:
    return getattr(importlib.import_module(_FAMILIES[name]), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
