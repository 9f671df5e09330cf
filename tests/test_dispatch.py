"""Every dispatch backend against ReferenceLoop (forward and all gradients), plus the layouts,
the backend registry ('auto' follows the platform a program is built for), the backends under
jax.jacrev and vmapped gradients, and the benchmark's helpers. Tiny shapes: compile time
dominates."""

import functools
import json
import re

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from moescale import bench
from moescale import sharding as shd
from moescale.bench import moe as bench_moe
from moescale.bench import report, timing
from moescale.layers import dispatch, dispatch_ops

E, D, F = 5, 6, 10
EMPTY = 3  # no token is routed here in _problem: an expert with an empty group


def _problem(t=13, k=2, bias=True, seed=0, drop=0.2):
  """Random routing with dropped entries (sentinel E, nonzero weight: must still be skipped)
  and one empty expert."""
  ks = jax.random.split(jax.random.key(seed), 9)
  x = jax.random.normal(ks[0], (t, D))
  index = jax.random.randint(ks[1], (t, k), 0, E - 1)
  index = jnp.where(index >= EMPTY, index + 1, index)                     # skip EMPTY
  index = jnp.where(jax.random.uniform(ks[2], (t, k)) < drop, E, index).astype(jnp.int32)
  weights = jax.random.uniform(ks[3], (t, k), minval=0.1)
  experts = dispatch.ExpertWeights(
      jax.random.normal(ks[4], (E, D, F)) / D**0.5,
      jax.random.normal(ks[5], (E, F, D)) / F**0.5,
      jax.random.normal(ks[6], (E, F)) if bias else None,
      jax.random.normal(ks[7], (E, D)) if bias else None)
  cotangent = jax.random.normal(ks[8], (t, D))
  return x, index, weights, experts, cotangent


def _value_and_grads(backend, x, index, weights, experts, cotangent, capacity=None):
  def loss(x, weights, experts):
    y = backend(x, index, weights, experts, jax.nn.gelu, capacity=capacity)
    return jnp.vdot(y, cotangent), y
  # One jit per case: far faster to compile than op-by-op eager dispatch of the whole graph.
  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
  (_, y), grads = fn(x, weights, experts)
  return y, grads


BACKENDS = {
    # The XLA loop of 'fused' with its block sizes (remainder blocks of 2 and 4, blocks wider
    # than the groups, plain padding to blocks); then its default and its C++ kernel.
    'fused': lambda: dispatch.get_backend('fused', block_size=4, granule=2, kernels='xla'),
    'fused_wide': lambda: dispatch.get_backend('fused', block_size=8, granule=2, kernels='xla'),
    'fused_plain': lambda: dispatch.get_backend('fused', block_size=4, granule=4, kernels='xla'),
    'fused_default': lambda: dispatch.get_backend('fused'),
    'fused_cpu': lambda: dispatch.get_backend('fused', kernels='cpu'),
    'ragged': lambda: dispatch.get_backend('ragged'),
    'slots': lambda: dispatch.get_backend('slots'),
    'onehot': lambda: dispatch.get_backend('onehot'),
    # 'fused' in a program built for CPU (this one), 'ragged' elsewhere.
    'auto': lambda: dispatch.get_backend('auto'),
}
# k = 1, 2, 4 for every backend, biases on and off for each; fused variants (plain padding,
# wide blocks, default sizes) one or two cases each.
CASES = ([('fused', 1, False), ('fused', 2, True), ('fused_wide', 4, False),
          ('fused_plain', 4, True), ('fused_default', 2, False), ('fused_cpu', 1, True),
          ('fused_cpu', 2, False), ('fused_cpu', 4, True)]
         + [(n, k, b) for n in ('ragged', 'slots', 'onehot')
            for k, b in ((1, True), (2, False), (4, True))]
         + [('auto', 2, True)])


def _params(cases):
  """pytest params of cases that are a BACKENDS name or a tuple starting with one: the C++
  kernel's marked, so that they are skipped only where the kernels are not expected
  (conftest.py) and fail where those do not build."""
  name = lambda c: c if isinstance(c, str) else c[0]
  return [pytest.param(*((c,) if isinstance(c, str) else c), marks=pytest.mark.cpu_kernels)
          if name(c) == 'fused_cpu' else c for c in cases]


@functools.lru_cache(maxsize=None)
def _reference(k, bias):
  return _value_and_grads(dispatch.ReferenceLoop(), *_problem(k=k, bias=bias, seed=k))


@pytest.mark.parametrize('name,k,bias', _params(CASES))
def test_backend_matches_reference_forward_and_gradients(name, k, bias):
  x, index, weights, experts, cot = _problem(k=k, bias=bias, seed=k)
  capacity = index.size  # never binding: these backends must then be exact
  want_y, want_g = _reference(k, bias)
  got_y, got_g = _value_and_grads(BACKENDS[name](), x, index, weights, experts, cot, capacity)
  np.testing.assert_allclose(got_y, want_y, rtol=1e-5, atol=1e-5)
  assert jax.tree.structure(got_g) == jax.tree.structure(want_g)
  for got, want in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  # The empty expert and dropped assignments get exactly zero gradient.
  np.testing.assert_array_equal(got_g[2].w_in[EMPTY], 0.0)
  np.testing.assert_array_equal(jnp.where(index == E, got_g[1], 0.0), 0.0)


@functools.lru_cache(maxsize=None)
def _edge_problem(t):
  """The problem of `test_backend_on_zero_tokens_and_one_token` at t tokens, with
  ReferenceLoop's (y, grads) on it: one compile of the reference for every backend."""
  x, _, weights, experts, cot = _problem(t=2, k=2, bias=True, seed=11)
  index = jnp.array([[4, 1], [0, 2]], jnp.int32)
  problem = x[:t], index[:t], weights[:t], experts, cot[:t]
  return problem, _value_and_grads(dispatch.ReferenceLoop(), *problem)


@pytest.mark.parametrize('t', [0, 1])
@pytest.mark.parametrize('name', _params(
    ['fused', 'fused_cpu', 'ragged', 'slots', 'onehot', 'auto']))
def test_backend_on_zero_tokens_and_one_token(name, t):
  """x [t, d] with t = 0 (a shard or batch with no tokens) and t = 1: forward and every
  gradient equal ReferenceLoop's, and all finite. t = 0 killed the XLA loop of 'fused'
  (blocks of 0 rows: a division by zero) and 'slots' (a gather from the empty x) until
  dispatch_fused.Fused.sizes floored blocks at one granule and the gathers of
  dispatch_ops._take / dispatch_fused._gather built their zeros for an empty source; removing
  either fails here. t = 1 sends one token to two experts (a block, slot or group of one)."""
  (x, index, weights, experts, cot), (want_y, want_g) = _edge_problem(t)
  got_y, got_g = _value_and_grads(BACKENDS[name](), x, index, weights, experts, cot,
                                  capacity=max(1, t))
  assert got_y.shape == (t, D) and jax.tree.structure(got_g) == jax.tree.structure(want_g)
  np.testing.assert_allclose(got_y, want_y, rtol=1e-5, atol=1e-5)
  for got, want in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
    assert got.shape == want.shape and np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  # Experts no token reached (all of them at t = 0) get exactly zero gradient.
  unused = np.setdiff1d(np.arange(E), np.asarray(index))
  for g in got_g[2]:
    np.testing.assert_array_equal(np.asarray(g)[unused], 0.0)


def test_fused_in_bf16_keeps_dtype_and_tracks_fp32():
  x, index, weights, experts, _ = _problem(bias=False)
  loop = dispatch.get_backend('fused', block_size=4, granule=2)
  backend = jax.jit(lambda x, experts: loop(x, index, weights, experts, jax.nn.gelu))
  y16 = backend(x.astype(jnp.bfloat16), jax.tree.map(lambda a: a.astype(jnp.bfloat16), experts))
  assert y16.dtype == jnp.bfloat16
  y32 = dispatch.ReferenceLoop()(x, index, weights, experts, jax.nn.gelu)
  np.testing.assert_allclose(y16.astype(jnp.float32), y32, atol=0.1, rtol=0.05)


def _shapes_in(jaxpr):
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      yield tuple(getattr(var.aval, 'shape', ()))
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from _shapes_in(sub)


def _per_iteration_weight_copies(fn, *args):
  """Shapes [n, d, f] / [n, f, d] with n not in (1, E) anywhere in fn's jaxpr (e.g. a scan's stacked
  residuals: one expert weight slice saved per loop iteration)."""
  shapes = set(_shapes_in(jax.make_jaxpr(fn)(*args).jaxpr))
  return {s for s in shapes if len(s) == 3 and s[1:] in ((D, F), (F, D)) and s[0] not in (1, E)}


def test_fused_backward_keeps_no_per_iteration_weight_copies():
  # The XLA loop: the C++ kernel has no loop to stack anything in.
  x, index, weights, experts, cot = _problem(t=40, k=2, bias=False)
  backend = dispatch.get_backend('fused', block_size=4, granule=4, kernels='xla')
  grad = jax.grad(lambda x, e: jnp.vdot(backend(x, index, weights, e, jax.nn.relu), cot),
                  argnums=(0, 1))
  assert not _per_iteration_weight_copies(grad, x, experts)

  # The detector works: plain autodiff of a scan over blocks does stack the weight slices.
  layout, plan = jax.jit(lambda index: dispatch_ops.blocked_layout(
      dispatch_ops.sort_and_rank(index, E), index.shape, 4, 4))(index)

  def naive(x, e):
    rows = dispatch_ops.permute(x, layout)
    def body(out, b):
      off, ex = plan.offset[b], plan.expert[b]
      xb = jax.lax.dynamic_slice_in_dim(rows, off, 4)
      o = jax.nn.relu(xb @ e.w_in[ex]) @ e.w_out[ex]
      return jax.lax.dynamic_update_slice_in_dim(out, o, off, 0), None
    out, _ = jax.lax.scan(body, jnp.zeros_like(rows), jnp.arange(plan.expert.shape[0]))
    return jnp.vdot(dispatch_ops.combine(out, weights, layout), cot)
  assert _per_iteration_weight_copies(jax.grad(naive, argnums=(0, 1)), x, experts)


def test_sort_assignments_is_stable_with_dropped_last():
  index = jnp.array([[2, 0], [0, 3], [2, 1], [3, 0]], jnp.int32)  # E=3: 3 means dropped
  order, sizes = dispatch_ops.sort_assignments(index, 3)
  np.testing.assert_array_equal(order, [1, 2, 7, 5, 0, 4, 3, 6])
  np.testing.assert_array_equal(sizes, [3, 1, 2])


@pytest.mark.parametrize('num_experts', [2**21 - 1, 2**21])
def test_sort_and_rank_is_stable_on_both_sides_of_the_int32_key_limit(num_experts):
  """The fast path sorts int32 keys expert * n + pair; n * (E + 1) >= 2**31 would overflow
  them (E + 1 = 2**21, n = 1024 is the limit), so the stable argsort takes over there."""
  n = 1024
  rng = np.random.default_rng(0)
  flat = rng.integers(0, num_experts + 1, n).astype(np.int32)   # num_experts = dropped
  flat[-8:] = num_experts                                       # the largest keys
  s = jax.jit(dispatch_ops.sort_and_rank, static_argnums=1)(jnp.asarray(flat[:, None]),
                                                            num_experts)
  order = np.argsort(flat, kind='stable')
  np.testing.assert_array_equal(s.order, order)
  np.testing.assert_array_equal(s.sorted_expert, flat[order])


def test_blocked_layout_blocks_are_single_expert_and_padding_below_granule():
  _, index, *_ = _problem(t=50, k=2, seed=7)
  block, granule = 8, 2
  s = jax.jit(dispatch_ops.sort_and_rank, static_argnums=1)(index, E)
  layout, plan = jax.jit(dispatch_ops.blocked_layout, static_argnums=(1, 2, 3))(
      s, index.shape, block, granule)
  flat = np.asarray(index).reshape(-1)
  pair_of_row = np.asarray(layout.pair_of_row)
  n = flat.size
  # A bijection between kept assignments and used rows; dropped ones map out of range.
  row_of = np.asarray(layout.row_of).reshape(-1)
  kept = flat < E
  np.testing.assert_array_equal(pair_of_row[row_of[kept]], np.nonzero(kept)[0])
  assert (row_of[~kept] == layout.num_rows).all()
  covered = 0
  for b in range(int(plan.count)):
    off, size = int(plan.offset[b]), (int(plan.size_class[b]) + 1) * granule
    pairs = pair_of_row[off:off + size]
    assert (flat[pairs[pairs < n]] == int(plan.expert[b])).all()
    covered += size
  assert covered == sum(-(-int(g) // granule) * granule for g in s.group_sizes)
  assert covered - kept.sum() < E * granule
  assert int(plan.count) <= plan.expert.shape[0] == -(-n // block) + E
  assert layout.num_rows >= max(covered, block)


@pytest.mark.parametrize('name', ['slots', 'onehot'])
def test_capacity_backends_drop_assignments_beyond_capacity(name):
  """Pairs the router dropped (sentinel E, with a nonzero weight) and pairs ranked at or past
  `capacity` in their expert's group, which these backends drop themselves: forward and every
  gradient (x, weights, each expert weight and bias) equal ReferenceLoop's on the same
  assignments with the over-capacity ones set to the sentinel, and every dropped pair's
  weight gets exactly zero gradient. Kills e.g. slot_layout keeping ranks >= capacity (they
  would write into the next expert's slots), or combine's backward reading a dropped pair's
  row clipped to the last one instead of as zeros (a nonzero weight gradient)."""
  x, index, weights, experts, cot = _problem(t=20, k=2, bias=True)
  capacity = 3
  # Expected: the stable sort keeps, per expert, the first `capacity` kept pairs in token order.
  flat = np.asarray(index).reshape(-1).copy()
  for e in range(E):
    flat[np.nonzero(flat == e)[0][capacity:]] = E
  kept = jnp.asarray(flat.reshape(index.shape))
  assert (index == E).any() and ((kept == E) & (index < E)).any()   # both kinds of drops
  want_y, want_g = _value_and_grads(dispatch.ReferenceLoop(), x, kept, weights, experts, cot)
  got_y, got_g = _value_and_grads(dispatch.get_backend(name), x, index, weights, experts, cot,
                                  capacity=capacity)
  np.testing.assert_allclose(got_y, want_y, rtol=1e-5, atol=1e-5)
  for got, want in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(jnp.where(kept == E, got_g[1], 0.0), 0.0)


@pytest.mark.parametrize('name', ['slots', 'onehot'])
def test_capacity_backends_require_capacity(name):
  x, index, weights, experts, _ = _problem()
  with pytest.raises(ValueError, match='needs capacity'):
    dispatch.get_backend(name)(x, index, weights, experts, jax.nn.relu)


def test_registry_and_auto():
  auto = dispatch.get_backend('auto')
  assert isinstance(auto, dispatch.Auto) and auto.name == 'auto'
  assert dispatch.get_backend().name == 'auto'            # the default
  assert {'reference', 'auto', 'fused', 'ragged', 'slots', 'onehot'} <= set(
      dispatch.available_backends())
  assert 'blocked' not in dispatch.available_backends()
  assert dispatch.get_backend('fused', block_size=8).block_size == 8
  mine = dispatch.ReferenceLoop()
  assert dispatch.get_backend(mine) is mine               # passed through, nothing wrapped
  with pytest.raises(ValueError, match="unknown dispatch backend 'nope'.*fused"):
    dispatch.get_backend('nope')
  with pytest.raises(ValueError, match="unknown dispatch backend 'blocked'"):
    dispatch.Dispatch('blocked')                          # a family fails at construction


def _auto_program():
  x, index, weights, experts, _ = _problem()
  auto = dispatch.get_backend('auto')
  return jax.jit(lambda x, w: auto(x, index, w, experts, jax.nn.relu)), (x, weights)


CUSTOM_CALL = re.compile(r'custom_call @([\w.$-]+)')


def test_auto_runs_fused_in_cpu_programs_and_ragged_in_accelerator_programs():
  """'auto' follows the platform the program is built for (jax.lax.platform_dependent), not
  the host: built for this CPU host it lowers the fused dispatch and no ragged_dot (XLA:CPU
  runs ragged_dot densely, E times the work); exported for TPU or CUDA from here it lowers
  ragged_dot and no CPU kernel. Kills a choice made from jax.default_backend() (a TPU program
  exported from a CPU machine would get the CPU path) or an 'auto' that is one fixed backend."""
  fn, args = _auto_program()
  # With debug info the locations name the source: ragged_dot (the primitive) and the modules.
  cpu = fn.lower(*args).as_text(debug_info=True)
  assert 'dispatch_fused.py' in cpu
  assert 'ragged_dot' not in cpu and 'dispatch_ragged.py' not in cpu
  # The detector works: the 'ragged' backend built for CPU names its ragged_dot.
  x, index, weights, experts, _ = _problem()
  ragged = dispatch.get_backend('ragged')
  assert 'ragged_dot' in jax.jit(lambda x, w: ragged(x, index, w, experts, jax.nn.relu)).lower(
      x, weights).as_text(debug_info=True)
  for platform in ('tpu', 'cuda'):
    module = jax.export.export(fn, platforms=[platform])(*args).mlir_module()
    assert 'chlo.ragged_dot' in module, platform
    assert not [c for c in CUSTOM_CALL.findall(module) if c.startswith('moescale')], platform


@pytest.mark.cpu_kernels
def test_auto_cpu_program_runs_the_fused_kernel_on_one_device_and_xla_under_a_mesh():
  """On one device the CPU program of 'auto' is the fused dispatch as one C++ kernel; under a
  multi-device mesh the XLA loop (XLA cannot split a custom call: it would repeat it whole on
  every device)."""
  fn, args = _auto_program()
  assert CUSTOM_CALL.findall(fn.lower(*args).as_text()) == ['moescale_moe_ffn']
  with jax.set_mesh(shd.make_mesh(devices=jax.devices()[:2])):
    fn, args = _auto_program()    # traced under the mesh
    text = fn.lower(*args).as_text()
  assert not [c for c in CUSTOM_CALL.findall(text) if c.startswith('moescale')]
  assert 'stablehlo.while' in text   # the XLA loop


def _per_example(backend, xs, indexes, weights, experts, cots):
  """jax.jacrev of one example's y wrt (x, weights, experts) and per-example gradients of
  <y, cot> (jax.vmap of jax.grad over examples, each with its own routing; the expert
  weights unbatched)."""
  y = lambda x, index, w, ex: backend(x, index, w, ex, jax.nn.gelu)
  jac = jax.jit(jax.jacrev(y, argnums=(0, 2, 3)))(xs[0], indexes[0], weights[0], experts)
  loss = lambda x, index, w, ex, cot: jnp.vdot(y(x, index, w, ex), cot)
  grads = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 2, 3)), in_axes=(0, 0, 0, None, 0)))(
      xs, indexes, weights, experts, cots)
  return jac, grads


@pytest.mark.parametrize('name', ['ragged', 'auto'])
def test_backend_under_jacrev_and_vmapped_gradients_equals_reference(name):
  """jax.jacrev (a vmap over cotangents, the operands unbatched) and per-example gradients
  (vmap of grad, the expert weights unbatched) equal ReferenceLoop's. Kills 'ragged' on bare
  jax.lax.ragged_dot, which batches only when every operand is batched at dimension 0
  ("ragged_dot vmap over any dim but 0 - NYI"); 'auto' traces that branch too."""
  problems = [_problem(t=5, k=2, seed=20 + i) for i in range(3)]
  xs, indexes, weights, cots = (jnp.stack([p[i] for p in problems]) for i in (0, 1, 2, 4))
  experts = problems[0][3]
  got = _per_example(BACKENDS[name](), xs, indexes, weights, experts, cots)
  want = _per_example(dispatch.ReferenceLoop(), xs, indexes, weights, experts, cots)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.shape == w.shape
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_bench_helpers():
  index, weights = bench_moe.random_routing(jax.random.key(0), 64, 8, 2)
  assert index.shape == (64, 2) and (index[:, 0] != index[:, 1]).all()
  np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)
  assert bench_moe.skip_reason('ragged', 512, 16384, 'cpu') and not bench_moe.skip_reason(
      'ragged', 512, 16384, 'gpu')
  assert bench_moe.skip_reason('onehot', 8, 16384, 'cpu') and not bench_moe.skip_reason(
      'fused', 512, 16384, 'cpu')
  assert bench_moe.parse_backend('fused:block_size=64:granule=16:kernels=xla') == (
      'fused', {'block_size': 64, 'granule': 16, 'kernels': 'xla'})
  # The same specs in get_backend (and so in gin bindings), with clear errors.
  assert dispatch.get_backend('fused:kernels=xla:block_size=8').kernels == 'xla'
  with pytest.raises(ValueError, match=r"'fused' does not take options \{'kernal': 'xla'\}.*"
                                       r"'kernels'"):
    dispatch.get_backend('fused:kernal=xla')
  with pytest.raises(ValueError, match=r"option 'xla' in 'fused:xla' is not key=value"):
    dispatch.get_backend('fused:xla')
  table = timing.format_table([timing.skipped('moe_top2', 'ragged', 512, 16384, 'dense',
                                              'ragged_dot is dense')])
  assert 'skipped' in table and 'ragged_dot is dense' in table
  with pytest.raises(ValueError, match='unknown record keys'):
    timing.record('x', 'y', None, 1, 1.0, 1.0, 'y', speed=2)


def test_bench_report_markdown_has_the_machine_and_a_table_per_benchmark():
  """docs/performance.md as `moescale bench --markdown` writes it: the machine line, one
  section per benchmark name in first-seen order with its rows in a table, a skipped row shown
  as skipped with its reason, and extra columns only where some row has the key."""
  records = [
      timing.record('moe_top2', 'dense', 8, 1024, 0.0123, 1.0, 'dense'),
      timing.record('moe_top2', 'fused', 8, 1024, 0.0150, 1.22, 'dense'),
      timing.skipped('moe_top2', 'ragged', 512, 16384, 'dense', 'ragged_dot is dense'),
      timing.record('sigma_moe', 'fused', 16, 1024, 0.02, 1.5, 'dense', speedup=2.5),
  ]
  meta = {'date': '2025-01-02', 'platform': 'cpu', 'device': 'cpu', 'cpu': 'Test CPU',
          'cores': '2', 'jax': '0.0.1'}
  page = report.markdown(records, meta, 'moescale bench --quick')
  lines = page.splitlines()
  assert lines[0] == '# Performance'
  assert 'Generated by `moescale bench --quick` on 2025-01-02' in page
  assert 'Machine: Test CPU, 2 cores; JAX 0.0.1 on cpu (cpu).' in page
  sections = [l for l in lines if l.startswith('## ')]
  assert sections == ['## ' + report.TITLES['moe_top2'], '## ' + report.TITLES['sigma_moe']]
  moe = lines[lines.index(sections[0]) + 2:lines.index(sections[1]) - 1]
  assert moe[0] == '| backend | experts | tokens | seconds | ratio | vs | note |'
  assert moe[1] == '|---|---|---|---|---|---|---|'
  assert moe[2:] == ['| dense | 8 | 1024 | 0.0123 | 1.00x | dense |  |',
                     '| fused | 8 | 1024 | 0.0150 | 1.22x | dense |  |',
                     '| ragged | 512 | 16384 | skipped |  | dense | ragged_dot is dense |']
  sigma = lines[lines.index(sections[1]) + 2:]
  assert sigma[0] == '| backend | experts | tokens | seconds | ratio | vs | speedup |'
  assert sigma[2] == '| fused | 16 | 1024 | 0.0200 | 1.50x | dense | 2.50x |'
  # Without machine facts (--from_json) the page still renders, with '?' for each.
  assert 'Machine: ?, ? cores' in report.markdown(records[:1], {}, 'moescale bench')


def test_bench_capacity_row_runs_the_routers_dropping_then_the_backend():
  """'fused@capacity' must compute what TopKMoE(capacity_factor=1.0) computes: choice-major
  priority (every first choice before any second), the first `capacity` kept per expert."""
  x, index, weights, experts, dy = _problem(t=20, k=2, drop=0.0)
  capacity = 3
  flat = np.asarray(index).T.reshape(-1).copy()           # choice-major: n = j * t + token
  for e in range(E):
    flat[np.nonzero(flat == e)[0][capacity:]] = E
  kept_index = jnp.asarray(flat.reshape(2, -1).T)
  kept_weights = jnp.where(kept_index < E, weights, 0)
  dropped = (kept_index == E).sum(0)                      # per choice
  assert dropped.sum() > 0 and dropped[1] > dropped[0]

  def want(x, experts):
    return jnp.vdot(dispatch.ReferenceLoop()(x, kept_index, kept_weights, experts, jax.nn.relu), dy)
  want_loss, want_grads = jax.jit(jax.value_and_grad(want, argnums=(0, 1)))(x, experts)
  step = bench_moe._moe_step(dispatch.get_backend('fused', block_size=4, granule=2), capacity,
                             route_capacity=True)
  loss, grads = step(x, experts, index, weights, dy)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  for got, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_bench_main_json_records_and_markdown(capsys, tmp_path):
  page = tmp_path / 'performance.md'
  records = bench.main(['--json', '--sections', 'moe', '--tokens', '32', '--experts', '4',
                        '--backends', 'fused', '--repeats', '1', '--markdown', str(page)])
  printed = json.loads(capsys.readouterr().out)
  assert printed == records
  # --markdown writes the page from the same records, naming the command that made it.
  text = page.read_text()
  assert 'Generated by `moescale bench --sections moe --tokens 32' in text
  assert '## ' + report.TITLES['moe_top2'] in text and '| fused | 4 | 32 | ' in text
  # ... and --from_json renders saved records without running anything.
  saved = tmp_path / 'bench.json'
  saved.write_text(json.dumps(records))
  again = tmp_path / 'again.md'
  assert bench.main(['--from_json', str(saved), '--markdown', str(again)]) == records
  tables = lambda t: [l for l in t.splitlines() if l.startswith(('|', '## '))]
  assert tables(again.read_text()) == tables(text)
  assert {(r['name'], r['backend']) for r in records} == {
      ('moe_top2', 'dense'), ('moe_top2', 'fused'), ('dense_ffn', 'plain'),
      ('dense_ffn', 'DenseFFN')}
  for r in records:
    assert set(r) == set(timing.RECORD_KEYS)
    assert r['baseline'] == ('dense' if r['name'] == 'moe_top2' else 'plain')
    assert r['seconds'] > 0 and r['ratio'] > 0


# ------------------------------------------------------------------------- expert dropout


def _dropout(t, k, rate=0.4, seed=5):
  # Ids offset by 100: a backend that used its own row positions instead would differ.
  return dispatch.ExpertDropout(jax.random.key(seed),
                                jnp.arange(t * k, dtype=jnp.int32).reshape(t, k) + 100,
                                rate=rate, units=F)


def _dropout_value_and_grads(backend, x, index, weights, experts, cotangent, drop):
  def loss(x, weights, experts):
    y = backend(x, index, weights, experts, jax.nn.gelu, index.size, drop)
    return jnp.vdot(y, cotangent), y
  (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
      x, weights, experts)
  return y, grads


@functools.lru_cache(maxsize=None)
def _dropout_reference(k):
  problem = _problem(k=k, bias=True, seed=k)
  return _dropout_value_and_grads(dispatch.ReferenceLoop(), *problem,
                                  _dropout(problem[0].shape[0], k))


def test_expert_dropout_masks_each_assignments_hidden_units():
  """The definition, by hand: y[t] = w[t] * ((gelu(x W_in + b_in) * m[t]) W_out + b_out) with
  m[t] = scale_of_ids(id of (t, 0)). Kills a mask applied before the activation, to the output,
  or keyed by row position rather than by the assignment's id."""
  x, index, weights, experts, _ = _problem(k=1, bias=True, seed=1)
  drop = _dropout(x.shape[0], 1)
  y = np.asarray(dispatch.ReferenceLoop()(x, index, weights, experts, jax.nn.gelu, None, drop))
  m = np.asarray(drop.scale_of_ids(drop.pair[:, 0], F, jnp.float32))
  assert np.all((m == 0) | np.isclose(m, 1 / 0.6)) and 0 < (m == 0).mean() < 1
  for t, e in enumerate(np.asarray(index)[:, 0]):
    if e == E:
      np.testing.assert_array_equal(y[t], 0.0)
      continue
    h = np.asarray(jax.nn.gelu(x[t] @ experts.w_in[e] + experts.b_in[e])) * m[t]
    want = weights[t, 0] * (h @ np.asarray(experts.w_out[e]) + np.asarray(experts.b_out[e]))
    np.testing.assert_allclose(y[t], want, rtol=1e-5, atol=1e-5)


def test_expert_dropout_scale_is_a_function_of_key_id_and_unit():
  drop = dispatch.ExpertDropout(jax.random.key(0), jnp.zeros((1, 1), jnp.int32), rate=0.25,
                                units=64)
  ids = jnp.arange(2000, dtype=jnp.int32)
  m = np.asarray(drop.scale_of_ids(ids, 64, jnp.float32))
  assert abs((m == 0).mean() - 0.25) < 0.01 and np.all((m == 0) | np.isclose(m, 4 / 3))
  np.testing.assert_array_equal(m[5:7], np.asarray(drop.scale_of_ids(ids[5:7], 64, jnp.float32)))
  assert np.any(m[0] != m[1])                      # ids differ -> masks differ
  other = dispatch.ExpertDropout(jax.random.key(1), drop.pair, rate=0.25, units=64)
  assert np.any(np.asarray(other.scale_of_ids(ids[:4], 64, jnp.float32)) != m[:4])
  # A tensor-parallel slice of the hidden units reads its part of the same mask.
  part = dispatch.ExpertDropout(drop.key, drop.pair, 16, rate=0.25, units=64)
  np.testing.assert_array_equal(np.asarray(part.scale_of_ids(ids[:8], 16, jnp.float32)),
                                m[:8, 16:32])
  for bad in (0.0, 1.0, -0.1):
    with pytest.raises(ValueError, match='must be in \\(0, 1\\)'):
      dispatch.ExpertDropout(drop.key, drop.pair, rate=bad, units=64)


@pytest.mark.parametrize('name,k', [('fused', 2), ('fused_plain', 4), ('fused_default', 1),
                                    ('ragged', 2), ('slots', 4), ('onehot', 2), ('auto', 2)])
def test_backend_with_expert_dropout_matches_reference(name, k):
  """Every backend draws the reference's masks (by assignment id, wherever it puts the row)
  and differentiates through them: forward and every gradient equal ReferenceLoop's."""
  problem = _problem(k=k, bias=True, seed=k)
  want_y, want_g = _dropout_reference(k)
  got_y, got_g = _dropout_value_and_grads(BACKENDS[name](), *problem,
                                          _dropout(problem[0].shape[0], k))
  np.testing.assert_allclose(got_y, want_y, rtol=1e-5, atol=1e-5)
  for got, want in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  # And the masks matter: without them the output differs.
  plain_y, _ = _reference(k, True)
  assert np.abs(np.asarray(plain_y) - np.asarray(want_y)).max() > 0.1


def test_fused_cpu_kernels_refuse_expert_dropout():
  x, index, weights, experts, _ = _problem(k=2, seed=2)
  with pytest.raises(ValueError, match="'cpu' moe_ffn kernels have no expert dropout"):
    dispatch.get_backend('fused', kernels='cpu')(x, index, weights, experts, jax.nn.gelu, None,
                                                 _dropout(x.shape[0], 2))
