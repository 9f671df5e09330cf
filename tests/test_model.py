import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import test_util

from moescale.layers import DenseFFN, common
from moescale.model import TransformerLM, sparse_layer_numbers

V, D, H = 32, 16, 2
DENSE = functools.partial(DenseFFN, d_ff=32, activation='gelu', use_bias=True)


def _model(positions='sinusoidal', num_layers=2, seed=0, **kw):
  kw.setdefault('ffn', DENSE)
  # Looped unless a test says otherwise: these tests read single blocks and call the model
  # eagerly (an eager call of a scanned model compiles its scan each time). The scanned
  # default is checked against the loop below.
  kw.setdefault('scan_layers', False)
  return TransformerLM(V, D, num_layers, H, positions=positions, max_length=32,
                       rngs=nnx.Rngs(seed), **kw)


def _abstract(**kw):
  """The model's structure without computing any initial values (fast)."""
  return nnx.eval_shape(lambda: _model(**kw))


def _tokens(shape=(2, 8), seed=0):
  return jax.random.randint(jax.random.key(seed), shape, 1, V)


class GatedFFN(nnx.Module):
  """A second dense-like family (GLU), written here to show the model needs nothing else."""

  def __init__(self, d_model, d_ff, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs):
    del dtype, param_dtype  # a minimal family may ignore the model's precision
    self.w_gate = common.param(rngs, common.fan_in_normal(d_model), (d_model, d_ff),
                               ('embed', 'mlp'))
    self.w_in = common.param(rngs, common.fan_in_normal(d_model), (d_model, d_ff),
                             ('embed', 'mlp'))
    self.w_out = common.param(rngs, common.fan_in_normal(d_ff), (d_ff, d_model),
                              ('mlp', 'embed'))

  def __call__(self, x, *, deterministic=True, segment_ids=None):
    y = (jax.nn.silu(x @ self.w_gate[...]) * (x @ self.w_in[...])) @ self.w_out[...]
    return y, common.no_aux()


class RecordingFFN(nnx.Module):
  """Fake sparse family: weighted losses that depend on its parameter and input."""

  def __init__(self, d_model, value, weights, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs):
    self.value, self.lb_weight, self.entropy_weight = value, *weights
    self.w = nnx.Param(jnp.full((d_model,), value))

  def __call__(self, x, *, deterministic=True, segment_ids=None):
    w = self.w[...]
    losses = {'load_balance': jnp.sum(w ** 2) + 0.0 * jnp.sum(x),
              'entropy': jnp.float32(-self.value)}
    weighted = {'load_balance': self.lb_weight * losses['load_balance'],
                'entropy': self.entropy_weight * losses['entropy']}
    metrics = {**losses, 'expert_usage': jnp.full((3,), self.value) + 0.0 * jnp.sum(x)}
    return x * w, common.Aux(weighted, metrics)


# --- Causality and packing -------------------------------------------------------------------

@pytest.mark.parametrize('positions', ['sinusoidal', 'learned', 'rotary', 'relative'])
def test_logits_at_t_ignore_later_tokens(positions):
  model = _model(positions)
  a = _tokens((1, 8))
  b = a.at[:, 5:].set((a[:, 5:] + 7) % V)
  la, lb = model(a).logits, model(b).logits
  np.testing.assert_allclose(la[:, :5], lb[:, :5], rtol=1e-5, atol=1e-5)
  assert not np.allclose(la[:, 5:], lb[:, 5:], atol=1e-3)


@pytest.mark.parametrize('positions', ['sinusoidal', 'learned', 'rotary', 'relative'])
def test_packed_segments_are_independent(positions):
  model = _model(positions)
  a, b = _tokens((1, 5), 1), _tokens((1, 2), 2)
  packed = jnp.concatenate([a, b, jnp.zeros((1, 1), jnp.int32)], axis=1)
  seg = jnp.array([[1, 1, 1, 1, 1, 2, 2, 0]])
  pos = jnp.array([[0, 1, 2, 3, 4, 0, 1, 0]])
  out = model(packed, segment_ids=seg, positions=pos).logits
  np.testing.assert_allclose(out[:, :5], model(a).logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out[:, 5:7], model(b).logits, rtol=1e-5, atol=1e-5)
  # Positions derived from segment_ids alone give the same answer.
  np.testing.assert_allclose(model(packed, segment_ids=seg).logits, out, rtol=1e-6, atol=1e-6)


# --- FFN families and layer placement --------------------------------------------------------

def test_swapping_ffn_family_is_only_a_constructor_argument():
  dense = _model(ffn=DENSE)
  gated = _model(ffn=functools.partial(GatedFFN, d_ff=24))
  assert all(isinstance(f, DenseFFN) for _, f in dense.ffn_layers())
  assert all(isinstance(f, GatedFFN) for _, f in gated.ffn_layers())
  tokens = _tokens()
  assert dense(tokens).logits.shape == gated(tokens).logits.shape == (2, 8, V)
  # Outside the FFN sublayers the parameter trees are identical.
  strip = lambda m: {p for p, _ in nnx.to_flat_state(nnx.state(m, nnx.Param)) if 'ffn' not in p}
  assert strip(dense) == strip(gated)


WEIGHTS = {'load_balance': 0.5, 'router_z': 0.25, 'entropy': 0.125}


def _moe_families():
  # (module, class, kwargs, the weighted losses it returns, the metrics it returns)
  specs = [
      # The plain reference dispatch: this test is about plugging in, not about backends.
      ('moescale.layers.topk_moe', 'TopKMoE',
       dict(num_experts=4, expert_size=8, top_k=2, dispatch='reference',
            load_balance_weight=WEIGHTS['load_balance'], router_z_weight=WEIGHTS['router_z']),
       {'load_balance', 'router_z'},
       {'load_balance', 'router_z', 'expert_usage', 'fraction_dropped', 'router_entropy'}),
      ('moescale.layers.sigma_moe', 'SigmaMoE',
       dict(num_experts=4, expert_size=8, top_k=2, dispatch='reference',
            entropy_weight=WEIGHTS['entropy']),
       {'entropy'}, {'entropy', 'expert_usage', 'router_entropy'}),
      ('moescale.layers.pkm', 'ProductKeyMemory', dict(num_heads=2, num_keys=4, knn=4),
       set(), {'value_usage'}),
  ]
  return [pytest.param(*spec, id=spec[1]) for spec in specs]


@pytest.mark.parametrize('module,name,kw,losses,metrics', _moe_families())
def test_moe_families_plug_in_every_other_layer(module, name, kw, losses, metrics):
  family = getattr(importlib.import_module(module), name)
  model = _model(sparse_ffn=functools.partial(family, **kw))
  assert [type(f).__name__ for _, f in model.ffn_layers()] == ['DenseFFN', name]
  tokens = _tokens()
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, tokens):
    return nnx.merge(graphdef, state)(tokens, deterministic=False)

  out = forward(state, tokens)
  assert out.logits.shape == (2, 8, V)
  assert np.all(np.isfinite(out.logits))
  # Exactly the family's records, from layer 2 only, each weighted into aux_loss once.
  assert set(out.aux_losses) == losses
  assert set(out.metrics) == {f'layer_02/{m}' for m in metrics}
  for name in losses:
    assert float(out.aux_losses[name]) == pytest.approx(
        WEIGHTS[name] * float(out.metrics[f'layer_02/{name}']), rel=1e-6)
    assert float(out.aux_losses[name]) != 0.0
  assert float(out.aux_loss) == pytest.approx(sum(map(float, out.aux_losses.values())),
                                              rel=1e-6)


def test_every_other_puts_sparse_ffn_on_even_layers():
  assert sparse_layer_numbers('every_other', 6) == (2, 4, 6)
  assert sparse_layer_numbers('every_other', 5) == (2, 4)
  assert sparse_layer_numbers('all', 3) == (1, 2, 3)
  assert sparse_layer_numbers('none', 3) == ()
  assert sparse_layer_numbers([3, 1], 3) == (1, 3)
  sparse = functools.partial(GatedFFN, d_ff=8)
  for scan in (False, True):
    model = _abstract(num_layers=4, sparse_ffn=sparse, scan_layers=scan)
    kinds = [(n, type(f).__name__) for n, f in model.ffn_layers()]
    assert kinds == [(1, 'DenseFFN'), (2, 'GatedFFN'), (3, 'DenseFFN'), (4, 'GatedFFN')]
  model = _abstract(num_layers=3, sparse_ffn=sparse, sparse_layers=[3])
  assert [type(f).__name__ for _, f in model.ffn_layers()] == ['DenseFFN', 'DenseFFN',
                                                               'GatedFFN']
  # The FFN sits where the block's parameters say it does, not only in ffn_layers().
  assert model.blocks[2].ffn.w_gate.shape == (D, 8) and not hasattr(model.blocks[1].ffn,
                                                                    'w_gate')


def test_clear_errors_for_bad_configuration():
  with pytest.raises(ValueError, match=r'sparse_layers entry 0 .* from 1 to num_layers=2'):
    _abstract(sparse_ffn=DENSE, sparse_layers=[0, 2])
  with pytest.raises(ValueError, match=r'sparse_layers entry 3 .* from 1 to num_layers=2'):
    _abstract(sparse_ffn=DENSE, sparse_layers=[3])
  with pytest.raises(ValueError, match="sparse_layers='odd'"):
    _abstract(sparse_ffn=DENSE, sparse_layers='odd')
  with pytest.raises(ValueError, match='d_model=16 is not divisible by num_heads=3'):
    nnx.eval_shape(lambda: TransformerLM(V, D, 2, 3, ffn=DENSE, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="unknown positions='alibi'"):
    _abstract(positions='alibi')
  with pytest.raises(ValueError, match="mem_len=4 needs positions='relative'"):
    _abstract(mem_len=4)
  with pytest.raises(ValueError, match="memory needs positions='relative'"):
    _model('sinusoidal')(_tokens(), memory=[jnp.zeros((2, 4, D))] * 2)
  with pytest.raises(ValueError, match=r'memory has 1 entries; need one per layer \(2\)'):
    _model('relative')(_tokens(), memory=[jnp.zeros((2, 4, D))])
  # An explicit head_dim lifts the divisibility requirement.
  model = nnx.eval_shape(lambda: TransformerLM(V, 15, 1, 4, head_dim=4, ffn=DENSE,
                                               rngs=nnx.Rngs(0)))
  assert model.groups.blocks[0].attention.q_proj.shape == (1, 15, 4, 4)   # [layers, ...]


# --- Auxiliary losses and metrics ------------------------------------------------------------

@pytest.mark.parametrize('scan,remat', [(False, False), (True, True)])
def test_aux_losses_summed_over_layers_under_jit(scan, remat):
  """The model adds the sublayers' weighted losses as they are (layers summed), reports their
  metrics per layer, and the gradient flows through them (and through scan / remat)."""
  weights = (0.5, 0.25)
  model = _model(num_layers=4, ffn=functools.partial(RecordingFFN, value=1.0, weights=weights),
                 sparse_ffn=functools.partial(RecordingFFN, value=2.0, weights=weights),
                 scan_layers=scan, remat=remat)
  graphdef, state = nnx.split(model)

  def aux(state, tokens):
    out = nnx.merge(graphdef, state)(tokens)
    return out.aux_loss, out

  (_, out), grads = jax.jit(jax.value_and_grad(aux, has_aux=True))(state, _tokens())
  # load_balance per layer = D·value²: layers 1,3 value 1, layers 2,4 value 2.
  lb = 2 * D * 1.0 + 2 * D * 4.0
  ent = -(1.0 + 2.0 + 1.0 + 2.0)
  np.testing.assert_allclose(out.aux_losses['load_balance'], 0.5 * lb, rtol=1e-6)
  np.testing.assert_allclose(out.aux_losses['entropy'], 0.25 * ent, rtol=1e-6)
  np.testing.assert_allclose(out.aux_loss, 0.5 * lb + 0.25 * ent, rtol=1e-6)
  assert sorted(out.metrics) == sorted(f'layer_0{i}/{m}' for i in (1, 2, 3, 4)
                                       for m in ('entropy', 'expert_usage', 'load_balance'))
  np.testing.assert_allclose(out.metrics['layer_02/expert_usage'], [2.0] * 3)
  np.testing.assert_allclose(out.metrics['layer_03/expert_usage'], [1.0] * 3)
  np.testing.assert_allclose(out.metrics['layer_04/load_balance'], D * 4.0)

  # The aux loss is differentiable through the model (and scan/remat): d/dw (0.5·Σ w²) = w.
  flat = {p: v for p, v in nnx.to_flat_state(grads) if p[-1] == 'w'}
  assert flat, 'no gradient reached the recording FFNs'
  for path, g in flat.items():
    w = dict(nnx.to_flat_state(state))[path].get_value()
    np.testing.assert_allclose(g.get_value(), w, rtol=1e-6)


def test_dense_model_reports_no_aux_and_aux_losses_must_be_scalars():
  out = _model()(_tokens())
  assert out.aux_losses == {} and out.metrics == {} and float(out.aux_loss) == 0.0

  class VectorLoss(RecordingFFN):
    def __call__(self, x, *, deterministic=True, segment_ids=None):
      return x, common.Aux({'load_balance': jnp.ones(3)}, {})

  model = _model(sparse_ffn=functools.partial(VectorLoss, value=1.0, weights=(1.0, 1.0)))
  with pytest.raises(ValueError, match=r"auxiliary loss 'load_balance' of layer 2 must be a "
                                       r'scalar, got shape \(3,\)'):
    model(_tokens())


# --- Embeddings, gradients, scan --------------------------------------------------------------

def test_tied_embeddings_share_one_matrix():
  tied = _model(tie_embeddings=True)
  untied = _model(tie_embeddings=False)
  assert tied.unembed is None
  names = [p for p, _ in nnx.to_flat_state(nnx.state(tied, nnx.Param))]
  assert sum('embed' in p or 'unembed' in p for p in names) == 1
  specs = nnx.get_partition_spec(nnx.state(untied))
  assert tuple(specs['embed'].get_value()) == ('vocab', 'embed')
  assert tuple(specs['unembed'].get_value()) == ('embed', 'vocab')
  # Copy the tied model into the untied one with unembed = embed^T: same logits, so the tied
  # model reads its output projection from the input embedding.
  nnx.update(untied, nnx.state(tied, nnx.Param))
  untied.unembed[...] = tied.embed[...].T
  tokens = _tokens()
  np.testing.assert_allclose(untied(tokens).logits, tied(tokens).logits, rtol=1e-6, atol=1e-6)
  # ...and a change to that one matrix moves the output projection too: scaling only the
  # row of a token that is not in the input changes only that logit column.
  unused = next(v for v in range(V) if v not in set(np.asarray(tokens).ravel()))
  before = tied(tokens).logits
  tied.embed[...] = tied.embed[...].at[unused].multiply(2.0)
  after = tied(tokens).logits
  np.testing.assert_allclose(after[..., unused], 2 * before[..., unused], rtol=1e-5, atol=1e-6)
  changed = np.abs(np.asarray(after - before)).max(axis=(0, 1)) > 0
  assert changed.tolist() == [v == unused for v in range(V)]


def test_csordas_initialisation_of_attention_embedding_and_output_layer():
  """Csordás et al.'s code: every attention linear (q, k, v, o, position projection) starts at
  N(0, c²/fan_in) with c = sqrt(2/num_layers); the embedding is Xavier-uniform; the output
  layer is a PyTorch Linear (weight and bias U(±1/sqrt(d)))."""
  vocab, d, layers = 2048, 64, 8
  c = common.depth_scale(layers)
  assert c == pytest.approx(0.5)
  m = TransformerLM(
      vocab, d, 1, 4, positions='relative', ffn=DENSE, tie_embeddings=False,
      embedding_init='csordas', output_bias=True, init_scale=c, scan_layers=False,
      rngs=nnx.Rngs(0))
  attn = m.blocks[0].attention
  for name, fan_in in (('q_proj', d), ('k_proj', d), ('v_proj', d), ('o_proj', d),
                       ('r_proj', d)):
    w = np.asarray(getattr(attn, name)[...])
    assert w.std() == pytest.approx(c / np.sqrt(fan_in), rel=0.05), name
  bound = np.sqrt(6 / (vocab + d))  # Xavier-uniform: std sqrt(2 / (fan_in + fan_out))
  embed = np.asarray(m.embed[...])
  assert np.abs(embed).max() <= bound and embed.std() == pytest.approx(bound / np.sqrt(3),
                                                                      rel=0.02)
  for w in (m.unembed[...], m.output_bias[...]):
    w = np.asarray(w)
    assert np.abs(w).max() <= d ** -0.5 and w.std() == pytest.approx(d ** -0.5 / np.sqrt(3),
                                                                    rel=0.1)
  # The fairseq defaults are unchanged: N(0, 1/fan_in) attention, N(0, 1/d) embedding.
  f = TransformerLM(vocab, d, 1, 4, ffn=DENSE, scan_layers=False, rngs=nnx.Rngs(0))
  assert np.asarray(f.blocks[0].attention.q_proj[...]).std() == pytest.approx(d ** -0.5,
                                                                              rel=0.05)
  assert np.asarray(f.embed[...]).std() == pytest.approx(d ** -0.5, rel=0.02)
  assert f.output_bias is None


def test_output_bias_and_dropout_before_the_output_layer():
  m = _model(positions='relative', tie_embeddings=False, output_bias=True, output_dropout=True,
             dropout=0.5, embedding_init='csordas')
  tokens = _tokens()
  with_bias = m(tokens).logits
  bias = np.asarray(m.output_bias[...])
  m.output_bias[...] = jnp.zeros_like(m.output_bias[...])
  np.testing.assert_allclose(with_bias, np.asarray(m(tokens).logits) + bias, rtol=1e-5,
                             atol=1e-6)
  # With an identity output layer (vocab = d_model) the logits are the dropped-out final
  # LayerNorm output: about half exactly zero in training, none in evaluation.
  m = TransformerLM(D, D, 1, H, ffn=DENSE, tie_embeddings=False, output_dropout=True,
                    dropout=0.5, scan_layers=False, rngs=nnx.Rngs(0))
  m.unembed[...] = jnp.eye(D)
  tokens = jax.random.randint(jax.random.key(1), (4, 16), 1, D)
  train = np.asarray(m(tokens, deterministic=False).logits)
  assert 0.35 < (train == 0).mean() < 0.65
  assert (np.asarray(m(tokens).logits) != 0).all()
  m.output_dropout = False
  assert (np.asarray(m(tokens, deterministic=False).logits) == 0).mean() < 0.01
  with pytest.raises(ValueError, match='output_bias=True needs tie_embeddings=False'):
    _model(output_bias=True)
  with pytest.raises(ValueError, match="unknown embedding_init='xavier'"):
    _model(embedding_init='xavier')


def test_gradients_finite_and_match_finite_differences():
  # Relative positions: the most hand-written math (rel_shift, u/v biases); one compile each
  # for the loss and its gradient keeps this affordable.
  positions = 'relative'
  with jax.enable_x64(True):
    model = TransformerLM(V, 8, 1, 2, ffn=functools.partial(DenseFFN, d_ff=8),
                          positions=positions, dtype=jnp.float64, param_dtype=jnp.float64,
                          rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    tokens = _tokens((1, 4))

    def loss(state):
      logits = nnx.merge(graphdef, state)(tokens).logits
      return -jnp.mean(jax.nn.log_softmax(logits.astype(jnp.float64))[0, :-1, tokens[0, 1:]])

    loss = jax.jit(loss)
    grads = jax.grad(loss)(state)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    assert sum(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads)) > 10
    test_util.check_grads(loss, (state,), order=1, modes=['rev'], atol=1e-4, rtol=1e-3)


def test_scan_layers_matches_python_loop():
  sparse = functools.partial(GatedFFN, d_ff=8)
  looped = _model(num_layers=4, sparse_ffn=sparse, positions='relative', mem_len=4)
  scanned = _model(num_layers=4, sparse_ffn=sparse, positions='relative', mem_len=4,
                   scan_layers=True, seed=1)
  assert scanned.period == 2 and scanned.num_groups == 2
  specs = nnx.get_partition_spec(nnx.state(scanned))
  q = specs['groups']['blocks'][0]['attention']['q_proj'].get_value()
  assert tuple(q) == ('layers', 'embed', 'heads', 'kv')
  # Stack the looped blocks' parameters into the scanned groups: layer = group·2 + j.
  for j in range(2):
    per_group = [dict(nnx.to_flat_state(nnx.state(looped.blocks[g * 2 + j], nnx.Param)))
                 for g in range(2)]
    for path, var in nnx.to_flat_state(nnx.state(scanned.groups.blocks[j], nnx.Param)):
      var[...] = jnp.stack([p[path][...] for p in per_group])  # values only, keep metadata
  scanned.embed[...] = looped.embed[...]
  nnx.update(scanned.final_norm, nnx.state(looped.final_norm))
  tokens = _tokens()
  # One scanned call (each eager scan compiles): with memory, which also checks how the
  # per-layer memory is stacked into groups and unstacked again.
  memory = looped(tokens).memory
  a, b = looped(tokens, memory=memory), scanned(tokens, memory=memory)
  np.testing.assert_allclose(a.logits, b.logits, rtol=1e-5, atol=1e-5)
  for ma, mb in zip(a.memory, b.memory):
    np.testing.assert_allclose(ma, mb, rtol=1e-6, atol=1e-6)


def test_scan_layers_equal_the_loop_in_loss_aux_and_gradients():
  """The scanned default against the loop, with MoE families' aux losses in the objective:
  kills a layer order, an aux loss or a metric lost or mis-assigned in the scan's stacking."""
  import plain_reference as ref
  from moescale.layers import SigmaMoE, TopKMoE
  kw = dict(num_layers=4, ffn=functools.partial(SigmaMoE, num_experts=4, expert_size=8,
                                                top_k=2, dispatch='reference'),
            sparse_ffn=functools.partial(TopKMoE, num_experts=4, expert_size=8, top_k=2,
                                         router_z_weight=0.1, dispatch='reference'))
  looped, scanned = _model(**kw), _model(scan_layers=True, seed=1, **kw)
  assert scanned.period == 2
  ref.set_params(nnx.state(scanned, nnx.Param),
                 ref.scanned_from_looped(ref.flat(nnx.state(looped, nnx.Param)), 2))
  tokens = _tokens()

  def run(model):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
      out = nnx.merge(graphdef, params, rest)(tokens)
      lm = -jnp.mean(jax.nn.log_softmax(out.logits)[:, :-1].max(-1))
      return lm + out.aux_loss, out
    (value, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return value, out, ref.flat(grads)

  (va, oa, ga), (vb, ob, gb) = run(looped), run(scanned)
  np.testing.assert_allclose(vb, va, rtol=1e-5)
  assert set(oa.aux_losses) == set(ob.aux_losses) == {'load_balance', 'router_z', 'entropy'}
  for name in oa.aux_losses:
    np.testing.assert_allclose(ob.aux_losses[name], oa.aux_losses[name], rtol=1e-5)
  assert oa.metrics.keys() == ob.metrics.keys()
  for key in oa.metrics:
    np.testing.assert_allclose(ob.metrics[key], oa.metrics[key], rtol=1e-5, atol=1e-7)
  ga = ref.scanned_from_looped(ga, 2)
  assert ga.keys() == gb.keys()
  for name in ga:
    np.testing.assert_allclose(gb[name], ga[name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_scanned_compile_time_stays_flat_in_depth():
  """Lowering a scanned model's train gradient costs about the same at 2 and 16 layers (the
  loop's grows with depth): kills a scan that unrolls, or a stack traced once per layer."""
  import time

  def lower_seconds(num_layers, scan):
    model = nnx.eval_shape(lambda: _model(num_layers=num_layers, scan_layers=scan))
    graphdef, state = nnx.split(model)
    loss = lambda s, t: jnp.sum(nnx.merge(graphdef, s)(t).logits)
    start = time.perf_counter()
    text = jax.jit(jax.grad(loss)).lower(state, jax.ShapeDtypeStruct((2, 8), jnp.int32))
    text = text.as_text()
    return time.perf_counter() - start, len(text)

  (t2, n2), (t16, n16) = lower_seconds(2, True), lower_seconds(16, True)
  _, n16_loop = lower_seconds(16, False)
  # The program text is the deterministic measure: the scanned one does not grow with depth.
  assert n16 < 1.1 * n2 and n16_loop > 4 * n16, (n2, n16, n16_loop)
  assert t16 < 3 * t2 + 1.0, (t2, t16)


@pytest.mark.parametrize('scan', [False, True])
def test_dropout_only_in_training_and_needs_no_extra_plumbing(scan):
  model = _model(dropout=0.3, attention_dropout=0.3, scan_layers=scan)
  tokens = _tokens()

  @nnx.jit(static_argnames='deterministic')
  def forward(model, tokens, deterministic):
    return model(tokens, deterministic=deterministic).logits

  eval_a, eval_b = forward(model, tokens, True), forward(model, tokens, True)
  np.testing.assert_array_equal(eval_a, eval_b)
  # The rng counters advance between calls (state carried out of jit and scan).
  a, b = forward(model, tokens, False), forward(model, tokens, False)
  assert not np.allclose(a, b) and not np.allclose(a, eval_a)


# --- Transformer-XL memory --------------------------------------------------------------------

@pytest.mark.parametrize('scan', [False, True])
def test_memory_reproduces_the_concatenated_sequence(scan):
  # With mem_len >= the previous segment, layer i's memory is exactly what layer i sees of the
  # earlier tokens in one long causal run (the earlier tokens' states never depend on later
  # ones), and relative positions make the offsets identical: so the logits agree exactly, for
  # any number of layers.
  seg_len = 4
  model = _model('relative', num_layers=2, mem_len=seg_len, scan_layers=scan)
  s1, s2, s3 = (_tokens((2, seg_len), i) for i in (1, 2, 3))
  first = model(s1)
  assert [m.shape for m in first.memory] == [(2, seg_len, D)] * 2
  second = model(s2, memory=first.memory)
  whole = model(jnp.concatenate([s1, s2], axis=1)).logits
  np.testing.assert_allclose(second.logits, whole[:, seg_len:], rtol=1e-5, atol=1e-5)
  if scan:
    return  # (every eager scan call compiles anew; the rest is the same code path)

  # A longer memory at evaluation (two segments, as Csordás et al. use four at test time).
  first = model(s1, mem_len=2 * seg_len)
  second = model(s2, memory=first.memory, mem_len=2 * seg_len)
  assert second.memory[0].shape == (2, 2 * seg_len, D)
  third = model(s3, memory=second.memory)
  whole = model(jnp.concatenate([s1, s2, s3], axis=1)).logits
  np.testing.assert_allclose(third.logits, whole[:, 2 * seg_len:], rtol=1e-5, atol=1e-5)
  # The default mem_len keeps only the last segment's worth.
  assert third.memory[1].shape == (2, seg_len, D)


@pytest.mark.parametrize('scan', [False, True])
def test_masked_memory_slots_are_invisible(scan):
  # A fixed-size memory whose slots are masked must act as the shorter memory of its real
  # slots: all masked = no memory (a stream's first segment); the last half real = a memory
  # of half the length (relative distances count from the query, so they agree too).
  seg_len = 4
  model = _model('relative', num_layers=2, mem_len=2 * seg_len, scan_layers=scan)
  s1, s2 = _tokens((2, seg_len), 1), _tokens((2, seg_len), 2)
  garbage = [jnp.full((2, 2 * seg_len, D), 3.0)] * 2
  none_real = jnp.zeros((2, 2 * seg_len), bool)
  empty = model(s1, memory=garbage, memory_mask=none_real)
  np.testing.assert_allclose(empty.logits, model(s1).logits, rtol=1e-5, atol=1e-5)
  # The returned mask: the old (all False) slots shift out, the segment's tokens come in.
  assert empty.memory_mask.tolist() == [[False] * seg_len + [True] * seg_len] * 2
  second = model(s2, memory=empty.memory, memory_mask=empty.memory_mask)
  short = model(s2, memory=model(s1, mem_len=seg_len).memory)
  np.testing.assert_allclose(second.logits, short.logits, rtol=1e-5, atol=1e-5)
  assert second.memory_mask.all()
  # Row-wise: row 0 keeps its memory, row 1 restarts.
  mixed = jnp.array([[True] * 2 * seg_len, [False] * 2 * seg_len])
  out = model(s2, memory=second.memory, memory_mask=mixed)
  full = model(s2, memory=second.memory)
  np.testing.assert_allclose(out.logits[0], full.logits[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out.logits[1], model(s2[1:]).logits[0], rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='memory_mask'):
    model(s2, memory_mask=mixed)


def test_memory_is_a_constant_for_gradients():
  model = _model('relative', num_layers=2, mem_len=4)
  graphdef, state = nnx.split(model)
  s1, s2 = _tokens((1, 4), 1), _tokens((1, 4), 2)
  memory = model(s1).memory

  def through_memory(state):
    m = nnx.merge(graphdef, state)
    return jnp.sum(m(s2, memory=m(s1).memory).logits ** 2)

  def constant_memory(state):
    return jnp.sum(nnx.merge(graphdef, state)(s2, memory=memory).logits ** 2)

  def wrt_memory(memory):
    return jnp.sum(nnx.merge(graphdef, state)(s2, memory=memory).logits)

  @jax.jit
  def all_grads(state, memory):
    return (jax.grad(through_memory)(state), jax.grad(constant_memory)(state),
            jax.grad(wrt_memory)(memory))

  g1, g2, g_mem = all_grads(state, memory)
  # Equal up to float rounding; a gradient through the memory would change them at O(1).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), g1, g2)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in g_mem)
  # ...while the memory does change the output.
  assert not np.allclose(model(s2, memory=memory).logits, model(s2).logits, atol=1e-4)


def test_ffn_and_attention_layers_for_cost_accounting():
  model = _model(num_layers=3, sparse_ffn=functools.partial(DenseFFN, d_ff=64))
  costs = [f.cost().total_flops for _, f in model.ffn_layers()]
  assert costs == [4 * D * 32, 4 * D * 64, 4 * D * 32]
  attn = [(n, a.cost(context_length=8)) for n, a in model.attention_layers()]
  assert [n for n, _ in attn] == [1, 2, 3]
  assert attn[0][1].flops['attn_qkvo'] == 2 * 4 * D * D
  # cost() works on an abstract model (no parameter values read).
  abstract = nnx.eval_shape(lambda: _model(num_layers=2, sparse_ffn=DENSE, scan_layers=True))
  assert [f.cost().total_flops for _, f in abstract.ffn_layers()] == [4 * D * 32] * 2


def test_layer_norm_vjp_matches_autodiff_of_the_formula():
  from moescale.model.blocks import layer_norm

  def formula(x, scale, bias):
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + 1e-5) * scale + bias

  keys = jax.random.split(jax.random.key(0), 4)
  x = 3.0 * jax.random.normal(keys[0], (2, 5, 16)) + 1.0
  scale = 1.0 + 0.3 * jax.random.normal(keys[1], (16,))
  bias = 0.3 * jax.random.normal(keys[2], (16,))
  dy = jax.random.normal(keys[3], x.shape)
  np.testing.assert_allclose(layer_norm(x, scale, bias, 1e-5), formula(x, scale, bias),
                             rtol=1e-5, atol=1e-5)
  ours = jax.grad(lambda *a: (layer_norm(*a, 1e-5) * dy).sum(), argnums=(0, 1, 2))(x, scale, bias)
  ref = jax.grad(lambda *a: (formula(*a) * dy).sum(), argnums=(0, 1, 2))(x, scale, bias)
  for a, b in zip(ours, ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
