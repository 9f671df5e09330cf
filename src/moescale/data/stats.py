"""Sizes: of a split (documents, UTF-8 bytes, tokens; counted once and cached) and of an epoch
of packed batches (rows, tokens, padding).

A split's bytes are the denominator of bits per byte (`SeqioDataSource.bytes_per_token`); its
tokens are what one epoch feeds the model, for logs and token budgets.
"""

from __future__ import annotations

from moescale.data import tasks as tasks_lib
from moescale.data import vocab as vocab_lib
from moescale.data._tf import tf
import seqio  # pylint: disable=g-bad-import-order  (after _tf: it configures TF)

_STATS: dict[tuple[str, str, str], dict[str, int]] = {}


def split_stats(mixture_or_task_name: str, split: str) -> dict[str, int]:
  """Documents, UTF-8 bytes and tokens of a split (one pass, cached).

  'tokens' counts what the model predicts in one epoch, EOS included (it is
  the sum of decoder_loss_weights over the epoch); 'bytes' is the size of the
  documents' text, the denominator of bits per byte. A mixture sums its tasks
  that have the split.
  """
  provider = tasks_lib.get_provider(mixture_or_task_name)
  if not isinstance(provider, seqio.Task):
    totals = {'documents': 0, 'bytes': 0, 'tokens': 0}
    for task in provider.tasks:
      if split in task.splits:
        for k, v in split_stats(task.name, split).items():
          totals[k] += v
    return totals
  config = tasks_lib._CONFIGS.get(provider.name, '')  # pylint: disable=protected-access
  key = (provider.name, split, config)
  if key in _STATS:
    return dict(_STATS[key])
  if not isinstance(provider.source, tasks_lib.DocumentSource):
    raise TypeError(f'split_stats: {provider.name!r} was not registered by '
                    'moescale.data (its source has no documents to count).')
  feature = provider.output_features['targets']
  documents = num_bytes = 0
  for doc in provider.source.documents(split):
    documents += 1
    num_bytes += len(doc)
  if vocab_lib.vocabulary_spec(feature.vocabulary) == vocab_lib.BYTES:
    tokens = num_bytes + (documents if feature.add_eos else 0)
  else:
    ds = provider.get_dataset(sequence_length=None, split=split, shuffle=False,
                              num_epochs=1, try_in_mem_cache=False)
    tokens = int(ds.reduce(tf.constant(0, tf.int64), lambda total, ex: (
        total + tf.cast(tf.size(ex['targets']), tf.int64))))
  _STATS[key] = {'documents': documents, 'bytes': num_bytes, 'tokens': tokens}
  return dict(_STATS[key])


def count_tokens(mixture_or_task_name: str, split: str) -> int:
  """Tokens of one epoch of a split (EOS included); see `split_stats`."""
  return split_stats(mixture_or_task_name, split)['tokens']


def epoch_stats(global_batches: tf.data.Dataset, batch_size: int,
                length: int) -> dict[str, float]:
  """Size of one epoch of global batches (`DataPipeline.global_dataset`): batches, rows,
  tokens, padding.

  'rows' are packed rows with text; 'tokens' non-padding target tokens;
  'fill' the share of target slots that are padding.
  """
  def count(totals, batch):
    weights = batch['decoder_loss_weights']
    return (totals[0] + 1,
            totals[1] + tf.reduce_sum(tf.cast(
                tf.reduce_any(weights > 0, axis=1), tf.int64)),
            totals[2] + tf.reduce_sum(tf.cast(weights, tf.int64)))
  zero = tf.constant(0, tf.int64)
  batches, rows, tokens = (int(x) for x in global_batches.reduce(
      (zero, zero, zero), count))
  slots = batches * batch_size * length
  return {'batches': batches, 'rows': rows, 'tokens': tokens,
          'fill': 1.0 - tokens / slots if slots else 0.0}
