"""Launching a run: the plain functions gin binds in runs/*.gin (usable from Python too).

    run_training(model=TransformerLM-constructor, data=seqio_data(...), config=TrainConfig(...))

It writes MODEL_DIR/config.gin (the gin config, when gin is in use) before training; a
MODEL_DIR whose checkpoints were trained under another config is refused, naming the bindings
that differ (allow_config_change continues it; the run's length, periods and mesh may change
on a resume); an earlier config.gin that differs is kept as
config.<n>.gin, never overwritten. It counts the model's FLOPs so the metrics carry
train_flops and MFU.
"""

from __future__ import annotations

import logging
import os
import re
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


def config_bindings(text: str) -> dict[str, str]:
  """{'Configurable.param' or 'MACRO': value} of an operative gin config (gin.config_str()):
  one binding per unindented 'name = value' line, continuation lines joined to it."""
  out, name = {}, None
  for line in text.splitlines():
    if not line.strip() or line.lstrip().startswith('#'):
      continue
    if not line[0].isspace() and ' = ' in line:
      name, value = line.split(' = ', 1)
      out[name.strip()] = value.strip()
    elif name is not None:
      out[name] += ' ' + line.strip()
  return out


# What a resume may change without becoming another experiment (as t5x allows): how long it
# runs and how often it logs, evaluates and saves, and the mesh it runs on. Matched against
# the binding's name ('TrainConfig.train_steps', 'TRAIN_STEPS', 'MeshConfig.data', ...).
RESUMABLE = re.compile(r'(train_steps|_period|eval_steps|eval_batch_size|keep_checkpoints|'
                       r'tensorboard|progress|eval_before_training|MeshConfig|NUM_DEVICES|'
                       r'_PARALLELISM)', re.IGNORECASE)


def experiment_changes(old: str, new: str) -> list[str]:
  """The bindings (names) two operative configs differ in, those a resume may change left
  out (`RESUMABLE`)."""
  a, b = config_bindings(old), config_bindings(new)
  return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and not RESUMABLE.search(k))


class ConfigChangeError(ValueError):
  """MODEL_DIR holds checkpoints of another configuration."""


def _refuse(old: str, new: str, changed: list[str], model_dir: str) -> None:
  a, b = config_bindings(old), config_bindings(new)
  shown = '; '.join(f'{k}: {a.get(k, "(unset)")} -> {b.get(k, "(unset)")}' for k in changed[:8])
  more = f' and {len(changed) - 8} more' if len(changed) > 8 else ''
  raise ConfigChangeError(
      f'{model_dir} holds checkpoints of another configuration; {len(changed)} binding(s) '
      f'differ: {shown}{more}. Resuming would continue that run with these changes. Use a new '
      'MODEL_DIR, or pass --allow_config_change (run_training.allow_config_change = True) to '
      'continue it anyway (its config.gin is kept as config.N.gin).')


def _write_gin_config(model_dir: str, allow_change: bool = False) -> None:
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
    # Without checkpoints nothing trained under the old config: it is set aside, not refused.
    changed = experiment_changes(old, text)
    if changed and not allow_change and _has_checkpoints(model_dir):
      _refuse(old, text, changed, model_dir)
    n = 1
    while os.path.exists(os.path.join(model_dir, f'config.{n}.gin')):
      n += 1
    os.rename(path, os.path.join(model_dir, f'config.{n}.gin'))
    log.info('config.gin changed since the last run; the previous one is config.%d.gin', n)
  with open(path, 'w') as f:
    f.write(text)


def _has_checkpoints(model_dir: str) -> bool:
  ckpts = os.path.join(model_dir, 'checkpoints')
  return os.path.isdir(ckpts) and any(n.isdigit() for n in os.listdir(ckpts))


def run_training(model: Callable = None, data: Any = None,
                 config: trainer.TrainConfig = None,
                 allow_config_change: bool = False) -> trainer.TrainSummary:
  """Writes MODEL_DIR/config.gin and trains. allow_config_change: resume a MODEL_DIR whose
  checkpoints were trained under another config (refused by default, naming the changes)."""
  if model is None or data is None or config is None:
    raise ValueError('run_training needs model, data and config (gin: run_training.model = '
                     '%MODEL, run_training.data = @seqio_data(), run_training.config = '
                     '@TrainConfig())')
  from moescale import accounting
  length = getattr(data, 'sequence_length', None) or 0
  flops = accounting.forward_flops_per_token(model, context_length=length) if length else None
  from moescale.train import guard
  trainer.check_mesh(model, config)       # a mesh that cannot run: refused, nothing written
  with guard.RunLock(config.model_dir):   # before config.gin: a refused run writes nothing
    _write_gin_config(config.model_dir, allow_config_change)
    return trainer.train(model, data, config, flops_per_token=flops)
