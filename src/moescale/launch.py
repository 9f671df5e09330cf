"""Launching a run: the plain functions gin binds in runs/*.gin (usable from Python too).

    run_training(model=TransformerLM-constructor, data=seqio_data(...), config=TrainConfig(...))

It writes MODEL_DIR/config.gin (the gin config, when gin is in use) before training, keeps any
earlier config.gin that differs as config.<n>.gin instead of overwriting it, and counts the
model's FLOPs so the metrics carry train_flops and MFU.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Mapping

from moescale.train import trainer

log = logging.getLogger(__name__)


def seqio_data(mixture_or_task_name: str, task_feature_lengths: Mapping[str, int],
               vocabulary: str = 'bytes', eval_splits: tuple[str, ...] | None = None,
               pack: bool = True, stream: bool = False):
  """The seqio data source for a registered task or mixture (imports seqio / TensorFlow).
  stream: contiguous per-row token streams for Transformer-XL memory (moescale.data.stream)."""
  from moescale.data import source
  return source.SeqioDataSource(mixture_or_task_name, dict(task_feature_lengths),
                                vocabulary=vocabulary, eval_splits=eval_splits, pack=pack,
                                stream=stream)


def synthetic_data(vocab_size: int = 64, length: int = 32, branching: int = 2):
  """Packed synthetic bigram text: runs with no data files (smoke tests, benchmarks)."""
  from moescale.data.synthetic import SyntheticData
  return SyntheticData(vocab_size=vocab_size, length=length, branching=branching)


def _write_gin_config(model_dir: str) -> None:
  try:
    import gin
  except ImportError:
    return
  text = gin.config_str()
  if not text.strip():
    return
  os.makedirs(model_dir, exist_ok=True)
  path = os.path.join(model_dir, 'config.gin')
  if os.path.exists(path):
    with open(path) as f:
      old = f.read()
    if old == text:
      return
    n = 1
    while os.path.exists(os.path.join(model_dir, f'config.{n}.gin')):
      n += 1
    os.rename(path, os.path.join(model_dir, f'config.{n}.gin'))
    log.info('config.gin changed since the last run; the previous one is config.%d.gin', n)
  with open(path, 'w') as f:
    f.write(text)


def run_training(model: Callable = None, data: Any = None,
                 config: trainer.TrainConfig = None) -> trainer.TrainSummary:
  if model is None or data is None or config is None:
    raise ValueError('run_training needs model, data and config (gin: run_training.model = '
                     '%MODEL, run_training.data = @seqio_data(), run_training.config = '
                     '@TrainConfig())')
  from moescale import accounting
  length = getattr(data, 'sequence_length', None) or 0
  flops = accounting.forward_flops_per_token(model, context_length=length) if length else None
  from moescale.train import guard
  with guard.RunLock(config.model_dir):   # before config.gin: a refused run writes nothing
    _write_gin_config(config.model_dir)
    return trainer.train(model, data, config, flops_per_token=flops)
