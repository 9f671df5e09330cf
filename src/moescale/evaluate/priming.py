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


def token_rows(sequences: Sequence[Sequence[int]], scored: Sequence[int], length: int):
  """[n, length] decoder features of token sequences (each at most `length`), each starting a
  new document (decoder input 0, then the sequence shifted right, as seqio's packing starts a
  segment); the loss weight on each sequence's last `scored[i]` tokens."""
  n = len(sequences)
  feats = {k: np.zeros((n, length), np.int32) for k in
           ('decoder_input_tokens', 'decoder_target_tokens', 'decoder_segment_ids',
            'decoder_positions')}
  feats['decoder_loss_weights'] = np.zeros((n, length), np.float32)
  for i, (full, k) in enumerate(zip(sequences, scored)):
    m = len(full)
    feats['decoder_target_tokens'][i, :m] = full
    feats['decoder_input_tokens'][i, 1:m] = full[:-1]
    feats['decoder_segment_ids'][i, :m] = 1
    feats['decoder_positions'][i, :m] = np.arange(m)
    feats['decoder_loss_weights'][i, m - k:m] = 1.0
  return feats


def rows(vocab, pairs: Sequence[tuple[str, str]], length: int):
  """[n, length] decoder features of (context, continuation) pairs, the loss weights on the
  continuation's tokens only (what is scored, and what fine-tuning learns), plus their token
  and byte counts and whether the context was cut."""
  sequences, tokens, nbytes, cut = [], [], [], []
  for context, continuation in pairs:
    ctx, cont = list(vocab.encode(context)), list(vocab.encode(continuation))
    if not cont or len(cont) > length:
      raise ValueError(f'continuation {continuation[:40]!r} has {len(cont)} tokens; it must '
                       f'have 1..{length} (the run\'s sequence length)')
    cut.append(len(ctx) + len(cont) > length)
    sequences.append((ctx + cont)[-length:])        # the oldest context goes first
    tokens.append(len(cont))
    nbytes.append(max(len(continuation.encode('utf-8')), 1))
  return (token_rows(sequences, tokens, length), np.array(tokens, float),
          np.array(nbytes, float), np.array(cut, bool))


def run_batches(run: Run, per_row, feats: dict[str, np.ndarray], batch_size: int,
                progress: str | None = None) -> np.ndarray:
  """per_row(model, batch) -> [rows] over `feats` in whole batches (padded with empty rows:
  one compiled shape), sharded on the run's mesh; [n] numpy, the padding dropped.

  Multi-process: every process holds all of `feats` and passes its own block of each batch
  (`sharding.host_rows`), so the global batch is the one a single process builds; the output
  is replicated, the same [n] on every process. batch_size must divide by the processes."""
  from flax import nnx
  graphdef, n = run.built.graphdef, len(feats['decoder_input_tokens'])
  own = shd.host_rows(run.mesh, batch_size)
  padded = -(-n // batch_size) * batch_size
  feats = {k: np.concatenate([v, np.zeros((padded - n,) + v.shape[1:], v.dtype)])
           for k, v in feats.items()}
  fn = jax.jit(lambda params, rest, batch: per_row(nnx.merge(graphdef, params, rest), batch),
               in_shardings=(run.built.state_sh.params, run.built.state_sh.rest,
                             shd.batch_sharding(run.mesh, 1)),
               out_shardings=NamedSharding(run.mesh, P()))
  out = []
  with shd.use_mesh(run.mesh, run.config.rules):
    starts = range(0, padded, batch_size)
    if progress:
      import tqdm
      starts = tqdm.tqdm(starts, desc=progress, unit='batch', leave=False)
    for lo in starts:
      rows = slice(lo + own.start, lo + own.stop)    # this process's block of the batch
      batch = shd.host_local_to_global({k: v[rows] for k, v in feats.items()}, run.mesh)
      out.append(np.asarray(fn(run.state.params, run.state.rest, batch)))
  return np.concatenate(out)[:n]


def _logprob_sums(model, batch):
  out = model(batch['decoder_input_tokens'], segment_ids=batch['decoder_segment_ids'],
              positions=batch['decoder_positions'], deterministic=True)
  logp = jax.nn.log_softmax(out.logits.astype(jnp.float32))
  picked = jnp.take_along_axis(logp, batch['decoder_target_tokens'][..., None], -1)[..., 0]
  return jnp.sum(picked * batch['decoder_loss_weights'], axis=1)


def score(run: Run, pairs: Sequence[tuple[str, str]], batch_size: int | None = None,
          progress: str | None = None) -> dict[str, np.ndarray]:
  """{'sum', 'per_token', 'per_byte'}: [len(pairs)] log-likelihood of each continuation given
  its context, and that per continuation token and per byte; 'truncated': [len(pairs)] bool,
  the prompts cut to the sequence length. progress: a label for a progress bar (None: none)."""
  batch_size = batch_size or run.config.eval_batch_size or run.config.batch_size
  feats, tokens, nbytes, cut = rows(run.vocabulary, pairs, run.sequence_length)
  total = run_batches(run, _logprob_sums, feats, batch_size, progress).astype(np.float64)
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
