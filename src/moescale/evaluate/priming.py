"""Zero- and few-shot priming: multiple-choice scoring by the LM's log-likelihood.

For each example, every choice is scored by log P(continuation | context) under the model:
the sum over the continuation's tokens, and that sum per token and per UTF-8 byte (the
normalisations GPT-3 and fairseq's few-shot code use). The prediction is the best-scoring
choice. k-shot: the context is preceded by k demonstrations (correct examples of the task's
shots split), joined by the task's separator. As in Artetxe et al. (their model card: "the
average results across 25 runs, randomly sampling a different set of few-shot examples from
the training set each time"), one set of k shots is drawn per run with a seed and used for
every example; the accuracy is reported as the mean over the draws with its spread.

Every prompt is one sequence that starts a new document (decoder input 0, as seqio's packing
starts every segment); a prompt longer than the run's sequence length loses its oldest context
tokens first (the continuation is always scored whole). Transformer-XL models score each
prompt alone, without memory. An MoE with a capacity drops tokens depending on the other
prompts of its batch (as fairseq's evaluation does, with its eval capacity): for scores that
depend on nothing else, give it room (e.g. --gin.TopKMoE.eval_capacity_factor=8.0).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from moescale import sharding as shd
from moescale.evaluate.run import Run

NORMALISATIONS = ('sum', 'per_token', 'per_byte')


def rows(vocab, pairs: Sequence[tuple[str, str]], length: int):
  """[n, length] decoder features of (context, continuation) pairs, the loss weights on the
  continuation's tokens only (what is scored, and what fine-tuning learns), plus their token
  and byte counts."""
  n = len(pairs)
  feats = {k: np.zeros((n, length), np.int32) for k in
           ('decoder_input_tokens', 'decoder_target_tokens', 'decoder_segment_ids',
            'decoder_positions')}
  weights = np.zeros((n, length), np.float32)
  tokens, nbytes, cut = np.zeros(n), np.zeros(n), np.zeros(n, bool)
  for i, (context, continuation) in enumerate(pairs):
    ctx, cont = list(vocab.encode(context)), list(vocab.encode(continuation))
    if not cont or len(cont) > length:
      raise ValueError(f'continuation {continuation[:40]!r} has {len(cont)} tokens; it must '
                       f'have 1..{length} (the run\'s sequence length)')
    cut[i] = len(ctx) + len(cont) > length
    full = (ctx + cont)[-length:]           # the oldest context goes first
    m = len(full)
    feats['decoder_target_tokens'][i, :m] = full
    feats['decoder_input_tokens'][i, 1:m] = full[:-1]   # input 0 starts the document
    feats['decoder_segment_ids'][i, :m] = 1
    feats['decoder_positions'][i, :m] = np.arange(m)
    weights[i, m - len(cont):m] = 1.0
    tokens[i], nbytes[i] = len(cont), max(len(continuation.encode('utf-8')), 1)
  feats['decoder_loss_weights'] = weights
  return feats, tokens, nbytes, cut


def _scorer(run: Run):
  graphdef = run.built.graphdef
  batch_sh = shd.batch_sharding(run.mesh, 1)

  def logprob_sums(params, rest, batch):
    from flax import nnx
    model = nnx.merge(graphdef, params, rest)
    out = model(batch['decoder_input_tokens'], segment_ids=batch['decoder_segment_ids'],
                positions=batch['decoder_positions'], deterministic=True)
    logp = jax.nn.log_softmax(out.logits.astype(jnp.float32))
    picked = jnp.take_along_axis(logp, batch['decoder_target_tokens'][..., None], -1)[..., 0]
    return jnp.sum(picked * batch['decoder_loss_weights'], axis=1)

  return jax.jit(logprob_sums, in_shardings=(run.built.state_sh.params,
                                             run.built.state_sh.rest, batch_sh),
                 out_shardings=NamedSharding(run.mesh, P()))


def score(run: Run, pairs: Sequence[tuple[str, str]], batch_size: int | None = None,
          progress: str | None = None) -> dict[str, np.ndarray]:
  """{'sum', 'per_token', 'per_byte'}: [len(pairs)] log-likelihood of each continuation given
  its context, and that per continuation token and per byte; 'truncated': [len(pairs)] bool,
  the prompts cut to the sequence length. progress: a label for a progress bar (None: none)."""
  length = run.sequence_length
  batch_size = batch_size or run.config.eval_batch_size or run.config.batch_size
  fn = _scorer(run)
  feats, tokens, nbytes, cut = rows(run.vocabulary, pairs, length)
  n = len(pairs)
  padded = -(-n // batch_size) * batch_size   # whole batches: one compiled shape
  feats = {k: np.concatenate([v, np.zeros((padded - n, length), v.dtype)])
           for k, v in feats.items()}
  sums = []
  with shd.use_mesh(run.mesh, run.config.rules):
    starts = range(0, padded, batch_size)
    if progress:
      import tqdm
      starts = tqdm.tqdm(starts, desc=progress, unit='batch', leave=False)
    for lo in starts:
      batch = shd.host_local_to_global({k: v[lo:lo + batch_size] for k, v in feats.items()},
                                       run.mesh)
      sums.append(np.asarray(fn(run.state.params, run.state.rest, batch)))
  total = np.concatenate(sums)[:n].astype(np.float64)
  return {'sum': total, 'per_token': total / tokens, 'per_byte': total / nbytes,
          'truncated': cut}


def _prompts(examples, demos: str) -> list[tuple[str, str]]:
  return [(demos + c.context, c.continuation) for ex in examples for c in ex.choices]


def _accuracy(scores: dict[str, np.ndarray], examples) -> dict[str, float]:
  """Per normalisation, the fraction of examples whose best-scoring choice is the label
  (scores are flat over examples x choices, in order)."""
  out = {}
  for norm, values in scores.items():
    correct, start = 0, 0
    for i, ex in enumerate(examples):
      k = len(ex.choices)
      correct += int(np.argmax(values[start:start + k]) == ex.label)
      start += k
    out[norm] = correct / len(examples)
  return out


def prime(run: Run, task, shots: int = 0, draws: int | None = None, seed: int = 0,
          max_examples: int | None = None, batch_size: int | None = None,
          progress: bool = False) -> dict:
  """Accuracy of the run on a multiple-choice task (moescale.evaluate.tasks.Task), k-shot,
  over `draws` draws of the shots (default 1 zero-shot, 25 few-shot).

  Returns {'task', 'shots', 'draws', 'examples', 'chance', 'accuracy': {normalisation:
  {'mean', 'std', 'min', 'max', 'per_draw'}}, 'truncated'} (std over draws, ddof=1; 0 for
  one draw; truncated: the fraction of prompts cut to the sequence length)."""
  examples = list(task.examples(task.eval_split))[:max_examples]
  if not examples:
    raise ValueError(f'task {task.name!r} has no examples in {task.eval_split!r}')
  pool = list(task.examples(task.shots_split)) if shots else []
  if shots > len(pool):
    raise ValueError(f'{shots} shots asked, but the {task.shots_split!r} split of '
                     f'{task.name!r} has {len(pool)} examples')
  if shots < 0:
    raise ValueError(f'shots={shots} must be >= 0')
  draws = draws or (25 if shots else 1)
  per_draw = {norm: [] for norm in NORMALISATIONS}
  truncated = []
  for d in range(draws if shots else 1):
    rng = np.random.default_rng([seed, d])
    chosen = [pool[j] for j in rng.choice(len(pool), shots, replace=False)] if shots else []
    demos = ''.join(ex.demonstration + task.separator for ex in chosen)
    label = f'{task.name} {shots}-shot, draw {d + 1}' if progress else None
    scores = score(run, _prompts(examples, demos), batch_size, progress=label)
    truncated.append(float(scores.pop('truncated').mean()))
    acc = _accuracy(scores, examples)
    for norm in NORMALISATIONS:
      per_draw[norm].append(acc[norm])
  summary = {norm: {'mean': float(np.mean(v)), 'std': float(np.std(v, ddof=1)) if len(v) > 1
                    else 0.0, 'min': float(np.min(v)), 'max': float(np.max(v)),
                    'per_draw': [float(x) for x in v]} for norm, v in per_draw.items()}
  chance = float(np.mean([1 / len(ex.choices) for ex in examples]))
  # Prompts longer than the run's sequence length lose their oldest tokens (shots first):
  # a large fraction means the k shots did not fit, and k-shot is not what was measured.
  return {'task': task.name, 'shots': shots, 'draws': len(per_draw['sum']),
          'examples': len(examples), 'chance': chance, 'accuracy': summary,
          'truncated': float(np.mean(truncated))}
