import math

from flax import nnx

from moescale import kernel_registry
from moescale.bench import Options, timing
from moescale.bench import pkm as bench_pkm
from moescale.layers import pkm_ops


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
  # 'sparse@xla' only where the default kernels are not XLA's (XLA:CPU with a compiler): those
  # a program built for this host runs.
  kernels = kernel_registry.on_host('pkm', 'auto', pkm_ops.XLA).name
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


def test_settled_rounds_time_only_the_second_of_two_calls(monkeypatch):
  # A fake clock that advances only inside the thunks: each call's duration is known, so the
  # recorded times show which calls were timed.
  clock = {'now': 0.0}
  monkeypatch.setattr(timing.time, 'perf_counter', lambda: clock['now'])
  calls = {'a': [], 'b': []}

  def thunk(name, cost):
    def f():
      calls[name].append(clock['now'])
      clock['now'] += cost(len(calls[name]))
      return 0
    return f
  # 'a' costs 5 s on every odd call, 1 s on even ones: settled, only the even ones are timed.
  fns = {'a': thunk('a', lambda n: 5.0 if n % 2 else 1.0), 'b': thunk('b', lambda n: 2.0)}
  times = timing.interleaved(fns, 3, settle=True)
  assert times == {'a': [1.0] * 3, 'b': [2.0] * 3}
  assert len(calls['a']) == len(calls['b']) == 2 + 2 * 3     # warm-up pair, then 2 per round
  plain = timing.interleaved(fns, 3)
  assert plain['a'] == [5.0, 1.0, 5.0] and len(calls['a']) == 8 + 2 + 3
