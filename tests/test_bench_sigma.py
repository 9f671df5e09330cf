"""`moescale bench --sections sigma`: record schema, ratios, speedups; and the σ-MoE layer on
its fast path ('fused', what 'auto' runs on XLA:CPU) against the reference loop, forward and
every gradient (router included). Tiny shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moescale import bench
from moescale.bench import sigma as bench_sigma
from moescale.bench import timing
from moescale.layers import dispatch, sigma_moe

SIGMA_EXTRAS = {'speedup', 'note'}  # the extras this section documents


def _quick(**kw):
  opts = bench.Options(quick=True, repeats=1, experts=(4,), tokens=(32,), **kw)
  return bench_sigma.run(opts, None)


def test_quick_run_records_schema_ratios_and_speedup():
  records = _quick(backends=('fused', 'fused:kernels=xla'))
  assert [r['backend'] for r in records] == ['dense', 'param_dense', 'fused', 'fused:kernels=xla']
  for r in records:
    assert set(timing.RECORD_KEYS) <= set(r) <= set(timing.RECORD_KEYS) | SIGMA_EXTRAS
    assert (r['name'], r['num_experts'], r['tokens'], r['baseline']) == (
        'sigma_moe', 4, 32, 'dense')
    assert r['seconds'] > 0 and r['ratio'] > 0
  assert records[0]['ratio'] == 1.0
  for r in records[2:]:
    assert r['speedup'] > 0   # param-matched dense time / σ-MoE time
  assert 'speedup' not in records[0] and 'speedup' not in records[1]
  assert timing.format_table(records).count('speedup=') == 2


def test_quick_defaults_and_a_skipped_parameter_matched_layer(monkeypatch):
  monkeypatch.setattr(bench_sigma, 'MAX_PARAM_DENSE_FLOPS', 0)
  records = _quick()  # quick: the default backend only
  by_backend = {r['backend']: r for r in records}
  assert set(by_backend) == {'dense', 'fused', 'param_dense'}
  skipped = by_backend['param_dense']
  assert skipped['seconds'] is None and skipped['ratio'] is None and 'd_ff=512' in skipped['note']
  assert by_backend['fused']['ratio'] > 0 and 'speedup' not in by_backend['fused']
  assert bench_sigma.param_dense_flops(128, 16384) > 1e12   # 3 x 2 matmuls of t x d x N_E*G


def test_section_is_registered():
  assert bench.SECTIONS['sigma'] == 'sigma'


def _layer_value_and_grads(dispatch_name, x, segment_ids, dy):
  layer = sigma_moe.SigmaMoE(16, 6, 8, 4, dispatch=dispatch_name, rngs=nnx.Rngs(3))
  graphdef, params = nnx.split(layer)

  def loss(params, x):
    y, _ = nnx.merge(graphdef, params)(x, deterministic=True, segment_ids=segment_ids)
    return jnp.vdot(y, dy), y
  (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
  return y, grads


@pytest.mark.parametrize('padded', [False, True])
def test_sigma_moe_fused_matches_reference_loop(padded):
  ks = jax.random.split(jax.random.key(0), 2)
  x = jax.random.normal(ks[0], (2, 7, 16))
  dy = jax.random.normal(ks[1], (2, 7, 16))
  segment_ids = jnp.array([[1] * 5 + [0] * 2, [1] * 7]) if padded else None
  want_y, want_g = _layer_value_and_grads('reference', x, segment_ids, dy)
  got_y, got_g = _layer_value_and_grads('fused', x, segment_ids, dy)
  np.testing.assert_allclose(got_y, want_y, rtol=1e-5, atol=1e-5)
  for got, want in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  if padded:
    np.testing.assert_array_equal(got_y[0, 5:], 0.0)
  # The router gets its gradient through the combine weights (sigmoid scores).
  assert float(jnp.abs(got_g[0]['w_router'][...]).sum()) > 0


def test_sigma_moe_default_dispatch_is_auto_and_runs_fused_on_cpu():
  """The layer's default dispatch is 'auto', which in a program built for CPU is the 'fused'
  path (its C++ kernel where it builds, else its XLA loop) and never ragged_dot (dense on
  XLA:CPU: E times the work)."""
  layer = sigma_moe.SigmaMoE(16, 6, 8, 4, rngs=nnx.Rngs(3))
  assert layer.dispatch.backend == 'auto'
  assert isinstance(dispatch.get_backend(layer.dispatch.backend), dispatch.Auto)
  graphdef, params = nnx.split(layer)
  x = jax.random.normal(jax.random.key(0), (2, 7, 16))
  fn = jax.jit(lambda params, x: nnx.merge(graphdef, params)(x, deterministic=True)[0])
  text = fn.lower(params, x).as_text(debug_info=True)
  assert 'dispatch_fused.py' in text
  assert 'ragged_dot' not in text and 'dispatch_ragged.py' not in text
