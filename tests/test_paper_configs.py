"""The papers' configurations as shipped gin files: sizes, compute and settings agree with
docs/sources.md (Artetxe et al. 2022; Csordás et al. 2023), and the CPU-sized versions stay small.
All counting is abstract (nothing materialised), so the 1.1T model costs about a second."""

import functools
import time

import pytest
from flax import nnx

from moescale import accounting, gin_config
from moescale.pairs import context_lengths

ZFLOP = 1e21
TOKENS = 300e9


def _count(gin_file, bindings=()):
  gin_config.parse([gin_file], list(bindings), finalize=False)
  return accounting.count(gin_config.query('MODEL'), *context_lengths())


def _model(gin_file):
  gin_config.parse([gin_file], [], finalize=False)
  return accounting.abstract_model(functools.partial(gin_config.query('MODEL'),
                                                     scan_layers=True))


# docs/sources.md#artetxe-et-al-2022-model-table: layers, d_model, total params (derived),
# plotted training ZFLOPs (300B tokens, derived from the compute formula).
ARTETXE = {
    'dense_125m': (12, 768, 0.124e9, 0.36), 'dense_355m': (24, 1024, 0.354e9, 1.06),
    'dense_1_3b': (24, 2048, 1.31e9, 3.57), 'dense_2_7b': (32, 2560, 2.65e9, 7.08),
    'dense_6_7b': (32, 4096, 6.65e9, 17.1), 'dense_13b': (40, 5120, 12.8e9, 32.7),
    'moe_15b': (12, 768, 14.6e9, 0.43), 'moe_52b': (24, 1024, 51.8e9, 1.30),
    'moe_207b': (24, 2048, 207e9, 4.53), 'moe_1_1t': (32, 4096, 1.10e12, 22.3),
}
TWINS = [('dense_125m', 'moe_15b', 1.19), ('dense_355m', 'moe_52b', 1.23),
         ('dense_1_3b', 'moe_207b', 1.27), ('dense_6_7b', 'moe_1_1t', 1.30)]


@pytest.mark.parametrize('name', list(ARTETXE))
def test_artetxe_sizes_and_compute_agree_with_papers_table(name):
  layers, d, params, zflops = ARTETXE[name]
  c = _count(f'models/artetxe2022/{name}.gin')
  assert c.context_length == 2048
  assert c.total_params == pytest.approx(params, rel=0.02)
  compute = c.train_flops(TOKENS, 'artetxe')
  assert compute / ZFLOP == pytest.approx(zflops, rel=0.02)
  # ... and is exactly the closed form behind their figure.
  moe_layers = layers // 2 if name.startswith('moe') else 0
  assert compute == pytest.approx(
      accounting.artetxe_formula(layers, d, 50261, 2048, TOKENS, moe_layers), rel=1e-12)


@pytest.mark.parametrize('dense,moe,ratio', TWINS)
def test_artetxe_moe_over_dense_compute_ratios(dense, moe, ratio):
  cd = _count(f'models/artetxe2022/{dense}.gin')
  cm = _count(f'models/artetxe2022/{moe}.gin')
  r = cm.train_flops_per_token['artetxe'] / cd.train_flops_per_token['artetxe']
  assert round(r, 2) == ratio
  # The twins share everything but the MoE layers' FFNs.
  assert cd.flops_by_category['attention_scores'] == cm.flops_by_category['attention_scores']
  assert cd.params_by_category['embedding'] == cm.params_by_category['embedding']


def test_artetxe_recipe_settings():
  m = _model('models/artetxe2022/moe_52b.gin')
  assert m.vocab_size == 50261 and m.positions == 'sinusoidal'
  assert m.unembed is None and m.scale_embeddings  # tied, scaled by sqrt(d)
  # 52B's run (as 355M's) had no dropout; every other model's 0.1
  # (docs/sources.md#artetxe-et-al-2022-training-settings).
  assert m.dropout_rate == 0.0
  assert _model('models/artetxe2022/moe_15b.gin').dropout_rate == 0.1
  assert m.sparse_layers == tuple(range(2, 25, 2))
  ffns = dict(m.ffn_layers())
  dense, moe = ffns[1], ffns[2]
  assert type(moe).__name__ == 'TopKMoE' and type(dense).__name__ == 'DenseFFN'
  # The load-balancing loss at fairseq's weight, in every MoE layer.
  assert {f.load_balance_weight for n, f in ffns.items() if n in m.sparse_layers} == {0.01}
  assert (moe.num_experts, moe.top_k, moe.expert_size) == (512, 2, 4096)
  assert moe.second_policy == 'all' and moe.capacity_factor == 1.0
  assert moe.eval_capacity_factor == 1.0 and moe.renormalize
  assert moe.group_size == 'shard'  # fairseq routes each GPU's tokens as one group
  assert moe.activation == dense.activation == 'gelu'
  assert moe.b_in is not None and dense.b_in is not None
  # fairseq's activation_dropout is 0: no dropout inside the dense FFN, as in the experts.
  assert dense.dropout_rate == 0.0 and dense.rngs is None
  assert dict(_model('models/artetxe2022/dense_125m.gin').ffn_layers())[1].dropout_rate == 0.0
  attn = dict(m.attention_layers())[1]
  assert attn.q_bias is not None and attn.head_dim == 64


def test_counting_the_biggest_models_is_fast():
  for name in ('moe_1_1t', 'dense_13b'):
    _count(f'models/artetxe2022/{name}.gin')  # warm caches (imports, jit of helpers)
    t0 = time.perf_counter()
    c = _count(f'models/artetxe2022/{name}.gin')
    assert c.total_params > 1e10
    # ~0.5 s alone on a laptop core; generous for a loaded shared machine.
    assert time.perf_counter() - t0 < 15


def test_fast_paths_count_exactly_what_the_plain_build_counts():
  gin_config.parse(['models/csordas2023/wt103_small/sigma_moe.gin'], [], finalize=False)
  fn = gin_config.query('MODEL')
  plain = accounting.count(nnx.eval_shape(lambda: fn(rngs=nnx.Rngs(0))), 512, 256)
  fast = accounting.count(fn, 512, 256)
  assert plain == fast


# docs/sources.md#csordas-et-al-2023-settings-table: setting -> (total params, d_model, d_ff,
# N_E, G, K, dropout, δ, γ, segment,
# parameter-matched PKM keys).
CSORDAS = {
    'wt103_small': (47.3e6, 412, 2053, 16, 128, 4, 0.1, 0.0, 1e-3, 256, 62),
    'wt103_big': (262.5e6, 1024, 4110, 32, 128, 4, 0.2, 0.1, 1e-3, 512, 89),
    'enwik8': (41.3e6, 512, 2053, 16, 128, 4, 0.1, 0.05, 1e-4, 512, 62),
}


@pytest.mark.parametrize('setting', list(CSORDAS))
def test_csordas_sizes_and_dense_vs_sigma_moe_parameters(setting):
  total, d, d_ff, n_e, g, k, drop, delta, gamma, segment, _ = CSORDAS[setting]
  cd = _count(f'models/csordas2023/{setting}/dense.gin')
  cs = _count(f'models/csordas2023/{setting}/sigma_moe.gin')
  assert cd.total_params == pytest.approx(total, rel=0.005)
  assert cs.total_params == pytest.approx(cd.total_params, rel=0.001)
  # Per FFN: dense 2·d·d_ff + biases vs σ-MoE 2·N_E·G·d + router d·N_E.
  assert cd.layers[0]['ffn_params'] == 2 * d * d_ff + d_ff + d
  assert cs.layers[0]['ffn_params'] == 2 * n_e * g * d + d * n_e
  assert cs.layers[0]['ffn_active_params'] == 2 * k * g * d + d * n_e
  assert cs.context_length == 2 * segment  # segment + one segment of memory


def test_csordas_wt103_small_per_ffn_matching_numbers():
  cd = _count('models/csordas2023/wt103_small/dense.gin')
  cs = _count('models/csordas2023/wt103_small/sigma_moe.gin')
  assert cd.layers[0]['ffn_params'] == 1_694_137
  assert cs.layers[0]['ffn_params'] == 1_694_144


@pytest.mark.parametrize('setting', list(CSORDAS))
def test_csordas_recipe_settings(setting):
  _, d, _, n_e, g, k, drop, delta, gamma, segment, pkm_keys = CSORDAS[setting]
  m = _model(f'models/csordas2023/{setting}/sigma_moe.gin')
  assert m.positions == 'relative' and m.mem_len == segment
  assert m.vocab_size == (259 if setting == 'enwik8' else 8000)
  assert m.unembed is not None  # untied output layer
  assert m.dropout_rate == drop
  attn = dict(m.attention_layers())[1]
  assert attn.q_bias is None  # no biases in attention
  # Around the layers, as their code (docs/sources.md#csordas-et-al-2023-around-the-layers):
  # c = sqrt(2/L) on every attention projection and the dense FFN, Xavier embedding unscaled,
  # an output layer with a bias and dropout before it, no attention dropout.
  c = (2 / m.num_layers) ** 0.5
  assert attn.init_scale == pytest.approx(c) and attn.dropout_rate == 0.0
  assert not m.scale_embeddings and m.output_dropout and m.output_bias is not None
  dense = dict(_model(f'models/csordas2023/{setting}/dense.gin').ffn_layers())[1]
  assert dense.init_scale == pytest.approx(c) and dense.dropout_rate == drop
  moe = dict(m.ffn_layers())[1]
  # Every FFN a σ-MoE, its only aux loss (the entropy regulariser) at weight γ.
  assert {(type(f).__name__, f.entropy_weight) for _, f in m.ffn_layers()} == {
      ('SigmaMoE', gamma)}
  assert (moe.num_experts, moe.expert_size, moe.top_k) == (n_e, g, k)
  assert moe.expert_dropout == delta and moe.selection == 'sigmoid'
  assert moe.activation == 'relu' and moe.num_layers == m.num_layers
  pkm = dict(_model(f'models/csordas2023/{setting}/pkm_relu_matched.gin').ffn_layers())[1]
  assert pkm.num_keys == pkm_keys and pkm.knn >= pkm.num_keys and pkm.mode == 'dense'
  assert pkm.score_fn == 'relu' and pkm.num_heads == 4 and pkm.w_query is None
  switch = dict(_model(f'models/csordas2023/{setting}/switch.gin').ffn_layers())[1]
  assert switch.top_k == 1 and switch.capacity_factor <= 0  # dropless, as their code
  assert switch.num_experts * switch.expert_size == n_e * g
  # Their balancing loss scale (0.01 / E² on E·Σ f·P) and init gain 0.1 on c².
  assert switch.load_balance_weight == pytest.approx(0.01 / switch.num_experts ** 2)
  assert switch.init_scale == switch.router_init_scale == pytest.approx(c * 0.1 ** 0.5)
  for family, value_init in (('pkm_softmax', 'scaled_normal'), ('pkm_relu', 'scaled_normal'),
                             ('pkm_relu_matched', 'csordas')):
    layer = dict(_model(f'models/csordas2023/{setting}/{family}.gin').ffn_layers())[1]
    assert (layer.key_init, layer.value_init, layer.num_layers) == (
        'csordas', value_init, m.num_layers)
  topk = dict(_model(f'models/csordas2023/{setting}/topk_activation.gin').ffn_layers())[1]
  assert topk.topk_activation == 128 and topk.activation == 'relu'


SMALL = ['artetxe_dense', 'artetxe_moe'] + [
    f'csordas_{f}' for f in ('dense', 'sigma_moe', 'switch', 'topk_activation',
                             'pkm_softmax', 'pkm_relu', 'pkm_relu_matched')]


@pytest.mark.parametrize('name', SMALL)
def test_small_versions_are_small(name):
  c = _count(f'models/small/{name}.gin')
  assert 5e5 < c.active_params < 2e6 and c.total_params < 5e6
  assert c.train_flops_per_token['standard'] < 1e7
