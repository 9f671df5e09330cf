"""The data and the accuracy of a classification head (`moescale.model.classifier.ClassifierLM`),
the option beside label-word scoring when fine-tuning on a classification task
(`moescale.evaluate.finetune`, head='classifier'): the loss falls on one position, the
context's last token, with the label's index as its target.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx



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
