import math

from flax import nnx

from moescale.bench import Options, timing
from moescale.bench import pkm as bench_pkm
from moescale.layers import pkm_kernels


def test_flop_matched_d_ff_comes_from_the_module_cost():
  layer = nnx.eval_shape(bench_pkm.make_pkm)
  flops = layer.cost().flops
  # Csordás variant: no query projection, so only sub-key scoring and value reads.
  assert set(flops) == {'keys', 'values'}
  assert flops['keys'] == 2 * 4 * 128 * 256 and flops['values'] == 2 * 4 * 32 * 256
  assert bench_pkm.flop_matched_d_ff(layer) == 320


def test_quick_run_returns_stable_records():
  logged = []
  records = bench_pkm.run(Options(quick=True, repeats=1), logged.append)
  # 'sparse@xla' only where the default kernels are not XLA's (XLA:CPU with a compiler).
  kernels = pkm_kernels.get_kernels('auto').name
  extra = [] if kernels == 'xla' else ['sparse@xla']
  assert [r['backend'] for r in records] == ['dense', 'sparse', *extra, 'param_matched']
  for r in records:
    assert set(r) - {'speedup', 'note'} == set(timing.RECORD_KEYS)
    assert r['name'] == 'pkm' and r['num_experts'] is None
    assert r['tokens'] == bench_pkm.QUICK['tokens'][0]
    assert r['seconds'] > 0 and r['ratio'] > 0 and math.isfinite(r['ratio'])
  by = {r['backend']: r for r in records}
  dense, sparse, param = by['dense'], by['sparse'], by['param_matched']
  assert dense['baseline'] == sparse['baseline'] == 'dense' and dense['ratio'] == 1.0
  assert all(by[b]['baseline'] == 'dense' for b in extra)
  assert param['baseline'] == 'sparse'
  assert 'speedup' in sparse and sparse['speedup'] > 0
  assert sparse['note'] == f'kernels={kernels}'
  assert 'speedup' not in dense and 'speedup' not in param
  assert any('d_ff=320' in line for line in logged)
  assert 'speedup=' in timing.format_table(records)
  assert f'kernels={kernels}' in timing.format_table(records)


def test_tokens_option_overrides_the_grid(monkeypatch):
  seen = []
  monkeypatch.setattr(bench_pkm, 'bench_pkm', lambda t, repeats, log: seen.append(t) or [])
  bench_pkm.run(Options(quick=True, tokens=(64, 128)), None)
  assert seen == [64, 128]
  bench_pkm.run(Options(), None)
  assert seen[2:] == list(bench_pkm.FULL['tokens'])
