"""The interchangeable FFN sublayers: one family a file, one registry, one shared MoE dispatch.

Every family is built as `Family(d_model=..., <hyperparameters>, rngs=nnx.Rngs(seed))`, called
as `y, aux = layer(x, deterministic=..., segment_ids=None)` on x: [batch, length, d_model]
(`aux`: its weighted auxiliary losses and its metrics, a `common.Aux`), and reports its
per-token cost with `cost() -> common.Cost`. `registry` lists the families; `families()` names
them all, `register_family` adds one.
"""

from moescale.layers.common import Aux, Cost
from moescale.layers.registry import families, get_family, register_family

__all__ = ['Aux', 'Cost', 'families', 'get_family', 'register_family',
           'DenseFFN', 'TopKMoE', 'SigmaMoE', 'ProductKeyMemory']


def __getattr__(name):
  # Families load on first use, so `import moescale.layers` stays light.
  registered = families()
  if name in registered:
    return registered[name]
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
