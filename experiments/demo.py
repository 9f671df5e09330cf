"""The study `make demo` runs: a small scaling study on the embedded corpus, end to end on a CPU.

Both papers' questions at a size two CPU cores train in minutes, on one decoder (pre-LN,
relative positions, ReLU FFNs, Csordás et al.'s initialisation, untied embeddings):

- dense models at four sizes (d_model 32, 64, 96, 128; 4 layers; d_ff = 4 d_model): the dense
  curve of perplexity against training compute;
- a top-2 MoE of 16 experts in every layer at the two smallest sizes, its expert_size solved so
  that it costs its dense twin's training FLOPs per token (Artetxe et al.'s question: how much
  less compute for the same perplexity?);
- a σ-MoE, a product-key memory and a Top-K activation model at d_model 96, each with the
  dense model's parameter count (Csordás et al.'s question: which approximation of the same
  MLP is best?).

Every matched pair passes the pair checker before anything trains. Each run is evaluated on
the in-domain SOTU validation split and the two out-of-domain collections (KJV, CPython docs;
at most EVAL_BATCHES batches each: the out-of-domain splits are large) and zero-shot on the
built-in `sotu_next_sentence` priming task (PRIMING_EXAMPLES examples); the report
(report.md, PNG plots) goes into the study directory's report/. README.md, "The demo",
says how the sizes, expert counts, learning rates and steps were chosen, with the numbers.

    python experiments/demo.py                     # the study, into runs/demo (see --root)
    python experiments/demo.py --dry_run           # write the runs, check the pairs, print counts
    python experiments/demo.py --quick --root DIR  # the same grid, tiny, in seconds (the test)

Run again, it continues the study in its directory (finished runs and evaluations are reused,
an interrupted run resumes from its last checkpoint); a directory holding a different grid is
left alone and the study goes to the next free DIR-2, DIR-3, ...
"""

from __future__ import annotations

import os

# TensorFlow (the data) logs nothing below errors, as under the `moescale` command. Set before
# JAX loads: set later (though before TF loads), TF's runtime lines still print (a failed
# cuInit on a machine without a GPU, a oneDNN note; measured with jax 0.10.2 and TF 2.21).
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

from moescale.layers.common import depth_scale
from moescale.study import (Component, DataSpec, Evaluation, Family, Matching, ModelSpec,
                            ScalingStudy, script)

VOCAB_SIZE = 264           # the byte vocabulary (259 ids) padded to a multiple of 8

# name -> size: what the builders read. moe: the compute-matched top-2 MoE is trained at this
# size; param_matched: the σ-MoE, PKM and Top-K activation are. The matched knobs (the MoE's
# expert_size, the σ-MoE's sigma_expert_size, the PKM's pkm_keys) start from `_start`'s values.
_COMMON = dict(num_layers=4, head_dim=32, sequence_length=64, moe_experts=16, sigma_experts=16,
               sigma_k=4, pkm_heads=4, pkm_knn=32, topk_k=64)
SIZES = {
    'd32': dict(_COMMON, d_model=32, d_ff=128, moe=True, param_matched=False),
    'd64': dict(_COMMON, d_model=64, d_ff=256, moe=True, param_matched=False),
    'd96': dict(_COMMON, d_model=96, d_ff=384, moe=False, param_matched=True),
    'd128': dict(_COMMON, d_model=128, d_ff=512, moe=False, param_matched=False),
}
# --quick: the same grid at sizes that compile and train in seconds (tests/test_demo.py).
_QUICK = dict(_COMMON, num_layers=1, head_dim=8, sequence_length=16, moe_experts=4,
              sigma_experts=4, sigma_k=2, pkm_heads=2, pkm_knn=4, topk_k=8)
QUICK_SIZES = {
    'd8': dict(_QUICK, d_model=8, d_ff=32, moe=True, param_matched=False),
    'd16': dict(_QUICK, d_model=16, d_ff=64, moe=True, param_matched=False),
    'd24': dict(_QUICK, d_model=24, d_ff=96, moe=False, param_matched=True),
    'd32': dict(_QUICK, d_model=32, d_ff=128, moe=False, param_matched=False),
}

# Training (README.md, "The demo": how these were chosen): the steps of every run, and each
# family's learning rate.
TRAIN_STEPS = 200
BATCH_SIZE = 16
LEARNING_RATES = {'dense': 3e-3, 'moe': 3e-3, 'sigma_moe': 3e-3, 'pkm': 3e-3,
                  'topk_activation': 3e-3}
CHECKPOINT_PERIOD = 50              # Ctrl-C or a kill loses at most this many steps of a run

# Evaluation: perplexity in-domain and out of domain, at most EVAL_BATCHES batches of 16 rows
# each (the KJV and CPython splits are large), and zero-shot priming.
DOMAINS = ('validation', 'moescale_kjv:validation', 'moescale_pydoc:validation')
EVAL_BATCHES = 20
PRIMING_TASK = 'sotu_next_sentence'
PRIMING_EXAMPLES = 300


def _base(size, **kw) -> ModelSpec:
  """The dense model at this size; kw replaces TransformerLM arguments (the sparse FFN)."""
  c = depth_scale(size['num_layers'])
  args = dict(
      vocab_size=VOCAB_SIZE, d_model=size['d_model'], num_layers=size['num_layers'],
      num_heads=size['d_model'] // size['head_dim'], head_dim=size['head_dim'],
      max_length=size['sequence_length'], positions='relative', scale_embeddings=False,
      tie_embeddings=False, embedding_init='csordas', output_bias=True, init_scale=c,
      use_bias=False, dropout=0.0, attention_dropout=0.0, dtype='float32', sparse_ffn=None,
      sparse_layers='none',
      ffn=Component('DenseFFN', d_ff=size['d_ff'], activation='relu', use_bias=True,
                    dropout=0.0, init_scale=c, dtype='float32'))
  args.update(kw)
  return ModelSpec(**args)


def dense(size) -> ModelSpec:
  return _base(size)


def moe(size) -> ModelSpec | None:
  if not size['moe']:
    return None
  return _base(size, sparse_layers='all', sparse_ffn=Component(
      'TopKMoE', num_experts=size['moe_experts'], expert_size=size['expert_size'], top_k=2,
      capacity_factor=0.0, eval_capacity_factor=0.0, second_policy='all', activation='relu',
      use_bias=False, load_balance_weight=0.01, router_z_weight=0.0,
      init_scale=depth_scale(size['num_layers'])))


def sigma_moe(size) -> ModelSpec | None:
  if not size['param_matched']:
    return None
  return _base(size, sparse_layers='all', sparse_ffn=Component(
      'SigmaMoE', num_experts=size['sigma_experts'], expert_size=size['sigma_expert_size'],
      top_k=size['sigma_k'], expert_dropout=0.0, entropy_weight=1e-3, selection='sigmoid',
      init='csordas', num_layers=size['num_layers'], activation='relu'))


def pkm(size) -> ModelSpec | None:
  if not size['param_matched']:
    return None
  return _base(size, sparse_layers='all', sparse_ffn=Component(
      'ProductKeyMemory', num_heads=size['pkm_heads'], num_keys=size['pkm_keys'],
      knn=size['pkm_knn'], score_fn='relu', query_proj=False, key_init='csordas',
      value_init='csordas', num_layers=size['num_layers']))


def topk_activation(size) -> ModelSpec | None:
  if not size['param_matched']:
    return None
  spec = _base(size)
  return spec.replace(ffn=spec['ffn'].replace(topk_activation=size['topk_k']))


def _lr(family: str) -> dict:
  return {'optimizer': {'learning_rate': LEARNING_RATES[family]}}


# The study matches each MoE's training FLOPs to the dense model of its size; the σ-MoE, PKM
# and Top-K activation match the dense model's parameters instead (their own rule).
PARAMS = Matching('total_params', reference='dense')
FAMILIES = (
    Family('dense', dense, knob='d_ff', train=_lr('dense')),
    Family('moe', moe, knob='expert_size', train=_lr('moe')),
    Family('sigma_moe', sigma_moe, knob='sigma_expert_size', train=_lr('sigma_moe'),
           matching=PARAMS),
    Family('pkm', pkm, knob='pkm_keys', train=_lr('pkm'), matching=PARAMS),
    Family('topk_activation', topk_activation, knob='d_ff', train=_lr('topk_activation'),
           matching=PARAMS),
)


def _start(size) -> dict:
  """Where the knobs' search starts: the MoE's experts half the dense d_ff (top-2), the σ-MoE's
  experts its share of d_ff, a PKM of about d_ff values."""
  return {**size, 'expert_size': size['d_ff'] // 2,
          'sigma_expert_size': size['d_ff'] // size['sigma_experts'],
          'pkm_keys': max(2, round(size['d_ff'] ** 0.5))}


def make_study(train_steps: int = TRAIN_STEPS, quick: bool = False, seeds=None, *,
               sizes=None, families=None, name: str = 'demo') -> ScalingStudy:
  """The demo's grid (quick: at QUICK_SIZES, 4-row batches; seeds: ScalingStudy.seeds).
  sizes, families, name: another grid of the same models (experiments/study.py)."""
  sizes = {k: _start(v) for k, v in (sizes or (QUICK_SIZES if quick else SIZES)).items()}
  length = next(iter(sizes.values()))['sequence_length']
  # One split evaluated while training (a few batches, for the loss curve): the study's
  # evaluation afterwards reads every domain.
  data = DataSpec('seqio', mixture_or_task_name='moescale_sotu',
                  task_feature_lengths={'targets': length}, vocabulary='bytes', stream=True,
                  eval_splits=('validation',))
  batch = 4 if quick else BATCH_SIZE
  # One device: models this small only lose by a split (the tests' 8 fake CPU devices share the
  # same cores).
  train = dict(train_steps=train_steps, batch_size=batch, log_period=min(10, train_steps),
               eval_steps=1 if quick else 4, checkpoint_period=CHECKPOINT_PERIOD,
               tensorboard=False, mesh=dict(num_devices=1),
               optimizer=dict(learning_rate=LEARNING_RATES['dense'],
                              warmup_steps=min(10, train_steps // 2), b1=0.9, b2=0.999,
                              weight_decay=0.0, decay='cosine', clip_norm=0.25))
  return ScalingStudy(name, sizes, families or FAMILIES, data=data, train=train,
                      matching=Matching('train_flops', reference='dense'), seeds=seeds)


def evaluation(quick: bool = False) -> Evaluation:
  """Every domain, and zero-shot priming with continuations of at most half a sequence (the
  context, cut from the left, fills the rest of it)."""
  length = next(iter((QUICK_SIZES if quick else SIZES).values()))['sequence_length']
  return Evaluation(tasks=DOMAINS, max_batches=1 if quick else EVAL_BATCHES,
                    priming={PRIMING_TASK: {'max_continuation_chars': length // 2}},
                    shots=(0,), max_examples=8 if quick else PRIMING_EXAMPLES)


def main(argv=None) -> int:
  return script.main(argv, make_study, evaluation, doc=__doc__, root='runs/demo',
                     steps=TRAIN_STEPS)


if __name__ == '__main__':
  script.exit(main())
