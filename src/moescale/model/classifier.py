"""`ClassifierLM`: a pretrained LM with a classification head (fine-tuning's head='classifier',
moescale.evaluate.finetune). A linear map from the final LayerNorm's output to the labels
replaces the output layer, at every position ([batch, length, num_labels] in
`LMOutput.logits`), so the trainer trains it like any model; the data puts the loss on one
position, the context's last token. The LM's own output layer is kept (unused) so that its
parameters keep their pretrained paths under 'lm'.
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
from flax import nnx

from moescale.layers import common


class ClassifierLM(nnx.Module):
  """lm: the LM's constructor (called with rngs); num_labels: classes of the head."""

  def __init__(self, lm: Callable[..., nnx.Module], num_labels: int, *, rngs: nnx.Rngs):
    common.check_positive(num_labels=num_labels)
    self.lm = lm(rngs=rngs)
    d = self.lm.d_model
    self.num_labels, self.mem_len = num_labels, 0
    self.head = common.param(rngs, common.fan_in_normal(d), (d, num_labels), ('embed', None),
                             jnp.float32)
    self.head_bias = common.param(rngs, nnx.initializers.zeros, (num_labels,), (None,),
                                  jnp.float32)

  def __call__(self, tokens, *, segment_ids=None, positions=None, deterministic=True, **kw):
    kw.pop('mem_len', None)       # a classifier reads one context at a time: no memory
    out = self.lm(tokens, segment_ids=segment_ids, positions=positions,
                  deterministic=deterministic, mem_len=0, **kw)
    logits = jnp.einsum('bld,dc->blc', out.hidden.astype(jnp.float32), self.head[...])
    return out.replace(logits=logits + self.head_bias[...], memory=None, memory_mask=None)

  def ffn_layers(self):
    return self.lm.ffn_layers()

  def batch_losses(self, batch_stats):
    return self.lm.batch_losses(batch_stats)
