"""A classification head on a pretrained LM, the option beside label-word scoring when
fine-tuning on a classification task (`moescale.evaluate.finetune`, head='classifier').

`ClassifierLM(lm, num_labels)` wraps the LM: a linear map from the final LayerNorm's output at
each position to the labels replaces the output layer ([batch, length, num_labels] logits in
`LMOutput.logits`), so the trainer trains it like any model; the loss falls on one position,
the context's last token, with the label's index as its target. The LM's own output layer is
kept (unused) so that its parameters keep their pretrained paths under 'lm'.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
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


def rows(vocab, contexts: Sequence[str], labels: Sequence[int], length: int):
  """[n, length] decoder features: the context (its newest `length` tokens), the loss on its
  last position with the label's index as the target."""
  n = len(contexts)
  keys = ('decoder_input_tokens', 'decoder_target_tokens', 'decoder_segment_ids',
          'decoder_positions')
  feats = {k: np.zeros((n, length), np.int32) for k in keys}
  feats['decoder_loss_weights'] = np.zeros((n, length), np.float32)
  for i, (context, label) in enumerate(zip(contexts, labels)):
    ctx = list(vocab.encode(context))[-(length - 1):] or [0]
    m = len(ctx) + 1                      # input 0 starts the document, then the context
    feats['decoder_input_tokens'][i, 1:m] = ctx
    feats['decoder_segment_ids'][i, :m] = 1
    feats['decoder_positions'][i, :m] = np.arange(m)
    feats['decoder_target_tokens'][i, m - 1] = label
    feats['decoder_loss_weights'][i, m - 1] = 1.0
  return feats


def examples_rows(task, split: str, vocab, length: int):
  """`rows` of a classification task's split (the context of its first choice: a task's
  choices share the context), with the label indices."""
  examples = task.examples(split)
  labels = [e.label for e in examples]
  return rows(vocab, [e.choices[0].context for e in examples], labels, length), np.array(labels)


def accuracy(run, task, max_examples: int | None = None, batch_size: int | None = None) -> dict:
  """The head's accuracy on the task's evaluation split: argmax of the head's logits at the
  context's last token against the label."""
  from moescale import sharding as shd
  feats, labels = examples_rows(task, task.eval_split, run.vocabulary, run.sequence_length)
  n = len(labels) if max_examples is None else min(max_examples, len(labels))
  batch_size = batch_size or run.config.batch_size
  padded = -(-n // batch_size) * batch_size
  feats = {k: np.concatenate([v[:n], np.zeros((padded - n,) + v.shape[1:], v.dtype)])
           for k, v in feats.items()}
  graphdef = run.built.graphdef

  @jax.jit
  def predict(params, rest, batch):
    out = nnx.merge(graphdef, params, rest)(
        batch['decoder_input_tokens'], segment_ids=batch['decoder_segment_ids'],
        positions=batch['decoder_positions'], deterministic=True)
    last = jnp.argmax(batch['decoder_loss_weights'], axis=1)
    return jnp.argmax(jnp.take_along_axis(out.logits, last[:, None, None], 1)[:, 0], -1)

  preds = []
  with shd.use_mesh(run.mesh, run.config.rules):
    for lo in range(0, padded, batch_size):
      batch = shd.host_local_to_global({k: v[lo:lo + batch_size] for k, v in feats.items()},
                                       run.mesh)
      preds.append(np.asarray(predict(run.state.params, run.state.rest, batch)))
  acc = float(np.mean(np.concatenate(preds)[:n] == labels[:n]))
  return {'task': task.name, 'head': 'classifier', 'examples': n,
          'chance': 1 / len(task.labels), 'accuracy': acc}
