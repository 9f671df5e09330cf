"""Expert parallelism (ring and all-to-all exchange) against ReferenceLoop on one device, the
all-to-all's capacity dropping against a plain loop, and the exchange selection: a family's
`dispatch.Dispatch` runs its exchange under JAX's current mesh (jax.set_mesh / shd.use_mesh)
when that mesh has an `expert` axis > 1, with no state of moescale's own."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moescale import sharding as shd
from moescale.layers import dispatch, expert_exchange, expert_parallel
from moescale.layers.dispatch_fused import Fused
from moescale.layers.expert_parallel import ExpertParallel

E, D, F, K = 8, 6, 10, 2
MESHES = {
    'data2_expert4': dict(data=2, expert=4),
    'data2_tensor2_expert2': dict(data=2, tensor=2, expert=2),
}


def _problem(t=16, seed=0, drop=0.1):
  """Random top-2 routing over E experts, some assignments dropped by the 'router'."""
  ks = jax.random.split(jax.random.key(seed), 9)
  x = jax.random.normal(ks[0], (t, D))
  index = jax.random.randint(ks[1], (t, K), 0, E)
  index = jnp.where(jax.random.uniform(ks[2], (t, K)) < drop, E, index).astype(jnp.int32)
  weights = jax.random.uniform(ks[3], (t, K), minval=0.1)
  experts = dispatch.ExpertWeights(
      jax.random.normal(ks[4], (E, D, F)) / D**0.5, jax.random.normal(ks[5], (E, F, D)) / F**0.5,
      jax.random.normal(ks[6], (E, F)), jax.random.normal(ks[7], (E, D)))
  return x, index, weights, experts, jax.random.normal(ks[8], (t, D))


def _value_and_grads(backend, x, index, weights, experts, cotangent):
  """(y, grads wrt (x, weights, experts), the exchange's dropped fraction or None)."""
  def loss(x, weights, experts):
    args = (x, index, weights, experts, jax.nn.gelu)
    y, dropped = backend.apply(*args) if hasattr(backend, 'apply') else (backend(*args), None)
    return jnp.vdot(y, cotangent), (y, dropped)
  # One jit per case: far faster to compile than op-by-op eager dispatch of the whole graph.
  (_, (y, dropped)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
      x, weights, experts)
  return y, grads, dropped


def _assert_close(got, want):
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
  assert jax.tree.structure(got[1]) == jax.tree.structure(want[1])
  for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


@functools.lru_cache(maxsize=None)
def _reference():
  return _value_and_grads(dispatch.ReferenceLoop(), *_problem())


def _inner():
  # The XLA loop of 'fused' with small blocks: a multi-block loop on each device's experts.
  return Fused(block_size=4, granule=2, kernels='xla')


def _ep(mesh_name, exchange, capacity_factor=None):
  """(the expert-parallel backend, the mesh to trace it under)."""
  return (ExpertParallel(_inner(), exchange, capacity_factor),
          shd.make_mesh(**MESHES[mesh_name]))


@pytest.mark.parametrize('mesh_name,exchange', [
    ('data2_expert4', 'all_to_all'), ('data2_tensor2_expert2', 'all_to_all'),
    ('data2_tensor2_expert2', 'ring')])
def test_dropless_exchange_matches_reference_forward_and_gradients(mesh_name, exchange):
  backend, mesh = _ep(mesh_name, exchange)
  with shd.use_mesh(mesh):
    got = _value_and_grads(backend, *_problem())
  _assert_close(got, _reference())
  assert float(got[2]) == 0.0


def _drop_over_buffers(index, num_sources, num_shards, capacity):
  """The all-to-all's dropping as a plain loop: each source's first `capacity` assignments
  (token, choice order) per destination shard are kept, the rest become the sentinel E."""
  index = np.asarray(index).copy()
  rows, local = index.shape[0] // num_sources, E // num_shards
  routed = dropped = 0
  for source in range(num_sources):
    used = [0] * num_shards
    for t in range(source * rows, (source + 1) * rows):
      for j in range(index.shape[1]):
        if index[t, j] >= E:
          continue
        routed += 1
        shard = index[t, j] // local
        if used[shard] < capacity:
          used[shard] += 1
        else:
          index[t, j], dropped = E, dropped + 1
  return index, dropped / routed


@pytest.mark.parametrize('mesh_name', list(MESHES))
def test_capacity_drops_exactly_the_assignments_over_the_buffer(mesh_name):
  x, index, weights, experts, cot = _problem(t=32, seed=1)
  backend, mesh = _ep(mesh_name, 'all_to_all', capacity_factor=1.0)
  num_shards = mesh.shape['expert']
  num_sources = 8 // mesh.shape['tensor']   # devices holding different tokens
  # 32 tokens over `num_sources` devices, top-2: C = ceil(1.0 * rows * 2 / P).
  capacity = expert_exchange.buffer_capacity(32 // num_sources, K, num_shards, 1.0)
  kept_index, want_fraction = _drop_over_buffers(index, num_sources, num_shards, capacity)
  assert 0.05 < want_fraction < 0.5  # the case does drop, and keeps most
  want = _value_and_grads(dispatch.ReferenceLoop(), x, jnp.asarray(kept_index), weights,
                          experts, cot)
  with shd.use_mesh(mesh):
    got = _value_and_grads(backend, x, index, weights, experts, cot)
  _assert_close(got, want)
  np.testing.assert_allclose(got[2], want_fraction, rtol=1e-6)
  np.testing.assert_allclose(expert_exchange.dropped_fraction(
      index, E, num_sources, num_shards, 1.0), want_fraction, rtol=1e-6)


def test_dropless_buffer_drops_nothing_even_when_all_go_to_one_shard():
  x, _, weights, experts, _ = _problem()
  index = jnp.zeros((16, K), jnp.int32).at[:, 1].set(1)  # experts 0 and 1: both on shard 0
  backend, mesh = _ep('data2_expert4', 'all_to_all')
  with shd.use_mesh(mesh):
    y, fraction = jax.jit(lambda x: backend.apply(x, index, weights, experts, jax.nn.relu))(x)
  want = jax.jit(lambda x: dispatch.ReferenceLoop()(x, index, weights, experts, jax.nn.relu))(x)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  assert float(fraction) == 0.0
  assert float(expert_exchange.dropped_fraction(index, E, 8, 4, None)) == 0.0
  # The same routing through a bounded buffer: C = 1 of 4 assignments per device survives.
  assert float(expert_exchange.dropped_fraction(index, E, 8, 4, 1.0)) == 0.75


def test_hlo_has_all_to_all_only_for_the_all_to_all_exchange():
  x, index, weights, experts, _ = _problem()

  def hlo(exchange):
    backend, mesh = _ep('data2_expert4', exchange)
    fn = lambda x, w: backend(x, index, w, experts, jax.nn.relu)
    with shd.use_mesh(mesh):
      return jax.jit(fn).lower(x, weights).as_text()

  a2a, ring = hlo('all_to_all'), hlo('ring')
  assert 'all_to_all' in a2a or 'all-to-all' in a2a
  assert 'all_to_all' not in ring and 'all-to-all' not in ring
  assert 'all_gather' in ring or 'all-gather' in ring


def test_buffer_capacity():
  assert expert_exchange.buffer_capacity(512, 2, 4) == 1024          # dropless: t * k
  assert expert_exchange.buffer_capacity(512, 2, 4, 0.0) == 1024
  assert expert_exchange.buffer_capacity(512, 2, 4, 1.25) == 320     # the docstring's example
  assert expert_exchange.buffer_capacity(10, 2, 4, 1.2) == 6         # no float-error extra row
  assert expert_exchange.buffer_capacity(4, 2, 4, 0.01) == 1
  assert expert_exchange.buffer_capacity(4, 2, 4, 100.0) == 8        # never beyond t * k


def test_exchange_selection_and_errors():
  inner = dispatch.ReferenceLoop()
  with pytest.raises(ValueError, match=r"unknown expert exchange 'nope'.*'ring', 'all_to_all'"):
    ExpertParallel(inner, exchange='nope')
  # A family's choice fails when the family is built, not when it first traces.
  with pytest.raises(ValueError, match='unknown expert exchange'):
    dispatch.Dispatch('fused', exchange='alltoall')
  with pytest.raises(ValueError, match="capacity_factor=1.0 .* 'ring' exchange is always dropless"):
    ExpertParallel(inner, exchange='ring', capacity_factor=1.0)
  with pytest.raises(ValueError, match="capacity_factor=1.0 .* 'ring' exchange is always dropless"):
    dispatch.Dispatch('fused', exchange_capacity_factor=1.0)
  default = ExpertParallel(inner)
  assert (default.exchange, default.capacity_factor) == ('ring', None)
  family = dispatch.Dispatch()
  assert (family.exchange, family.exchange_capacity_factor) == ('ring', None)
  wrapped = ExpertParallel(dispatch.get_backend('fused'), 'all_to_all', 1.5)
  assert (wrapped.exchange, wrapped.capacity_factor) == ('all_to_all', 1.5)
  assert wrapped.name == 'expert_parallel[all_to_all](fused)'
  # The expert shards are the current mesh's `expert` axis, read while tracing.
  assert expert_parallel.expert_shards() == 1
  with shd.use_mesh(shd.make_mesh(data=2, expert=4)):
    assert expert_parallel.expert_shards() == 4
  with jax.set_mesh(shd.make_mesh(data=8)):
    assert expert_parallel.expert_shards() == 1
  assert expert_parallel.expert_shards() == 1          # nothing left behind


def test_dispatch_runs_its_exchange_only_under_an_expert_mesh():
  """A family's `Dispatch` runs expert parallel with its own exchange where the mesh it traces
  under has expert > 1, and the plain backend otherwise: the all_to_all at capacity 1.0 drops
  exactly the assignments over its buffers (all go to shard 0 here: 1 of each device's 4
  survives) and reports that fraction; the ring gathers and drops nothing; under a mesh
  without an expert axis no exchange runs. Kills an exchange chosen elsewhere than the family,
  or expert parallelism that ignores the mesh."""
  x, _, weights, experts, _ = _problem()
  index = jnp.zeros((16, K), jnp.int32).at[:, 1].set(1)   # experts 0 and 1: both on shard 0

  def run(family, mesh, want_index):
    fn = jax.jit(lambda x: family.apply(x, index, weights, experts, jax.nn.relu))
    with shd.use_mesh(mesh):
      (y, dropped), hlo = fn(x), fn.lower(x).as_text()
    want = jax.jit(lambda x: dispatch.ReferenceLoop()(
        x, jnp.asarray(want_index), weights, experts, jax.nn.relu))(x)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    a2a = 'all_to_all' in hlo or 'all-to-all' in hlo
    gather = 'all_gather' in hlo or 'all-gather' in hlo
    return float(dropped), a2a, gather

  expert_mesh = shd.make_mesh(data=2, expert=4)
  kept, fraction = _drop_over_buffers(index, 8, 4, 1)
  assert fraction == 0.75
  assert run(dispatch.Dispatch(_inner(), 'all_to_all', 1.0), expert_mesh, kept) == (
      0.75, True, False)
  assert run(dispatch.Dispatch(_inner(), 'ring'), expert_mesh, index) == (0.0, False, True)
  assert run(dispatch.Dispatch(_inner(), 'all_to_all', 1.0), shd.make_mesh(data=8), index) == (
      0.0, False, False)


@pytest.mark.parametrize('mesh_name,exchange', [
    ('data2_expert4', 'ring'), ('data2_expert4', 'all_to_all'),
    ('data2_tensor2_expert2', 'ring'), ('data2_tensor2_expert2', 'all_to_all')])
def test_expert_dropout_gives_the_single_device_masks(mesh_name, exchange):
  """Expert dropout under expert parallelism equals ReferenceLoop's on one device: the
  assignment ids travel with their rows through the gather / all-to-all, and a tensor rank
  masks its slice of the hidden units with its part of each mask. Kills local row positions
  as ids, and a tensor rank reading units 0 .. f/2 of the mask."""
  x, index, weights, experts, cot = _problem()
  t = x.shape[0]
  drop = dispatch.ExpertDropout(jax.random.key(3), jnp.arange(t * K, dtype=jnp.int32)
                                .reshape(t, K), rate=0.5, units=F)

  def value_and_grads(backend):
    def loss(x, weights, experts):
      y = backend(x, index, weights, experts, jax.nn.gelu, None, drop)
      return jnp.vdot(y, cot), y
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
        x, weights, experts)

  (_, want_y), want_g = value_and_grads(dispatch.ReferenceLoop())
  backend, mesh = _ep(mesh_name, exchange)
  with shd.use_mesh(mesh):
    (_, got_y), got_g = value_and_grads(backend)
  _assert_close((got_y, got_g), (want_y, want_g))
