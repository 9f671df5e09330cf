"""Fine-tuning a pretrained run on a task, with the options the MoE question needs.

As Artetxe et al. fine-tune their LMs (and as priming scores them), the model learns to
produce the correct choice's continuation (a label word) after the context: the loss falls on
the continuation's tokens only. The fine-tuned model is then scored on the task's evaluation
split like a zero-shot one, beside the pretrained model's zero- and few-shot scores.

    result = finetune(load_run('runs/tiny'), load_task('corpus_source'), 'runs/tiny_ft',
                      FinetuneConfig(steps=200, freeze_router=True))

`head='classifier'` instead trains a linear head on the last context token
(`moescale.model.classifier.ClassifierLM`, for classification tasks), the LM under it
starting from the pretrained weights.

MoE options: `freeze_router` (the routers keep their pretrained weights: learning rate 0),
`router_lr_scale` / `expert_lr_scale` (learning-rate multipliers for the routers and the
experts of the sparse layers), `expert_dropout`: the family's own expert dropout during
fine-tuning, `TopKMoE.expert_dropout` (dropout on the experts' hidden units, Switch
Transformer's 0.4 when fine-tuning) or `SigmaMoE.expert_dropout` (whole experts masked before
the top-k, Csordás et al.).
The new run directory gets its own config.gin (the pretrained one plus the fine-tuning
bindings, so `load_run` and `moescale eval` read it like any run) and checkpoints; the
pretrained run directory is only read.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re

import jax
import numpy as np
from flax import nnx

from moescale.evaluate import classifier, priming
from moescale.evaluate import run as run_lib
from moescale.train import optim, trainer


HEADS = ('label_words', 'classifier')


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  steps: int = 100
  batch_size: int = 16
  learning_rate: float = 1e-4
  warmup_steps: int = 0
  freeze_router: bool = False
  router_lr_scale: float = 1.0
  expert_lr_scale: float = 1.0
  expert_dropout: float | None = None
  seed: int = 0
  head: str = 'label_words'   # or 'classifier': a linear head on the last context token


  def __post_init__(self):
    if self.steps < 1 or self.batch_size < 1:
      raise ValueError(f'steps={self.steps} and batch_size={self.batch_size} must be >= 1')
    if self.head not in HEADS:
      raise ValueError(f'head={self.head!r}; valid: {HEADS}')
    if self.freeze_router and self.router_lr_scale != 1.0:
      raise ValueError('freeze_router sets the routers\' learning rate to 0; do not also give '
                       f'router_lr_scale={self.router_lr_scale}')


class ExampleData:
  """The trainer's data source over a task's training examples: each row is one example's
  context and correct continuation, the loss on the continuation; shuffled every epoch with
  the seed; the position (epoch, index) resumes exactly."""

  def __init__(self, task, vocabulary, length: int, seed: int = 0, head: str = 'label_words'):
    if head == 'classifier':
      self.rows = classifier.examples_rows(task, task.shots_split, vocabulary, length)[0]
    else:
      examples = task.examples(task.shots_split)
      pairs = [(e.choices[e.label].context, e.choices[e.label].continuation) for e in examples]
      self.rows = priming.rows(vocabulary, pairs, length)[0]
    self.seed, self.n = seed, len(self.rows['decoder_input_tokens'])

  def train_iterator(self, batch_size, shard_id=0, num_shards=1, seed=0, position=None):
    if self.n < batch_size * num_shards:
      raise ValueError(f'the task has {self.n} training examples, fewer than one batch of '
                       f'{batch_size * num_shards}: use a smaller batch size')
    return _ExampleIterator(self, batch_size, shard_id, num_shards, position)

  def eval_iterators(self, batch_size, shard_id=0, num_shards=1):
    return {}   # scored by `priming` afterwards, not by the LM loss


class _ExampleIterator:
  def __init__(self, data: ExampleData, batch_size, shard_id, num_shards, position):
    self._data, self._rows = data, slice(shard_id * batch_size, (shard_id + 1) * batch_size)
    self._global = batch_size * num_shards
    self._epoch, self._index = ((position['epoch'], position['index']) if position else (0, 0))

  def __iter__(self):
    return self

  def __next__(self):
    if self._index + self._global > self._data.n:      # the rest is less than a batch
      self._epoch, self._index = self._epoch + 1, 0
    order = np.random.default_rng([self._data.seed, self._epoch]).permutation(self._data.n)
    rows = order[self._index:self._index + self._global][self._rows]
    self._index += self._global
    return {k: v[rows] for k, v in self._data.rows.items()}

  def position(self):
    return {'epoch': self._epoch, 'index': self._index}


def _group_lr(run, cfg: FinetuneConfig) -> dict[str, float]:
  """Learning-rate multipliers by parameter path: the routers ('w_router'), then the other
  parameters of every sublayer that has a router (its experts). With a classification head the
  LM's parameters are under 'lm/'."""
  prefix = 'lm/' if cfg.head == 'classifier' else ''
  paths = [prefix + optim.path_str(p)
           for p, _ in jax.tree_util.tree_leaves_with_path(run.state.params)]
  routed = sorted({p[:p.index('w_router')] for p in paths if 'w_router' in p})
  router_scale = 0.0 if cfg.freeze_router else cfg.router_lr_scale
  out = {}
  if routed and router_scale != 1.0:
    out['w_router'] = router_scale
  if routed and cfg.expert_lr_scale != 1.0:
    out['^(' + '|'.join(re.escape(r) for r in routed) + ')(?!w_router)'] = cfg.expert_lr_scale
  if not routed and (cfg.freeze_router or router_scale != 1.0 or cfg.expert_lr_scale != 1.0):
    raise ValueError(f'{run.run_dir} has no routed (MoE) layer: the router and expert options '
                     'do not apply')
  return out


def _bindings(run, cfg: FinetuneConfig, out_dir: str, num_labels: int = 0) -> list[str]:
  """The gin bindings that turn the pretrained run's config into the fine-tuning run's."""
  b = [f'MODEL_DIR = {out_dir!r}', f'TrainConfig.model_dir = {out_dir!r}',
       f'TrainConfig.train_steps = {cfg.steps}', f'TrainConfig.batch_size = {cfg.batch_size}',
       f'TrainConfig.seed = {cfg.seed}', 'TrainConfig.checkpoint_period = 0',
       'TrainConfig.eval_period = 0', 'TrainConfig.eval_before_training = False',
       f'OptimizerConfig.learning_rate = {cfg.learning_rate}',
       f'OptimizerConfig.warmup_steps = {cfg.warmup_steps}', "OptimizerConfig.decay = 'linear'",
       'OptimizerConfig.weight_decay = 0.0', f'OptimizerConfig.group_lr = {_group_lr(run, cfg)}',
       'StepConfig.grad_accum_steps = 1', 'StepConfig.parallel_microbatches = 1']
  if run.built.memory is not None:   # independent examples: no Transformer-XL memory
    b.append('TransformerLM.mem_len = 0')
  if cfg.expert_dropout is not None:
    b += [f'{name}.expert_dropout = {cfg.expert_dropout}' for name in _dropout_families(run)]
  if cfg.head == 'classifier':
    b += ['ClassifierLM.lm = %MODEL', f'ClassifierLM.num_labels = {num_labels}',
          'run_training.model = @ClassifierLM']
  return b


def _dropout_families(run) -> list[str]:
  """The class names of the run's FFN families that have an expert dropout (gin binds them)."""
  return sorted({type(f).__name__ for _, f in run.model.ffn_layers()
                 if hasattr(f, 'expert_dropout')})


def _from_pretrained(pretrained, head: str, params, rest):
  """The fresh state with the pretrained one laid over it: the LM's parameters (under 'lm' for
  a ClassifierLM, whose head keeps its fresh initialisation), and the pretrained non-parameter
  state over the fresh one, key by key. Key by key because fine-tuning may add state the
  pretrained model never had: expert dropout gives a MoE layer its own random stream."""
  lm_params, lm_rest = pretrained
  if head == 'classifier':
    params['lm'] = lm_params
    if 'lm' in rest:
      rest['lm'] = nnx.State.merge(rest['lm'], lm_rest)
    return params, rest
  return lm_params, nnx.State.merge(rest, lm_rest)


def finetune(run: run_lib.Run, task, out_dir: str, cfg: FinetuneConfig = FinetuneConfig(), *,
             shots: int = 4, draws: int = 5, max_examples: int | None = None) -> dict:
  """Fine-tunes `run` on `task` into out_dir; returns (and writes to out_dir/finetune.json)
  the fine-tuned model's accuracy beside the pretrained model's zero- and `shots`-shot ones."""
  out_dir = os.path.abspath(out_dir)
  if out_dir == run.run_dir or out_dir.startswith(run.run_dir + os.sep):
    raise ValueError(f'--out {out_dir} is inside the pretrained run {run.run_dir}; fine-tuning '
                     'writes a new run directory and never touches the pretrained one')
  if os.path.exists(os.path.join(out_dir, 'config.gin')):
    raise ValueError(f'{out_dir} already holds a run; choose a new directory')
  if cfg.expert_dropout is not None and not _dropout_families(run):
    raise ValueError(f'expert_dropout={cfg.expert_dropout} needs a MoE layer (TopKMoE or '
                     'SigmaMoE); this model has none')
  if cfg.head == 'classifier' and not task.labels:
    raise ValueError(f'head=classifier needs a classification task (with labels); '
                     f'{task.name!r} is multiple choice: use head=label_words')
  bindings = _bindings(run, cfg, out_dir, len(task.labels or ()))
  model_fn, tcfg, _ = run_lib.parse_config(run.run_dir, bindings)
  data = ExampleData(task, run.vocabulary, run.sequence_length, cfg.seed, cfg.head)
  _write_config(run, task, out_dir, bindings)
  pretrained = functools.partial(_from_pretrained, (run.state.params, run.state.rest), cfg.head)
  summary = trainer.train(model_fn, data, tcfg, init_from=pretrained)
  tuned = run_lib.load_run(out_dir, mesh=run.mesh)
  result = {
      'task': task.name, 'pretrained_run': run.run_dir, 'pretrained_step': run.step,
      'config': dataclasses.asdict(cfg), 'final_loss': summary.loss,
      'pretrained': {'0shot': priming.prime(run, task, 0, max_examples=max_examples)},
      'finetuned': (classifier.accuracy(tuned, task, max_examples) if cfg.head == 'classifier'
                    else priming.prime(tuned, task, 0, max_examples=max_examples))}
  if shots:
    result['pretrained'][f'{shots}shot'] = priming.prime(
        run, task, shots, draws=draws, seed=cfg.seed, max_examples=max_examples)
  if run_lib.writes_files():
    with open(os.path.join(out_dir, 'finetune.json'), 'w') as f:
      json.dump(result, f, indent=1)
  run_lib.barrier(f'moescale.evaluate.finetune:{out_dir}:done')
  return result


def _write_config(run, task, out_dir: str, bindings) -> None:
  """out_dir/config.gin: the pretrained run's config and the fine-tuning bindings. Process 0
  writes it once every process has checked that out_dir holds no run (before it, a process
  would find process 0's new file and refuse), and every process goes on once it is there."""
  run_lib.barrier(f'moescale.evaluate.finetune:{out_dir}:checked')
  if run_lib.writes_files():
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(run.run_dir, 'config.gin')) as f:
      text = f.read()
    with open(os.path.join(out_dir, 'config.gin'), 'w') as f:
      f.write(text + f'\n# moescale finetune of {run.run_dir} (step {run.step}) on {task.name}\n'
              + '\n'.join(bindings) + '\n')
  run_lib.barrier(f'moescale.evaluate.finetune:{out_dir}:config')
