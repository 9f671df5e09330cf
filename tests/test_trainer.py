"""The training loop on synthetic data: loss falls, resume equals an uninterrupted run, metrics
are written, gradient accumulation is exact, bad checkpoints fail clearly and lose nothing."""

import functools
import json
import os

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from moescale.data.synthetic import SyntheticData
from moescale.layers import DenseFFN, ProductKeyMemory, TopKMoE
from moescale.model import TransformerLM
from moescale.train import checkpoint, optim, trainer
from moescale.train import step as step_lib

MODEL = functools.partial(
    TransformerLM, vocab_size=32, d_model=32, num_layers=2, num_heads=4,
    ffn=functools.partial(DenseFFN, d_ff=64),
    sparse_ffn=functools.partial(TopKMoE, num_experts=4, expert_size=32, top_k=2,
                                 capacity_factor=1.0))
DATA = SyntheticData(vocab_size=32, length=16)


def _cfg(model_dir, steps, **kw):
  base = dict(model_dir=str(model_dir), train_steps=steps, batch_size=8, log_period=2,
              mesh=trainer.MeshConfig(data=2, expert=2, fsdp=2), tensorboard=False,
              progress=False,
              optimizer=optim.OptimizerConfig(learning_rate=1e-2, warmup_steps=2))
  base.update(kw)
  return trainer.TrainConfig(**base)


def _params(summary_or_state):
  state = getattr(summary_or_state, 'state', summary_or_state)
  return {'/'.join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(state.params)}


def test_loss_falls_and_metrics_are_logged(tmp_path):
  s = trainer.train(MODEL, DATA, _cfg(tmp_path, 12, eval_period=6, eval_before_training=True),
                    flops_per_token=1e5)
  records = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  train = [r for r in records if 'loss' in r]
  assert [r['step'] for r in train] == [2, 4, 6, 8, 10, 12]
  assert train[-1]['loss'] < train[0]['loss'] - 0.3
  for key in ('learning_rate', 'tokens_per_second', 'mfu', 'train_flops', 'grad_norm',
              'aux/load_balance', 'routing/layer_02/expert_usage',
              'routing/layer_02/fraction_dropped'):
    assert key in train[-1], key
  assert len(train[-1]['routing/layer_02/expert_usage']) == 4
  evals = [r for r in records if 'validation/eval_loss' in r]
  assert [r['step'] for r in evals] == [0, 6, 12]
  assert evals[-1]['validation/eval_loss'] < evals[0]['validation/eval_loss'] - 0.3
  assert evals[-1]['validation/perplexity'] == pytest.approx(
      np.exp(evals[-1]['validation/eval_loss']), rel=1e-6)
  assert s['final_step'] == 12
  # Nothing left to train: the run only evaluates the checkpoint (what TRAIN_STEPS=0 does to
  # a fresh model) and leaves the checkpoints as they were.
  again = trainer.train(MODEL, DATA, _cfg(tmp_path, 12, eval_before_training=True))
  assert again['start_step'] == again['final_step'] == 12 and 'loss' not in again
  assert again['validation/eval_loss'] == pytest.approx(evals[-1]['validation/eval_loss'],
                                                        rel=1e-5)
  records = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  assert [r['step'] for r in records if 'validation/eval_loss' in r] == [0, 6, 12, 12]


# Everything a restore must bring back besides parameters and optimizer moments: dropout and
# routing-noise RNG counters (router jitter, sampled second choices) and PKM's BatchNorm
# running statistics. A restore that rebuilt any of them fresh would replay step 1's masks
# and noise, or evaluate with the initial statistics.
NOISY = functools.partial(
    TransformerLM, vocab_size=32, d_model=32, num_layers=2, num_heads=4, dropout=0.1,
    attention_dropout=0.1,
    ffn=functools.partial(ProductKeyMemory, num_heads=2, num_keys=4, knn=2, k_dim=8),
    sparse_ffn=functools.partial(TopKMoE, num_experts=4, expert_size=32, top_k=2,
                                 capacity_factor=1.0, router_jitter=0.1,
                                 second_policy='sampling'))


def _numpy(x):
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  return np.asarray(x)


def _rest(state):
  """Every non-parameter Variable (RNG keys as their raw data) by path."""
  return {'/'.join(map(str, p)): _numpy(v[...]) for p, v in nnx.to_flat_state(state)}


def test_resume_equals_uninterrupted_with_dropout_noise_and_batch_statistics(tmp_path):
  """Kills: a restore that drops the RNG counters, the BatchNorm statistics, the optimizer
  state or the data position; a checkpoint of the wrong step."""
  cfg = lambda d, steps: _cfg(d, steps, log_period=1, mesh=trainer.MeshConfig(num_devices=1))
  straight = trainer.train(NOISY, DATA, cfg(tmp_path / 'a', 6))
  # First run stops at step 3 (as if preempted after its checkpoint), the second resumes.
  trainer.train(NOISY, DATA, cfg(tmp_path / 'b', 3))
  resumed = trainer.train(NOISY, DATA, cfg(tmp_path / 'b', 6))
  assert resumed['start_step'] == 3 and resumed['final_step'] == 6
  logged = {d: [json.loads(l) for l in open(tmp_path / d / 'metrics.jsonl')] for d in 'ab'}
  losses = {d: {r['step']: r['loss'] for r in logged[d] if 'loss' in r} for d in 'ab'}
  assert sorted(losses['b']) == [1, 2, 3, 4, 5, 6]
  assert losses['b'] == losses['a']                     # the same program on the same values
  assert resumed['validation/eval_loss'] == straight['validation/eval_loss']
  for got, want in ((_params(resumed), _params(straight)),
                    (_rest(resumed.state.rest), _rest(straight.state.rest))):
    assert got.keys() == want.keys()
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  # The state that must survive really moved: counters advanced, statistics left their init.
  fresh = _rest(nnx.state(NOISY(rngs=nnx.Rngs(0)), nnx.Not(nnx.Param)))
  trained = _rest(straight.state.rest)
  moved = [k for k in fresh if not np.array_equal(fresh[k], trained[k])]
  assert any('bn_mean' in k for k in moved) and any('count' in k for k in moved), moved


def test_corrupt_checkpoint_fails_clearly_and_deletes_nothing(tmp_path):
  trainer.train(MODEL, DATA, _cfg(tmp_path, 2))
  step_dir = tmp_path / 'checkpoints' / '2' / 'state'
  files = [p for p in step_dir.rglob('*') if p.is_file() and p.stat().st_size > 0]
  before = sorted(str(p) for p in (tmp_path / 'checkpoints').rglob('*'))
  for p in files:
    p.write_bytes(b'garbage')
  with pytest.raises(checkpoint.CheckpointError, match='step 2'):
    trainer.train(MODEL, DATA, _cfg(tmp_path, 4))
  assert sorted(str(p) for p in (tmp_path / 'checkpoints').rglob('*')) == before


@pytest.mark.parametrize('splits', [[(1, 1), (2, 1), (4, 1)], [(1, 2), (1, 4), (2, 2)]],
                         ids=['accumulated', 'parallel'])
def test_microbatches_equal_one_big_batch(splits):
  dense = functools.partial(TransformerLM, vocab_size=32, d_model=32, num_layers=1, num_heads=4,
                            ffn=functools.partial(DenseFFN, d_ff=64), sparse_ffn=None)
  batch = next(DATA.train_iterator(8))
  from moescale import sharding as shd
  mesh = shd.make_mesh(devices=jax.devices()[:1])
  out = []
  for accum, parallel in [(1, 1)] + splits:  # sequential (scan) and unrolled microbatches
    tx = optax.sgd(0.1)
    graphdef, state, _ = step_lib.create_train_state(dense, tx, 0, mesh)
    cfg = step_lib.StepConfig(grad_accum_steps=accum, parallel_microbatches=parallel)
    fn = jax.jit(step_lib.make_train_step(graphdef, tx, lambda s: 0.1, cfg))
    state, m = fn(state, {k: jax.numpy.asarray(v) for k, v in batch.items()})
    assert float(m['tokens']) == float(np.sum(batch['decoder_loss_weights']))
    out.append((float(m['loss']), _params(state)))
  for loss, params in out[1:]:
    assert loss == pytest.approx(out[0][0], rel=1e-5)
    for k in params:
      np.testing.assert_allclose(params[k], out[0][1][k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_microbatch_settings_are_checked():
  with pytest.raises(ValueError, match='parallel_microbatches=0'):
    step_lib.StepConfig(parallel_microbatches=0)
  with pytest.raises(ValueError,
                     match=r'batch_size=8 .*grad_accum_steps=2 x parallel_microbatches=3'):
    trainer.TrainConfig(model_dir='x', train_steps=1, batch_size=8,
                        step=step_lib.StepConfig(grad_accum_steps=2, parallel_microbatches=3))


def test_weight_decay_mask_and_group_learning_rates():
  _, params, _ = step_lib.abstract_model(MODEL, 0)
  mask = {'/'.join(map(str, p)): v.get_value()
          for p, v in nnx.to_flat_state(optim.decay_mask(params))}
  assert mask['embed'] and mask['groups/blocks/0/ffn/w_in']    # scanned: groups of 2 layers
  assert not any(v for k, v in mask.items() if 'norm' in k or 'bias' in k)
  cfg = optim.OptimizerConfig(learning_rate=1.0, decay='constant', clip_norm=None,
                              group_lr={r'blocks/1/ffn': 0.0})   # the sparse FFNs
  tx, _ = optim.make_optimizer(cfg, 10, params)
  real = nnx.state(MODEL(rngs=nnx.Rngs(0)), nnx.Param)
  grads = jax.tree.map(lambda x: np.ones_like(x), real)
  updates, _ = tx.update(grads, tx.init(real), real)
  flat = {'/'.join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(updates)}
  assert (np.all(flat['groups/blocks/1/ffn/w_in'] == 0)
          and np.any(flat['groups/blocks/0/ffn/w_in'] != 0))


def test_learning_rate_schedules():
  # Exact values against the closed forms, not just monotonicity: guards e.g. decaying over
  # total_steps instead of total - warmup, a dropped end_lr_fraction (alpha), the rsqrt offset,
  # or the warmup's end point. peak != 1 and end > 0 so a lost factor shows.
  peak, warm, total, frac = 2.0, 10, 110, 0.1
  end, span = peak * frac, total - warm
  closed = {
      'cosine': lambda s: end + (peak - end) / 2 * (1 + np.cos(np.pi * min(s, span) / span)),
      'linear': lambda s: peak + (end - peak) * min(s, span) / span,
      'rsqrt': lambda s: peak * np.sqrt(warm / (s + warm)),  # peak·sqrt(warm / step)
      'constant': lambda s: peak,
  }
  steps = [0, 1, 5, 9, 10, 11, 35, 60, 85, 109, 110, 150]
  for decay, after in closed.items():  # after(steps since the warmup ended)
    s = optim.learning_rate_schedule(optim.OptimizerConfig(
        learning_rate=peak, warmup_steps=warm, decay=decay, end_lr_fraction=frac), total)
    # Linear warmup from 0 to the peak at step `warm`, then the decay from there.
    want = [peak * t / warm if t < warm else after(t - warm) for t in steps]
    np.testing.assert_allclose([float(s(t)) for t in steps], want, rtol=1e-6, err_msg=decay)
  # No warmup: the decay starts at step 0 (rsqrt: peak / sqrt(step + 1), never infinite).
  for decay, want in (('cosine', closed['cosine']), ('linear', closed['linear']),
                      ('rsqrt', lambda t: peak / np.sqrt(t + 1))):
    s = optim.learning_rate_schedule(optim.OptimizerConfig(
        learning_rate=peak, decay=decay, end_lr_fraction=frac), span)
    np.testing.assert_allclose([float(s(t)) for t in (0, 3, 50, 99, 100, 120)],
                               [want(t) for t in (0, 3, 50, 99, 100, 120)], rtol=1e-6,
                               err_msg=decay)
  with pytest.raises(ValueError, match="decay='exp'"):
    optim.OptimizerConfig(decay='exp')


def test_bad_batch_for_mesh_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match='batch_size=6'):
    trainer.train(MODEL, DATA, _cfg(tmp_path, 1, batch_size=6))
  assert not os.path.exists(tmp_path / 'metrics.jsonl')


def test_dropout_trains_and_its_rng_stream_advances():
  """Regression: jax.grad over a merged model raised TraceContextError at the first dropout."""
  model = functools.partial(
      TransformerLM, vocab_size=32, d_model=32, num_layers=1, num_heads=4, dropout=0.1,
      attention_dropout=0.1, ffn=functools.partial(DenseFFN, d_ff=64, dropout=0.1),
      sparse_ffn=None)
  from moescale import sharding as shd
  mesh = shd.make_mesh(devices=jax.devices()[:1])
  tx = optax.sgd(0.0)  # no update: any change between steps comes from fresh dropout masks
  graphdef, state, _ = step_lib.create_train_state(model, tx, 0, mesh)
  fn = jax.jit(step_lib.make_train_step(graphdef, tx, lambda s: 0.0))
  batch = {k: jax.numpy.asarray(v) for k, v in next(DATA.train_iterator(4)).items()}
  state, m1 = fn(state, batch)
  state, m2 = fn(state, batch)
  assert np.isfinite(float(m1['loss'])) and float(m1['loss']) != float(m2['loss'])


def _dot_dtypes(fn, *args):
  """{output last dim: set of dtypes} of every dot_general in fn's jaxpr (nested ones too)."""
  found = {}

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == 'dot_general':
        aval = eqn.outvars[0].aval
        found.setdefault(aval.shape[-1], set()).add(str(aval.dtype))
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


def test_mixed_precision_bf16_compute_fp32_master_weights_and_routers(tmp_path):
  from moescale.layers import SigmaMoE
  # One model with both router kinds: σ-MoE (6 experts, 40 wide) in layer 1, top-2 MoE
  # (10 experts, 24 wide) in layer 2. Each matmul is told apart by its output width.
  model_fn = functools.partial(
      MODEL, ffn=functools.partial(SigmaMoE, num_experts=6, expert_size=40, top_k=2,
                                   num_layers=2),
      sparse_ffn=functools.partial(TopKMoE, num_experts=10, expert_size=24, top_k=2,
                                   capacity_factor=1.0))
  graphdef, params, rest = step_lib.abstract_model(
      functools.partial(model_fn, dtype=jax.numpy.bfloat16), 0)
  tokens = np.zeros((2, 16), np.int32)
  dots = _dot_dtypes(lambda p, r: nnx.merge(graphdef, p, r)(tokens).logits, params, rest)
  assert dots[6] == {'float32'} and dots[10] == {'float32'}, dots  # routers stay float32
  assert dots[40] == {'bfloat16'} and dots[24] == {'bfloat16'}, dots  # experts compute bf16
  # Training in bf16 keeps fp32 master weights and stays close to the fp32 run.
  runs = {}
  for dtype in ('float32', 'bfloat16'):
    fn = functools.partial(model_fn, dtype=getattr(jax.numpy, dtype))
    # One device: what is checked is the arithmetic, not the sharding (tested above).
    runs[dtype] = trainer.train(fn, DATA, _cfg(tmp_path / dtype, 4, eval_steps=1,
                                               mesh=trainer.MeshConfig(num_devices=1)))
  params16 = _params(runs['bfloat16'])
  assert all(v.dtype == np.float32 for v in params16.values())
  assert np.isfinite(runs['bfloat16']['loss'])
  assert abs(runs['bfloat16']['loss'] - runs['float32']['loss']) < 0.05
  assert abs(runs['bfloat16']['validation/eval_loss']
             - runs['float32']['validation/eval_loss']) < 0.05


def test_the_family_chooses_the_expert_exchange(tmp_path, monkeypatch):
  """The exchange is the MoE family's own setting (gin: TopKMoE.expert_exchange); the trainer
  only sets the mesh. Both exchanges train the same run when dropless."""
  from moescale.layers import expert_exchange
  calls = []
  real = expert_exchange.exchange_ffn
  monkeypatch.setattr(expert_exchange, 'exchange_ffn',
                      lambda *a, **k: calls.append(1) or real(*a, **k))
  with pytest.raises(ValueError, match=r"unknown expert exchange 'ring2'.*all_to_all"):
    TopKMoE(8, 4, 8, expert_exchange='ring2', rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='capacity_factor=1.0'):   # the ring never drops
    TopKMoE(8, 4, 8, exchange_capacity_factor=1.0, rngs=nnx.Rngs(0))
  runs, logged = {}, {}
  # Plain SGD: a gradient scaled on one path would show in the parameters (Adam hides it).
  sgd = optim.OptimizerConfig(name='sgd', learning_rate=0.5, decay='constant', clip_norm=None)
  for exchange in ('ring', 'all_to_all'):
    model = functools.partial(MODEL, sparse_ffn=functools.partial(
        MODEL.keywords['sparse_ffn'], expert_exchange=exchange))
    runs[exchange] = trainer.train(model, DATA, _cfg(
        tmp_path / exchange, 2, eval_steps=1, mesh=trainer.MeshConfig(data=2, expert=4),
        optimizer=sgd))
    logged[exchange] = [json.loads(l) for l in open(tmp_path / exchange / 'metrics.jsonl')]
  assert calls  # the all_to_all run really exchanged through the all-to-all path
  # Both exchanges are dropless here: the same training run, up to summation order.
  assert runs['all_to_all']['loss'] == pytest.approx(runs['ring']['loss'], rel=1e-5)
  for key in ('grad_norm', 'total_loss'):
    assert ([r[key] for r in logged['all_to_all'] if key in r]
            == pytest.approx([r[key] for r in logged['ring'] if key in r], rel=1e-5)), key
  ring, a2a = _params(runs['ring']), _params(runs['all_to_all'])
  assert ring.keys() == a2a.keys()
  for name in ring:
    np.testing.assert_allclose(ring[name], a2a[name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_mesh_config_num_devices_takes_the_first_devices_and_checks_the_count():
  mesh = trainer.MeshConfig(num_devices=2, expert=2).make()
  assert mesh.devices.size == 2 and dict(mesh.shape)['expert'] == 2
  assert list(mesh.devices.flat) == jax.devices()[:2]
  assert trainer.MeshConfig().make().devices.size == len(jax.devices())
  with pytest.raises(ValueError, match=r'num_devices=9 but only 8 devices.*1\.\.8 or None'):
    trainer.MeshConfig(num_devices=9).make()
  with pytest.raises(ValueError, match=r'num_devices=0 must be a positive int'):
    trainer.MeshConfig(num_devices=0)


def test_run_peak_counts_hosts_not_fake_cpu_devices(monkeypatch):
  from moescale.train import metrics as metrics_lib
  monkeypatch.setattr(metrics_lib, 'measure_peak_flops', lambda dtype='float32': 10.0)
  assert jax.device_count() == 8  # the suite's fake devices share this process's cores
  assert metrics_lib.run_peak_flops() == 10.0 * jax.process_count()
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert metrics_lib.run_peak_flops() == 80.0


class _NaNAt(SyntheticData):
  """Synthetic batches whose loss weights are NaN at the given (0-based) steps."""

  def __init__(self, bad_steps, **kw):
    super().__init__(**kw)
    self.bad_steps = set(bad_steps)

  def train_iterator(self, *args, **kw):
    inner = super().train_iterator(*args, **kw)
    data = self

    class It:
      step = 0

      def __next__(self):
        b = dict(next(inner))
        if self.step in data.bad_steps:
          b['decoder_loss_weights'] = np.full(b['decoder_loss_weights'].shape, np.nan,
                                              np.float32)
        self.step += 1
        return b

      def position(self):
        return inner.position()
    return It()


def test_a_non_finite_step_stops_the_run_naming_it_and_keeps_the_good_checkpoint(tmp_path):
  data = _NaNAt({4}, vocab_size=32, length=16)     # step 5 (1-based) goes NaN
  cfg = _cfg(tmp_path, 8, checkpoint_period=2)
  with pytest.raises(trainer.guard.NonFiniteError) as e:
    trainer.train(MODEL, data, cfg)
  msg = str(e.value)
  assert 'between step 4 and step 6' in msg and 'last good checkpoint is kept: step 4' in msg
  assert 'non-finite parameters: ' in msg and 'blocks' in msg
  assert sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir()) == [2, 4]
  logged = [json.loads(l)['step'] for l in open(tmp_path / 'metrics.jsonl')
            if 'loss' in json.loads(l)]
  assert logged == [2, 4]                           # the bad window is not logged as training


def test_skip_nonfinite_skips_the_bad_steps_and_counts_them(tmp_path):
  data = _NaNAt({2, 3}, vocab_size=32, length=16)
  opt = optim.OptimizerConfig(learning_rate=1e-2, warmup_steps=2, skip_nonfinite=3)
  summary = trainer.train(MODEL, data, _cfg(tmp_path, 6, optimizer=opt))
  records = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  skipped = {r['step']: r['skipped_steps'] for r in records if 'skipped_steps' in r}
  assert skipped == {2: 0, 4: 2, 6: 2}
  assert all(np.isfinite(v).all() for v in _params(summary).values())
  with pytest.raises(ValueError, match='skip_nonfinite=-1'):
    optim.OptimizerConfig(skip_nonfinite=-1)
