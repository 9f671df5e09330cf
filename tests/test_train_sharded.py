"""Sharded training equals plain single-device gradient descent, for every FFN family and
several meshes.

The reference is tests/plain_reference.py: jax.grad of the objective written out, on one
device, and p - lr·g by hand. The sharded runs use plain SGD too, so any constant factor on the
gradient (a sum instead of a mean over devices) changes the parameters in proportion; Adam's
update, blind to such a factor, would hide it. Losses, gradient norms and parameters are
compared after every step.
"""

import functools

import jax
import numpy as np
import pytest
from flax import nnx

from moescale import sharding as shd
import optax

import plain_reference as ref
from moescale.data.synthetic import SyntheticData
from moescale.layers import DenseFFN, ProductKeyMemory, SigmaMoE, TopKMoE
from moescale.layers import expert_exchange, expert_parallel
from moescale.layers.expert_parallel import ExpertParallel
from moescale.layers import dispatch as dispatch_lib
from moescale.model import TransformerLM
from moescale.train import step as step_lib

VOCAB, LENGTH, BATCH = 32, 16, 8

AUX_WEIGHTS = {'load_balance': 0.1, 'router_z': 0.01, 'entropy': 0.1}
_TOPK_WEIGHTS = dict(load_balance_weight=AUX_WEIGHTS['load_balance'],
                     router_z_weight=AUX_WEIGHTS['router_z'])
FAMILIES = {
    'dense': functools.partial(DenseFFN, d_ff=64),
    'topk_moe': functools.partial(TopKMoE, num_experts=4, expert_size=32, top_k=2,
                                  capacity_factor=1.0, use_bias=True, **_TOPK_WEIGHTS),
    'topk_moe_dropless': functools.partial(TopKMoE, num_experts=4, expert_size=32, top_k=2,
                                           capacity_factor=0.0, **_TOPK_WEIGHTS),
    'sigma_moe': functools.partial(SigmaMoE, num_experts=4, expert_size=16, top_k=2,
                                   num_layers=2, entropy_weight=AUX_WEIGHTS['entropy']),
    'pkm': functools.partial(ProductKeyMemory, num_heads=2, num_keys=8, knn=4,
                             query_proj=False, score_fn='relu'),
}

MESHES = {
    'data8': dict(data=8),
    'data2_expert4': dict(data=2, expert=4),
    'data2_tensor2_expert2': dict(data=2, tensor=2, expert=2),
    'fsdp4_data2': dict(data=2, fsdp=4),
}

EP_MESHES = ('data2_expert4', 'data2_tensor2_expert2')
# (family, mesh, expert exchange): the ring everywhere; the all-to-all once per EP mesh, on the
# family with biases and a router capacity (the tensor case then also checks the bias-once rule).
CASES = ([(f, m, 'ring') for f in FAMILIES for m in MESHES
          if m in EP_MESHES or f in ('dense', 'topk_moe')]
         + [('topk_moe', m, 'all_to_all') for m in EP_MESHES])


Z_LOSS, LR, STEPS = 1e-3, 0.5, 3


def _model_fn(family, exchange='ring', scan_layers=True):
  """The test LM with `family` in layer 2; a MoE family exchanges tokens by `exchange` under
  an expert-parallel mesh (its own setting: nothing else decides it)."""
  sparse = FAMILIES[family]
  if 'moe' in family:
    sparse = functools.partial(sparse, expert_exchange=exchange)
  return functools.partial(TransformerLM, vocab_size=VOCAB, d_model=32, num_layers=2,
                           num_heads=4, ffn=functools.partial(DenseFFN, d_ff=64),
                           sparse_ffn=sparse, sparse_layers='every_other',
                           scan_layers=scan_layers)


def _batches():
  it = SyntheticData(vocab_size=VOCAB, length=LENGTH).train_iterator(BATCH)
  return [next(it) for _ in range(STEPS)]


def _run(model_fn, mesh, params=None):
  """The trainer's step, jitted with the mesh's shardings, on plain SGD: (records, state).
  params: {path: value} to start from instead of the model's own initial values."""
  tx = optax.sgd(LR)
  graphdef, state, state_sh = step_lib.create_train_state(model_fn, tx, 0, mesh)
  if params is not None:
    ref.set_params(state.params, params)
  train = step_lib.jit_train_step(
      step_lib.make_train_step(graphdef, tx, lambda s: LR, step_lib.StepConfig(z_loss=Z_LOSS)),
      state_sh, mesh)
  records = []
  with shd.use_mesh(mesh):          # the one context the trainer enters
    for batch in _batches():
      state, m = train(state, shd.host_local_to_global(batch, mesh))
      records.append({k: float(m[k]) for k in ('total_loss', 'loss', 'grad_norm')})
  return records, state


@functools.lru_cache(maxsize=None)
def _reference(family, scan_layers=True):
  """Plain SGD on the written-out objective, one device, from the same initial parameters.
  One run per family, shared by its mesh cases (pytest-xdist --dist loadfile keeps a file on
  one worker, so the cache is hit)."""
  model_fn = _model_fn(family, scan_layers=scan_layers)
  mesh = shd.make_mesh(devices=jax.devices()[:1])
  graphdef, state, _ = step_lib.create_train_state(model_fn, optax.sgd(LR), 0, mesh)
  batches = [{k: jax.numpy.asarray(v) for k, v in b.items()} for b in _batches()]
  params, records = ref.sgd_steps(graphdef, state.params, state.rest, batches, AUX_WEIGHTS,
                                  LR, Z_LOSS)
  return records, ref.flat(params)


@pytest.mark.parametrize('family,mesh_name,exchange', CASES)
def test_sharded_steps_equal_plain_gradient_descent(family, mesh_name, exchange, monkeypatch):
  """Kills: a gradient scaled by the device count, an aux loss or the z-loss lost under a
  mesh, expert-parallel exchanges that drop, duplicate or misroute tokens."""
  model_fn = _model_fn(family, exchange)
  ref_records, ref_params = _reference(family)
  mesh = shd.make_mesh(**MESHES[mesh_name])
  exchanged = []
  original = expert_exchange.exchange_ffn
  monkeypatch.setattr(expert_exchange, 'exchange_ffn',
                      lambda *a, **kw: exchanged.append(1) or original(*a, **kw))
  records, state = _run(model_fn, mesh)
  assert bool(exchanged) == (exchange == 'all_to_all')
  for key in ('total_loss', 'loss', 'grad_norm'):
    np.testing.assert_allclose([r[key] for r in records], [r[key] for r in ref_records],
                               rtol=2e-5, err_msg=key)
  for path, var in nnx.to_flat_state(state.params):
    name = '/'.join(map(str, path))
    # SGD moves a parameter by lr·g: reduction-order rounding stays at rounding size.
    np.testing.assert_allclose(np.asarray(var[...]), ref_params[name], rtol=1e-4, atol=1e-6,
                               err_msg=name)
    # Parameters carry the shardings the rules say (after fitting to divisible dims).
    names = var.get_metadata()['out_sharding']
    want = shd._fit_spec(shd.logical_to_spec(names), var[...].shape, mesh)
    assert var[...].sharding.spec == want, (path, var[...].sharding.spec, want)
  assert records[-1]['loss'] < records[0]['loss']


@pytest.mark.parametrize('mesh_name', EP_MESHES)
def test_scanned_layers_under_expert_parallelism_equal_the_looped_reference(mesh_name):
  """The scanned default (nnx.scan around the expert-parallel shard_map), started from the
  looped reference's parameters, takes the same steps: losses, gradient norms, parameters."""
  ref_records, ref_params = _reference('topk_moe', scan_layers=False)
  mesh = shd.make_mesh(**MESHES[mesh_name])
  looped_fn = _model_fn('topk_moe', scan_layers=False)
  start = ref.flat(step_lib.create_train_state(looped_fn, optax.sgd(LR), 0, mesh)[1].params)
  records, state = _run(_model_fn('topk_moe'), mesh, ref.scanned_from_looped(start, 2))
  for key in ('total_loss', 'loss', 'grad_norm'):
    np.testing.assert_allclose([r[key] for r in records], [r[key] for r in ref_records],
                               rtol=2e-5, err_msg=key)
  want = ref.scanned_from_looped(ref_params, 2)
  for name, value in ref.flat(state.params).items():
    np.testing.assert_allclose(value, want[name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_expert_weights_split_over_expert_axis_and_ep_dispatch_used(monkeypatch):
  mesh = shd.make_mesh(data=2, expert=4)
  seen = []
  original = ExpertParallel.apply

  def spy(self, *args, **kwargs):
    seen.append(self.name)
    return original(self, *args, **kwargs)

  monkeypatch.setattr(ExpertParallel, 'apply', spy)
  _, state = _run(_model_fn('topk_moe'), mesh)
  w_in = state.params['groups']['blocks'][1]['ffn']['w_in'][...]   # [layers, experts, ...]
  assert w_in.sharding.spec[1] == 'expert'
  # each device holds 1 of the 4 experts
  assert {s.data.shape[1] for s in w_in.addressable_shards} == {1}
  assert seen and all(s.startswith('expert_parallel') for s in seen)


def test_mesh_shape_errors_name_the_problem():
  with pytest.raises(ValueError, match='at most one -1'):
    shd.mesh_shape(data=-1, expert=-1, num_devices=8)
  with pytest.raises(ValueError, match='do not divide'):
    shd.mesh_shape(data=-1, expert=3, num_devices=8)
  with pytest.raises(ValueError, match='16 devices'):
    shd.mesh_shape(data=4, expert=4, num_devices=8)
  assert shd.mesh_shape(data=-1, expert=4, num_devices=8) == {
      'data': 2, 'fsdp': 1, 'expert': 4, 'tensor': 1}


def test_logical_rules_map_and_skip_used_axes():
  assert shd.logical_to_spec(('expert', 'embed', 'mlp')) == jax.P('expert', 'fsdp', 'tensor')
  # 'batch' takes (data, fsdp, expert); 'embed' then cannot reuse fsdp.
  assert shd.logical_to_spec(('batch', 'embed')) == jax.P(('data', 'fsdp', 'expert'), None)
  with pytest.raises(ValueError, match="'nonsense'"):
    shd.logical_to_spec(('nonsense',))


def test_the_backend_runs_per_device_under_a_mesh_that_splits_rows_or_experts(monkeypatch):
  """The mesh JAX traces under (nothing of moescale's) decides whether a Dispatch runs each
  device's rows inside shard_map; its exchange is the one it was built with."""
  calls = []
  monkeypatch.setattr(ExpertParallel, 'apply',
                      lambda self, *a, **k: calls.append(self.exchange) or (a[0], 0.0))
  run = dispatch_lib.Dispatch('reference', exchange='all_to_all')
  x, idx = np.ones((8, 4), np.float32), np.zeros((8, 1), np.int32)
  experts = dispatch_lib.ExpertWeights(np.ones((4, 4, 2), np.float32),
                                       np.ones((4, 2, 4), np.float32))
  assert expert_parallel.expert_shards() == 1
  run(x, idx, np.ones((8, 1), np.float32), experts, jax.nn.relu)
  assert calls == []                       # no mesh: the backend as it is
  with shd.use_mesh(shd.make_mesh(data=8)):
    assert expert_parallel.expert_shards() == 1
    run(x, idx, np.ones((8, 1), np.float32), experts, jax.nn.relu)
  with jax.set_mesh(shd.make_mesh(data=2, expert=4)):
    assert expert_parallel.expert_shards() == 4
    run(x, idx, np.ones((8, 1), np.float32), experts, jax.nn.relu)
  assert calls == ['all_to_all', 'all_to_all']


@pytest.mark.parametrize('backend', ['fused', 'ragged'])
def test_data_parallel_dispatch_keeps_tokens_on_their_device(backend):
  """Rows split over 8 data-parallel devices: each device dispatches its own rows (no
  collective at all in the program: GSPMD left with the backend's sort gathered every token),
  and the result is the single-device one."""
  rng = np.random.default_rng(0)
  t, d, e, h, k = 64, 8, 4, 6, 2
  x = rng.normal(size=(t, d)).astype(np.float32)
  idx = np.stack([rng.permutation(e)[:k] for _ in range(t)]).astype(np.int32)
  w = rng.uniform(size=(t, k)).astype(np.float32)
  experts = dispatch_lib.ExpertWeights(rng.normal(size=(e, d, h)).astype(np.float32),
                                       rng.normal(size=(e, h, d)).astype(np.float32))
  run = dispatch_lib.Dispatch(backend)
  want = run(x, idx, w, experts, jax.nn.relu)
  mesh = shd.make_mesh(data=8)
  rows = jax.NamedSharding(mesh, jax.P('data', None))
  with shd.use_mesh(mesh):
    fn = jax.jit(lambda *a: run(*a, experts, jax.nn.relu), in_shardings=(rows, rows, rows))
    text = fn.lower(x, idx, w).compile().as_text()
    got = fn(x, idx, w)
  for op in ('all-gather', 'all-reduce', 'all-to-all', 'reduce-scatter'):
    assert op not in text, op
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('scan_layers', [False, True])
def test_activation_constraints_pin_the_residual_heads_and_hidden_units(scan_layers):
  """Under a mesh the model annotates its activations: the residual stream is split over data
  only, attention heads and FFN hidden units over 'tensor'."""
  mesh = shd.make_mesh(data=2, tensor=4)
  # vocab 48 (not d_model 32): the logits [8, 16, 48] must not be mistaken for the residual.
  model_fn = functools.partial(TransformerLM, vocab_size=48, d_model=32, num_layers=2,
                               num_heads=4, ffn=functools.partial(DenseFFN, d_ff=64),
                               scan_layers=scan_layers)
  graphdef, params, rest = step_lib.abstract_model(model_fn, 0)

  tokens = jax.ShapeDtypeStruct((BATCH, LENGTH), np.int32)

  def lowered_text():
    # A fresh function each time: jax caches traces by function, and the activation context
    # is not part of that key (the trainer always traces inside it).
    def forward(params, rest, tokens):
      return nnx.merge(graphdef, params, rest)(tokens).logits
    return jax.jit(forward).lower(params, rest, tokens).as_text()

  with shd.use_mesh(mesh):
    text = lowered_text()
  plain = lowered_text()
  assert 'sharding_constraint' not in plain  # without a mesh the model is unannotated
  constraints = [line for line in text.splitlines() if 'sharding_constraint' in line]
  # (block input, block output, q, k, v, hidden) per layer (once, in the scan's body, when
  # scanned) + embeddings + logits
  assert len(constraints) >= (1 if scan_layers else 2) * 6 + 2, len(constraints)
  residual = [c for c in constraints if 'tensor<8x16x32xf32>' in c]
  heads = [c for c in constraints if 'tensor<8x16x4x8xf32>' in c]
  hidden = [c for c in constraints if 'tensor<128x64xf32>' in c]
  logits = [c for c in constraints if 'tensor<8x16x48xf32>' in c]
  assert residual and heads and hidden and logits
  batch = '{"data", "fsdp", "expert"}'
  assert all(f'[{batch}, {{}}, {{}}]' in c for c in residual), residual
  assert all(f'[{batch}, {{}}, {{"tensor"}}, {{}}]' in c for c in heads), heads[0]
  assert all(f'[{batch}, {{"tensor"}}]' in c for c in hidden), hidden[0]
  assert all(f'[{batch}, {{}}, {{"tensor"}}]' in c for c in logits), logits[0]
