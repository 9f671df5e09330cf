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
(every line ends with EOS; the model never sees a newline), or pass --task for a task of yours. Batch sizes and learning rates are GPT-3's per-size values (Brown et al. 2020,
Table 2.1: batches of 0.5M-2M tokens, learning rates 6e-4 to 1e-4); they were not checked
against Artetxe et al.'s paper or fairseq (docs/sources.md#artetxe-et-al-2022-training-settings):
verify them before a real run.
"""

from __future__ import annotations

import argparse
import math
import sys

from moescale.study import (REQUIRED, Component, DataSpec, Family, Matching, ModelSpec,
                            ScalingStudy, run_from_args)

VOCAB_SIZE = 50261          # unpadded: the V of their compute formula (see base.gin)
SEQ_LEN = 2048
TOKENS = 300e9
ARTETXE_TASK = 'artetxe2022_pretrain'

# name -> shape (docs/sources.md#artetxe-et-al-2022-model-table); 'moe' names the MoE that has
# this shape, whose experts have expert_size units (= d_ff: the shape twins).
SIZES = {
    '125m': dict(num_layers=12, d_model=768, num_heads=12, d_ff=3072, expert_size=3072,
                 moe='15b', batch_tokens=2**19, lr=6e-4),
    '355m': dict(num_layers=24, d_model=1024, num_heads=16, d_ff=4096, expert_size=4096,
                 moe='52b', batch_tokens=2**19, lr=3e-4),
    '1.3b': dict(num_layers=24, d_model=2048, num_heads=32, d_ff=8192, expert_size=8192,
                 moe='207b', batch_tokens=2**20, lr=2e-4),
    '2.7b': dict(num_layers=32, d_model=2560, num_heads=32, d_ff=10240, moe=None,
                 batch_tokens=2**20, lr=1.6e-4),
    '6.7b': dict(num_layers=32, d_model=4096, num_heads=32, d_ff=16384, expert_size=16384,
                 moe='1.1t', batch_tokens=2**21, lr=1.2e-4),
    '13b': dict(num_layers=40, d_model=5120, num_heads=40, d_ff=20480, moe=None,
                batch_tokens=2**21, lr=1e-4),
}

# CPU-sized twins of gin/models/small/artetxe_{dense,moe}.gin, on the embedded corpus.
SMALL_SIZES = {
    'small': dict(num_layers=4, d_model=128, num_heads=4, d_ff=512, expert_size=512, moe='small',
                  num_experts=8, vocab_size=264, max_length=128),
}


def dense_model(size) -> ModelSpec:
  """gin/models/artetxe2022/base.gin + ffn/dense.gin at this size."""
  dropout = 0.1
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


FAMILIES = (Family('dense', dense_model, knob='d_ff'),
            Family('moe', moe_model, knob='expert_size'))


def make_study(match: str | None = None, small: bool = False, vocabulary=REQUIRED,
               task: str = ARTETXE_TASK, train_steps: int | None = None) -> ScalingStudy:
  """The paper's grid. match: None (shape twins) or a quantity the MoE's expert_size matches
  to its dense twin (e.g. 'train_flops'); small: the CPU-sized grid on the embedded corpus."""
  sizes = SMALL_SIZES if small else SIZES
  matching = Matching(match, reference='dense', convention='standard')

  def data(name, size):
    if small:
      return DataSpec('seqio', mixture_or_task_name='moescale_sotu',
                      task_feature_lengths={'targets': size['max_length']}, vocabulary='bytes')
    return DataSpec('seqio', mixture_or_task_name=task,
                    task_feature_lengths={'targets': SEQ_LEN}, vocabulary=vocabulary)

  def train(name, size):
    if small:
      return dict(train_steps=train_steps or 30, batch_size=16, log_period=5, eval_steps=4,
                  optimizer=dict(learning_rate=3e-3, warmup_steps=5, b1=0.9, b2=0.98,
                                 weight_decay=0.01, decay='linear'))
    batch = size['batch_tokens'] // SEQ_LEN          # 256, 512 or 1024 sequences
    steps = train_steps or math.ceil(TOKENS / (batch * SEQ_LEN))
    warmup = math.ceil(375e6 / (batch * SEQ_LEN))   # 375M tokens of warmup (GPT-3)
    return dict(train_steps=steps, batch_size=batch, log_period=100,
                optimizer=dict(learning_rate=size['lr'], warmup_steps=warmup, b1=0.9,
                               b2=0.98, weight_decay=0.01, decay='linear', clip_norm=1.0))

  name = 'artetxe2022' + ('_small' if small else '') + (f'_{match}' if match else '')
  return ScalingStudy(name, sizes, FAMILIES, data=data, train=train, matching=matching)


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
  args = p.parse_args(argv)
  if args.train_files:
    register_pretraining_data(args.train_files, args.validation_files, args.vocabulary,
                              name=args.task)
  study = make_study(args.match, args.small, args.vocabulary or REQUIRED, args.task,
                     args.train_steps)
  return run_from_args(study, args.root, args.only, args.families, args.dry_run,
                       convention='artetxe')


if __name__ == '__main__':
  sys.exit(main())
