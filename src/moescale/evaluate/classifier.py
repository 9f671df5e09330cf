"""The data and the accuracy of a classification head (`moescale.model.classifier.ClassifierLM`),
the option beside label-word scoring when fine-tuning on a classification task
(`moescale.evaluate.finetune`, head='classifier'): the loss falls on one position, the
context's last token, with the label's index as its target.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

from moescale.evaluate import priming


def rows(vocab, contexts: Sequence[str], labels: Sequence[int], length: int):
  """[n, length] decoder features: the context (its newest `length - 1` tokens), the loss on
  its last position with the label's index as the target (appended as a last target token)."""
  sequences = [(list(vocab.encode(c))[-(length - 1):] or [0]) + [label]
               for c, label in zip(contexts, labels)]
  feats = priming.token_rows(sequences, [1] * len(sequences), length)
  # The head's logits cover the labels only: an unscored position's target (a context token
  # id) would be gathered out of range, as NaN, and NaN * weight 0 makes the logged loss NaN.
  feats['decoder_target_tokens'] = np.where(feats['decoder_loss_weights'] > 0,
                                            feats['decoder_target_tokens'], 0)
  return feats


def examples_rows(task, split: str, vocab, length: int):
  """`rows` of a classification task's split (the context of its first choice: a task's
  choices share the context), with the label indices."""
  examples = task.examples(split)
  labels = [e.label for e in examples]
  return rows(vocab, [e.choices[0].context for e in examples], labels, length), np.array(labels)


def _predictions(model, batch):
  out = model(batch['decoder_input_tokens'], segment_ids=batch['decoder_segment_ids'],
              positions=batch['decoder_positions'], deterministic=True)
  last = jnp.argmax(batch['decoder_loss_weights'], axis=1)
  return jnp.argmax(jnp.take_along_axis(out.logits, last[:, None, None], 1)[:, 0], -1)


def accuracy(run, task, max_examples: int | None = None, batch_size: int | None = None) -> dict:
  """The head's accuracy on the task's evaluation split: argmax of the head's logits at the
  context's last token against the label."""
  feats, labels = examples_rows(task, task.eval_split, run.vocabulary, run.sequence_length)
  n = len(labels) if max_examples is None else min(max_examples, len(labels))
  feats, labels = {k: v[:n] for k, v in feats.items()}, labels[:n]
  preds = priming.run_batches(run, _predictions, feats, batch_size or run.config.batch_size)
  return {'task': task.name, 'head': 'classifier', 'examples': n,
          'chance': 1 / len(task.labels), 'accuracy': float(np.mean(preds == labels))}
