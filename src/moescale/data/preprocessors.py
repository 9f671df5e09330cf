"""The preprocessors of moescale's seqio tasks: tokens from text, chunks from tokens.

Both run on `tf.data` datasets of {'targets': ...} examples (imports TensorFlow).
"""

from __future__ import annotations

from typing import Mapping

from moescale.data._tf import tf
import seqio  # pylint: disable=g-bad-import-order  (after _tf: it configures TF)


def chunk_targets(dataset: tf.data.Dataset,
                  sequence_length: Mapping[str, int] | None = None
                  ) -> tf.data.Dataset:
  """Cuts 'targets' into consecutive chunks of at most the targets length.

  [t0 .. t9] with length 4 -> [t0..t3], [t4..t7], [t8, t9]. No token is
  dropped; without a sequence length the dataset is returned unchanged.
  """
  length = (sequence_length or {}).get('targets')
  if not length:
    return dataset

  def split(example):
    tokens = example['targets']
    n = tf.size(tokens)
    num_chunks = (n + length - 1) // length
    padded = tf.pad(tokens, [[0, num_chunks * length - n]])
    return {
        'targets': tf.reshape(padded, [num_chunks, length]),
        'length': tf.minimum(length, n - tf.range(num_chunks) * length),
    }

  return (dataset.map(split, num_parallel_calls=tf.data.AUTOTUNE).unbatch()
          .map(lambda x: {'targets': x['targets'][:x['length']]},
               num_parallel_calls=tf.data.AUTOTUNE))


def tokenize_lines(dataset: tf.data.Dataset,
                   output_features: Mapping[str, seqio.Feature]) -> tf.data.Dataset:
  """fairseq's text format: every line of a document is tokenized on its own and ends with EOS.

  fairseq-preprocess reads one sentence or paragraph per line and appends the end-of-sentence
  token to each, so a model trained that way never sees a newline: 'a\nb' becomes
  [a..., EOS, b..., EOS]. An empty line becomes a lone EOS. With the feature's add_eos the
  document then ends with one more EOS, where fairseq's blank line between documents puts it.
  """
  feature = output_features['targets']
  vocab, eos = feature.vocabulary, feature.vocabulary.eos_id
  if eos is None:
    raise ValueError(f"line_breaks='eos' needs a vocabulary with an EOS id; {vocab} has none")

  def one(example):
    lines = tf.strings.split(example['targets'], '\n')
    tokens = tf.map_fn(lambda s: tf.cast(vocab.encode_tf(s), tf.int32), lines,
                       fn_output_signature=tf.RaggedTensorSpec([None], tf.int32))
    ends = tf.fill([tf.shape(lines)[0], 1], tf.constant(eos, tf.int32))
    flat = tf.concat([tokens, ends], axis=1).flat_values
    if feature.add_eos:
      flat = tf.concat([flat, [eos]], axis=0)
    return {**example, 'targets': flat}

  return dataset.map(one, num_parallel_calls=tf.data.AUTOTUNE)
