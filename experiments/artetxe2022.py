"""Artetxe et al. (2022) as a Python study: dense 125M-13B and top-2 MoEs 15B-1.1T.

The models are the Python twins of gin/models/artetxe2022/*.gin (tests/test_study.py builds
both and compares them). By default the MoEs keep their dense twin's shape, as in the paper
(so they cost 1.19-1.30x the twin's training compute); `--match train_flops` instead shrinks
the experts until each MoE costs what its twin does.

    python experiments/artetxe2022.py --dry_run                  # write run dirs, print counts
    python experiments/artetxe2022.py --dry_run --match train_flops
    python experiments/artetxe2022.py --small --root runs/artetxe_small   # trains on a CPU

Paper-scale runs need data this project does not ship: the training mix as text files (one
paragraph per line, documents separated by a blank line, as fairseq-preprocess reads it) and
its vocabulary (the GPT-2 BPE of 50261 ids), given with --train_files, --validation_files and
--vocabulary: `register_pretraining_data` registers them as ARTETXE_TASK in fairseq's format
(every line ends with EOS; the model never sees a newline), or pass --task for a task of yours.

Training follows the authors' own runs (RUNS, docs/sources.md#artetxe-et-al-2022-training-
settings): each model's learning rate, batch, warmup, updates, weight decay and dropout as the
run directories of the released checkpoints name them, and what every run shares as their
fairseq sweep sets it: Adam (0.9, 0.98), eps 1e-8, no gradient clipping, linear warmup then
linear decay to 0 at the last update, weight decay on every parameter. gin/runs/artetxe2022.gin
is the same recipe for the gin model files.
"""

from __future__ import annotations

import argparse
import sys
from typing import NamedTuple

from moescale.study import jobs
from moescale.study import (REQUIRED, Component, DataSpec, Family, Matching, ModelSpec,
                            ScalingStudy, run_from_args)

VOCAB_SIZE = 50261          # unpadded: the V of their compute formula (see base.gin)
SEQ_LEN = 2048
TOKENS = 300e9               # training tokens: each run's updates are TOKENS // its batch
ARTETXE_TASK = 'artetxe2022_pretrain'

# name -> shape (docs/sources.md#artetxe-et-al-2022-model-table); 'moe' names the MoE that has
# this shape, whose experts have expert_size units (= d_ff: the shape twins). dropout (also the
# attention dropout) is that of the dense model and of its MoE twin alike: their run directories
# say 0.0 for 355M and 52B, 0.1 for every other model.
SIZES = {
    '125m': dict(num_layers=12, d_model=768, num_heads=12, d_ff=3072, expert_size=3072,
                 moe='15b', dropout=0.1),
    '355m': dict(num_layers=24, d_model=1024, num_heads=16, d_ff=4096, expert_size=4096,
                 moe='52b', dropout=0.0),
    '1.3b': dict(num_layers=24, d_model=2048, num_heads=32, d_ff=8192, expert_size=8192,
                 moe='207b', dropout=0.1),
    '2.7b': dict(num_layers=32, d_model=2560, num_heads=32, d_ff=10240, moe=None, dropout=0.1),
    '6.7b': dict(num_layers=32, d_model=4096, num_heads=32, d_ff=16384, expert_size=16384,
                 moe='1.1t', dropout=0.1),
    '13b': dict(num_layers=40, d_model=5120, num_heads=40, d_ff=20480, moe=None, dropout=0.1),
}


class Run(NamedTuple):
  """One model's training run: peak LR, warmup and total updates, tokens a batch, weight decay."""
  lr: float
  warmup: int
  steps: int
  batch_tokens: int
  weight_decay: float


# The authors' runs, per model (docs/sources.md#artetxe-et-al-2022-training-settings). Warmup
# is 375M tokens over the batch, rounded down, but some runs count 375e6 tokens and others
# 375 * 2**20: hence integers, not a formula. The MoEs do not always copy their dense twin
# (52B counts its warmup from 375e6 tokens, 207B has a lower LR, 2000 warmup updates and no
# weight decay),
# so every model has its own row.
RUNS = {
    '125m': Run(6e-4, 750, 572204, 2**19, 0.01),   # their sweep's 125M configuration
    '355m': Run(3e-4, 715, 572204, 2**19, 0.01),
    '1.3b': Run(2e-4, 357, 286102, 2**20, 0.01),
    '2.7b': Run(1.6e-4, 357, 286102, 2**20, 0.01),
    '6.7b': Run(1.2e-4, 187, 143051, 2**21, 0.01),
    '13b': Run(1e-4, 187, 143051, 2**21, 0.01),
    '15b': Run(6e-4, 750, 572204, 2**19, 0.01),
    '52b': Run(3e-4, 715, 572204, 2**19, 0.01),
    '207b': Run(1.6e-4, 2000, 286102, 2**20, 0.0),
    '1.1t': Run(1.2e-4, 187, 143051, 2**21, 0.01),   # the 2048-token retrain (moe_1.1T_2048ctx)
}

# CPU-sized twins of gin/models/small/artetxe_{dense,moe}.gin, on the embedded corpus, and
# their run: the recipe above at a scale a CPU trains in minutes (16 sequences of 128 tokens).
SMALL_SIZES = {
    'small': dict(num_layers=4, d_model=128, num_heads=4, d_ff=512, expert_size=512, moe='small',
                  num_experts=8, vocab_size=264, max_length=128, dropout=0.1),
}
SMALL_RUNS = {'small': Run(3e-3, 5, 30, 16 * 128, 0.01)}


def dense_model(size) -> ModelSpec:
  """gin/models/artetxe2022/base.gin + ffn/dense.gin at this size."""
  dropout = size['dropout']
  return ModelSpec(
      vocab_size=size.get('vocab_size', VOCAB_SIZE), d_model=size['d_model'],
      num_layers=size['num_layers'], num_heads=size['num_heads'],
      max_length=size.get('max_length', SEQ_LEN), positions='sinusoidal',
      scale_embeddings=True, tie_embeddings=True, use_bias=True, dropout=dropout,
      attention_dropout=dropout, dtype='float32', sparse_ffn=None, sparse_layers='none',
      # fairseq's activation_dropout (inside the FFN) is 0 in the GPT-3 recipes, as in the experts.
      ffn=Component('DenseFFN', d_ff=size['d_ff'], activation='gelu', use_bias=True,
                    dropout=0.0, dtype='float32'))


def moe_model(size) -> ModelSpec | None:
  """gin/models/artetxe2022/moe_base.gin at this size; None where the paper has no MoE."""
  if not size.get('moe'):
    return None
  cf = 1.0
  return dense_model(size).replace(
      sparse_layers='every_other',
      sparse_ffn=Component('TopKMoE', num_experts=size.get('num_experts', 512),
                           expert_size=size.get('expert_size', size['d_ff']), top_k=2,
                           capacity_factor=cf, eval_capacity_factor=cf, second_policy='all',
                           activation='gelu', use_bias=True, renormalize=True,
                           load_balance_weight=0.01, router_z_weight=0.0,
                           group_size='shard'))  # fairseq: each GPU's tokens are a group


def _run_settings(run: Run, seq_len: int, train_steps: int | None, log_period: int) -> dict:
  """TrainConfig kwargs of one run: its row of the table, and what all their runs share."""
  return dict(train_steps=train_steps or run.steps, batch_size=run.batch_tokens // seq_len,
              log_period=log_period,
              # fairseq's Adam decays every parameter, biases and LayerNorms included;
              # `--clip-norm 0.0` is no clipping; polynomial_decay (power 1, end LR 0) is linear.
              optimizer=dict(learning_rate=run.lr, warmup_steps=run.warmup, b1=0.9, b2=0.98,
                             eps=1e-8, weight_decay=run.weight_decay, weight_decay_params='all',
                             decay='linear', end_lr_fraction=0.0, clip_norm=None))


def make_study(match: str | None = None, small: bool = False, vocabulary=REQUIRED,
               task: str = ARTETXE_TASK, train_steps: int | None = None) -> ScalingStudy:
  """The paper's grid. match: None (shape twins) or a quantity the MoE's expert_size matches
  to its dense twin (e.g. 'train_flops'); small: the CPU-sized grid on the embedded corpus."""
  sizes, runs = (SMALL_SIZES, SMALL_RUNS) if small else (SIZES, RUNS)
  matching = Matching(match, reference='dense', convention='standard')

  def data(name, size):
    if small:
      return DataSpec('seqio', mixture_or_task_name='moescale_sotu',
                      task_feature_lengths={'targets': size['max_length']}, vocabulary='bytes')
    return DataSpec('seqio', mixture_or_task_name=task,
                    task_feature_lengths={'targets': SEQ_LEN}, vocabulary=vocabulary)

  def settings(run_name, size):
    return _run_settings(runs[run_name], size.get('max_length', SEQ_LEN), train_steps,
                         log_period=5 if small else 100)

  # The study's settings are the dense model's run; the MoE family puts its own run on top.
  families = (Family('dense', dense_model, knob='d_ff'),
              Family('moe', moe_model, knob='expert_size',
                     train=lambda name, size: settings(size['moe'], size)))
  name = 'artetxe2022' + ('_small' if small else '') + (f'_{match}' if match else '')
  return ScalingStudy(name, sizes, families, data=data, train=settings, matching=matching)


def register_pretraining_data(train_files, validation_files, vocabulary, name=ARTETXE_TASK):
  """The training mix as fairseq saw it: documents are runs of non-blank lines, and every line
  (a paragraph) ends with EOS instead of a newline. Imports seqio and TensorFlow.
  (docs/sources.md#artetxe-et-al-2022-data-and-evaluation)"""
  from moescale.data import tasks
  return tasks.register_text_task(name, train_files, validation_files, vocabulary,
                                  unit='paragraph', line_breaks='eos')


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--root', default='runs/artetxe2022', help='run directories go here')
  p.add_argument('--dry_run', action='store_true',
                 help='write the run directories and print counts; train nothing')
  p.add_argument('--match', default=None, choices=['train_flops', 'forward_flops',
                                                   'total_params', 'active_params'],
                 help="match each MoE's expert_size to its dense twin (default: shape twins)")
  p.add_argument('--small', action='store_true', help='the CPU-sized grid (trains in minutes)')
  p.add_argument('--only', nargs='*', default=None, help='size names to expand')
  p.add_argument('--vocabulary', default=None, help='vocabulary of the training task')
  p.add_argument('--task', default=ARTETXE_TASK, help='seqio task or mixture to train on')
  p.add_argument('--train_files', nargs='*', default=None,
                 help='text files of the training mix: registers --task in fairseq format')
  p.add_argument('--validation_files', nargs='*', default=None, help='its validation files')
  p.add_argument('--families', nargs='*', default=None, help='family names to keep')
  p.add_argument('--train_steps', type=int, default=None, help='override the step count')
  jobs.add_flags(p)
  args = p.parse_args(argv)
  if args.train_files:
    register_pretraining_data(args.train_files, args.validation_files, args.vocabulary,
                              name=args.task)
  study = make_study(args.match, args.small, args.vocabulary or REQUIRED, args.task,
                     args.train_steps)
  return run_from_args(study, args.root, args.only, args.families, args.dry_run,
                       convention='artetxe', **jobs.from_args(args))


if __name__ == '__main__':
  sys.exit(main())
