"""The interchangeable FFN sublayers: one family a file, one shared dispatch for the MoEs.

Every family is built as `Family(d_model=..., <hyperparameters>, rngs=nnx.Rngs(seed))` and
called as `layer(x, deterministic=..., segment_ids=None)` on x: [batch, length, d_model].
"""

from moescale.layers.common import AuxLoss, RoutingMetric
from moescale.layers.dense import DenseFFN

__all__ = ['AuxLoss', 'RoutingMetric', 'DenseFFN']
