"""The one place that imports TensorFlow, configured to stay out of JAX's way.

Import this (not `tensorflow`) before `seqio`: it silences TF's C++ logging
(TF_CPP_MIN_LOG_LEVEL=3, unless the user set it; moescale.quiet holds the lines TF
prints while loading to it too) and hides every GPU from TF,
so TF neither initialises CUDA nor reserves accelerator memory that JAX needs.
The input pipeline runs on the host CPU only.
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

from moescale import quiet  # noqa: E402  pylint: disable=g-import-not-at-top

# The lines TF's native code prints while it loads, before it reads the level (moescale.quiet).
with quiet.native_stderr():
  import tensorflow as tf  # noqa: E402  pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # TF was already initialised by someone else: too late.
    pass


def dataset_options(num_threads: int | None = None) -> 'tf.data.Options':
  """tf.data options for input pipelines that share the host with JAX.

  Args:
    num_threads: size of a private thread pool for this pipeline (None: TF's
      shared pool, sized to the machine). Each op runs single-threaded
      (max_intra_op_parallelism=1), which is what TF recommends for input
      pipelines and keeps TF from oversubscribing the cores JAX computes on.
  """
  options = tf.data.Options()
  options.deterministic = True
  options.threading.max_intra_op_parallelism = 1
  if num_threads:
    options.threading.private_threadpool_size = num_threads
  return options
