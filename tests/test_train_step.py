"""The train step and the evaluation against plain references of the same parameters: the loss
a step reports and the gradient it applies are the objective of tests/plain_reference.py
(LM cross-entropy over real tokens only, the z-loss, every weighted auxiliary loss, per-batch
statistics averaged over microbatches), and eval loss, perplexity and bits per byte are the
hand-computed values over whole splits."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import plain_reference as ref
from moescale import sharding as shd
from moescale.layers import SigmaMoE, TopKMoE
from moescale.model import TransformerLM
from moescale.train import step as step_lib
from moescale.train import trainer

V, L = 32, 8
AUX_WEIGHTS = {'load_balance': 0.3, 'router_z': 0.02, 'entropy': 0.2}
Z_LOSS = 0.01
# Layer 1 a σ-MoE (entropy), layer 2 a top-2 MoE with a capacity (load_balance, router_z):
# every auxiliary loss of the families, and capacity per microbatch.
MODEL = functools.partial(
    TransformerLM, vocab_size=V, d_model=16, num_layers=2, num_heads=2,
    ffn=functools.partial(SigmaMoE, num_experts=4, expert_size=8, top_k=2, num_layers=2,
                          entropy_weight=AUX_WEIGHTS['entropy']),
    sparse_ffn=functools.partial(TopKMoE, num_experts=4, expert_size=8, top_k=2,
                                 capacity_factor=1.0,
                                 load_balance_weight=AUX_WEIGHTS['load_balance'],
                                 router_z_weight=AUX_WEIGHTS['router_z']))

# Packed rows with padding (segment 0) in three of them; loss weights are 0 exactly there.
SEGMENTS = np.array([[1, 1, 1, 2, 2, 2, 0, 0],
                     [1, 1, 1, 1, 1, 1, 1, 1],
                     [1, 1, 2, 2, 3, 3, 3, 0],
                     [1, 1, 1, 1, 0, 0, 0, 0]], np.int32)


def _positions(segments):
  pos = np.zeros_like(segments)
  for r, row in enumerate(segments):
    for t in range(1, len(row)):
      pos[r, t] = pos[r, t - 1] + 1 if row[t] == row[t - 1] else 0
  return pos


def _batch(seed=0, segments=SEGMENTS):
  rng = np.random.RandomState(seed)
  tokens = rng.randint(1, V, size=segments.shape + (2,)).astype(np.int32)
  real = segments != 0
  return {'decoder_input_tokens': np.where(real, tokens[..., 0], 0),
          'decoder_target_tokens': np.where(real, tokens[..., 1], 0),
          'decoder_loss_weights': real.astype(np.float32),
          'decoder_segment_ids': segments,
          'decoder_positions': _positions(segments)}


def _one_device_state(model_fn, tx):
  mesh = shd.make_mesh(devices=jax.devices()[:1])
  return step_lib.create_train_state(model_fn, tx, 0, mesh)[:2]


@pytest.mark.parametrize('accum,parallel', [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_step_applies_the_gradient_of_the_plain_objective(accum, parallel):
  """Kills: the aux losses dropped from (or double-counted in) the objective, their average
  over microbatches turned into a sum, the z-loss or the padding mask lost, the loss divided
  per microbatch instead of by the whole batch's weight, a gradient scaled."""
  tx = optax.sgd(1.0)                       # new params = params - gradient, exactly
  graphdef, state = _one_device_state(MODEL, tx)
  cfg = step_lib.StepConfig(z_loss=Z_LOSS, grad_accum_steps=accum, parallel_microbatches=parallel)
  step = jax.jit(step_lib.make_train_step(graphdef, tx, lambda s: 1.0, cfg))
  batch = {k: jnp.asarray(v) for k, v in _batch().items()}

  def objective(params):
    return ref.objective(graphdef, params, state.rest, batch, AUX_WEIGHTS, Z_LOSS, accum,
                         parallel)

  (total, parts), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(state.params)
  new, metrics = step(state, batch)

  # The aux losses and the z-loss move the gradient far beyond the tolerances below (else the
  # test could not see them go): compare with the objective without them.
  bare = jax.jit(jax.grad(lambda p: ref.objective(
      graphdef, p, state.rest, batch, dict.fromkeys(AUX_WEIGHTS, 0.0), 0.0, accum,
      parallel)[0]))(state.params)
  g, g_bare = ref.flat(grads), ref.flat(bare)
  for name in g:
    if name.endswith('w_router'):
      change = np.linalg.norm(g[name] - g_bare[name]) / np.linalg.norm(g[name])
      assert change > 0.05, (name, change)
  assert float(Z_LOSS * parts['z']) > 0.01 * float(total)
  np.testing.assert_allclose(metrics['total_loss'], total, rtol=1e-5)
  np.testing.assert_allclose(metrics['loss'], parts['xent'], rtol=1e-5)
  np.testing.assert_allclose(metrics['aux_loss'], parts['aux'], rtol=1e-5)
  for name in AUX_WEIGHTS:
    np.testing.assert_allclose(metrics[f'aux/{name}'], parts[f'aux/{name}'], rtol=1e-5)
  assert float(metrics['tokens']) == SEGMENTS.astype(bool).sum()
  flat_grads = ref.flat(grads)
  np.testing.assert_allclose(metrics['grad_norm'],
                             np.sqrt(sum(np.sum(g ** 2) for g in flat_grads.values())),
                             rtol=1e-5)
  before, after = ref.flat(state.params), ref.flat(new.params)
  for name, g in flat_grads.items():
    np.testing.assert_allclose(before[name] - after[name], g, rtol=2e-4, atol=2e-7,
                               err_msg=name)
  assert int(new.step) == 1


def test_whole_batch_entropy_pools_the_dropout_draws_of_the_gradient_pass():
  """With dropout and expert dropout, the pre-pass must draw what the gradient pass draws (it
  starts from the same RNG state): the entropy a split step reports is that of the statistics
  of exactly those forward passes. Kills: a pre-pass from the state the gradient pass leaves,
  or with fresh RNG streams."""
  noisy = functools.partial(
      TransformerLM, vocab_size=V, d_model=16, num_layers=2, num_heads=2, dropout=0.3,
      ffn=functools.partial(SigmaMoE, num_experts=4, expert_size=8, top_k=2, num_layers=2,
                            entropy_weight=0.5, expert_dropout=0.3))
  tx = optax.sgd(0.0)
  graphdef, state = _one_device_state(noisy, tx)
  cfg = step_lib.StepConfig(parallel_microbatches=2)
  batch = {k: jnp.asarray(v) for k, v in _batch().items()}
  _, metrics = jax.jit(step_lib.make_train_step(graphdef, tx, lambda s: 0.0, cfg))(state, batch)
  # Replay the two microbatches' forward passes from the step's starting RNG state.
  model = nnx.merge(graphdef, state.params, state.rest)
  pooled = None
  for rows in ref.microbatch_rows(4, 1, 2):
    mb = {k: v[rows] for k, v in batch.items()}
    out = model(mb['decoder_input_tokens'], segment_ids=mb['decoder_segment_ids'],
                positions=mb['decoder_positions'], deterministic=False)
    pooled = out.batch_stats if pooled is None else jax.tree.map(jnp.add, pooled,
                                                                 out.batch_stats)
  want = model.batch_losses(pooled)['entropy']
  np.testing.assert_allclose(metrics['aux/entropy'], want, rtol=1e-5)
  # ...which the dropout draws do move (else the test could not tell).
  clean = nnx.merge(graphdef, state.params, state.rest)(
      batch['decoder_input_tokens'], segment_ids=batch['decoder_segment_ids'],
      positions=batch['decoder_positions'], deterministic=True)
  assert abs(float(clean.aux_losses['entropy']) - float(want)) > 1e-4 * abs(float(want))


def test_reported_loss_ignores_padding_and_z_loss_enters_only_the_objective():
  """The logged `loss` is the LM cross-entropy of real tokens: the same batch with padding
  holding other tokens gives the same numbers; the z-loss moves `total_loss` only."""
  tx = optax.sgd(0.0)
  graphdef, state = _one_device_state(
      functools.partial(MODEL, sparse_ffn=None, ffn=MODEL.keywords['sparse_ffn']), tx)
  losses = {}
  for z in (0.0, 0.5):
    for fill in (0, 7):
      batch = _batch()
      pad = SEGMENTS == 0
      batch['decoder_input_tokens'] = np.where(pad, fill, batch['decoder_input_tokens'])
      batch['decoder_target_tokens'] = np.where(pad, fill, batch['decoder_target_tokens'])
      step = jax.jit(step_lib.make_train_step(graphdef, tx, lambda s: 0.0,
                                              step_lib.StepConfig(z_loss=z)))
      _, m = step(state, {k: jnp.asarray(v) for k, v in batch.items()})
      losses[z, fill] = (float(m['loss']), float(m['total_loss']) - float(m['aux_loss']))
  assert losses[0.0, 0] == pytest.approx(losses[0.0, 7], rel=1e-6)
  assert losses[0.5, 0] == pytest.approx(losses[0.5, 7], rel=1e-6)
  assert losses[0.5, 0][0] == pytest.approx(losses[0.0, 0][0], rel=1e-6)   # loss: no z-loss
  assert losses[0.0, 0][1] == pytest.approx(losses[0.0, 0][0], rel=1e-6)
  assert losses[0.5, 0][1] > losses[0.0, 0][1] + 0.1                         # total: z-loss


class _FixedEvalData:
  """Two eval splits of fixed batches; 'bytes' knows its bytes per token."""

  def __init__(self, batches):
    self.batches = batches

  def eval_iterators(self, batch_size, shard_id, num_shards):
    del batch_size, shard_id, num_shards
    return {name: iter(b) for name, b in self.batches.items()}

  def bytes_per_token(self, split):
    return 2.5 if split == 'bytes' else None


def test_evaluate_reports_whole_split_loss_perplexity_and_bits_by_hand():
  """Eval loss is Σ xent / Σ weights over every batch of the split (not a mean of batch
  means), padding excluded; perplexity = exp(loss); bits per token = loss / ln 2; bits per
  byte = bits per token / bytes per token; eval_steps caps the batches."""
  tx = optax.sgd(0.0)
  mesh = shd.make_mesh(devices=jax.devices()[:1])
  graphdef, state, state_sh = step_lib.create_train_state(MODEL, tx, 0, mesh)
  eval_fn = step_lib.jit_eval_step(step_lib.make_eval_step(graphdef), state_sh, mesh)
  # Batches with very different numbers of real tokens: a mean of batch means would differ.
  few = np.array([[1, 1, 0, 0, 0, 0, 0, 0]] * 4, np.int32)
  batches = {'plain': [_batch(1), _batch(2, few), _batch(3)],
             'bytes': [_batch(4, few), _batch(5)]}

  def by_hand(split, steps):
    xent = weight = 0.0
    for b in batches[split][:steps]:
      out = nnx.merge(graphdef, state.params, state.rest)(
          jnp.asarray(b['decoder_input_tokens']), segment_ids=jnp.asarray(
              b['decoder_segment_ids']), positions=jnp.asarray(b['decoder_positions']))
      x, _, w = ref.token_terms(out.logits, b['decoder_target_tokens'],
                                b['decoder_loss_weights'])
      xent, weight = xent + float(x), weight + float(w)
    return xent / weight

  for steps in (2, 0):  # 0: the whole split
    cfg = trainer.TrainConfig(model_dir='unused', train_steps=1, batch_size=4, eval_steps=steps)
    with jax.set_mesh(mesh):
      got = trainer.evaluate(eval_fn, state, _FixedEvalData(batches), cfg, mesh)
    for split in ('plain', 'bytes'):
      loss = by_hand(split, steps or None)
      assert got[f'{split}/eval_loss'] == pytest.approx(loss, rel=1e-5)
      assert got[f'{split}/perplexity'] == pytest.approx(math.exp(loss), rel=1e-5)
      assert got[f'{split}/bits_per_token'] == pytest.approx(loss / math.log(2), rel=1e-5)
    assert got['bytes/bits_per_byte'] == pytest.approx(
        by_hand('bytes', steps or None) / math.log(2) / 2.5, rel=1e-5)
    assert 'plain/bits_per_byte' not in got

