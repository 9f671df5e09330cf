"""Parameter and FLOP accounting, checked against real parameter trees, XLA's own cost
analysis, and the compute figures Artetxe et al. plot."""

import functools

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from moescale import accounting
from moescale.layers import DenseFFN, ProductKeyMemory, SigmaMoE, TopKMoE
from moescale.model import TransformerLM

SPARSE = {
    'dense': None,
    'topk_moe': functools.partial(TopKMoE, num_experts=4, expert_size=32, top_k=2,
                                  use_bias=True),
    'sigma_moe': functools.partial(SigmaMoE, num_experts=4, expert_size=16, top_k=2),
    'pkm': functools.partial(ProductKeyMemory, num_heads=2, num_keys=8, knn=4),
}


def _model_fn(sparse, **kw):
  args = dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4,
              ffn=functools.partial(DenseFFN, d_ff=128, use_bias=True), sparse_ffn=sparse)
  args.update(kw)
  return functools.partial(TransformerLM, **args)


@pytest.mark.parametrize('family', list(SPARSE))
def test_param_count_equals_real_parameter_tree(family):
  model_fn = _model_fn(SPARSE[family])
  real = nnx.state(model_fn(rngs=nnx.Rngs(0)), nnx.Param)
  n = sum(v[...].size for _, v in nnx.to_flat_state(real))
  c = accounting.count(model_fn, context_length=16)
  assert c.total_params == n
  assert c.active_params <= c.total_params
  if family == 'dense':
    assert c.active_params == c.total_params


def test_active_params_of_topk_moe_count_k_experts():
  e, f, d, k = 8, 32, 32, 2
  model_fn = _model_fn(functools.partial(TopKMoE, num_experts=e, expert_size=f, top_k=k),
                       sparse_layers='all')
  c = accounting.count(model_fn, 16)
  # Each layer leaves (e - k) experts of 2·d·f weights idle.
  assert c.total_params - c.active_params == 2 * (e - k) * 2 * d * f


def _xla_flops(fn, *args):
  return jax.jit(fn).lower(*args).compile().cost_analysis()['flops']


def test_dense_forward_flops_match_xla_cost_analysis():
  length, batch = 64, 2
  # XLA's attention ops: XLA's cost analysis cannot see into the C++ kernel's custom call.
  model_fn = _model_fn(None, d_model=64, vocab_size=256, attention_kernels='xla')
  model = model_fn(rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  tokens = jnp.zeros((batch, length), jnp.int32)
  xla = _xla_flops(lambda s, t: nnx.merge(graphdef, s)(t).logits, state, tokens)
  ours = accounting.count(model_fn, context_length=length).flops_per_token * batch * length
  # XLA also counts element-wise work (softmax, LayerNorm, GELU) that the convention skips.
  assert ours <= xla <= 1.15 * ours, (ours, xla)


def test_dense_ffn_cost_matches_xla():
  layer = DenseFFN(64, 256, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(layer)
  x = jnp.zeros((4, 8, 64))
  xla = _xla_flops(lambda s, x: nnx.merge(graphdef, s)(x), state, x)
  ours = layer.cost().total_flops * 32
  assert ours <= xla <= 1.05 * ours


ZFLOP = 1e21


@pytest.mark.parametrize('l,h,zflops', [(12, 768, 0.36), (24, 1024, 1.06), (24, 2048, 3.57),
                                        (32, 4096, 17.1)])
def test_artetxe_dense_training_compute(l, h, zflops):
  model_fn = functools.partial(
      TransformerLM, vocab_size=50261, d_model=h, num_layers=l, num_heads=h // 64,
      ffn=functools.partial(DenseFFN, d_ff=4 * h, use_bias=True, activation='gelu'),
      sparse_ffn=None)
  c = accounting.count(model_fn, context_length=2048)
  total = c.train_flops_per_token['artetxe'] * 300e9 / ZFLOP
  assert total == pytest.approx(zflops, rel=0.02)


def test_artetxe_moe_15b_training_compute_and_size():
  h, l = 768, 12
  model_fn = functools.partial(
      TransformerLM, vocab_size=50261, d_model=h, num_layers=l, num_heads=12,
      ffn=functools.partial(DenseFFN, d_ff=4 * h, use_bias=True, activation='gelu'),
      sparse_ffn=functools.partial(TopKMoE, num_experts=512, expert_size=4 * h, top_k=2,
                                   use_bias=True, activation='gelu'),
      sparse_layers='every_other')
  c = accounting.count(model_fn, context_length=2048)
  assert c.train_flops_per_token['artetxe'] * 300e9 / ZFLOP == pytest.approx(0.43, rel=0.02)
  assert c.total_params / 1e9 == pytest.approx(14.6, rel=0.02)
