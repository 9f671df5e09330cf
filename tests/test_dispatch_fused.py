"""The 'fused' dispatch backend beyond the shared reference tests of test_dispatch.py: edge
cases, its block sizes, its memory behaviour and the packed-key sort it relies on."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moescale.layers import dispatch, dispatch_ops
from moescale.layers.dispatch_fused import Fused, choose_block_size
# The problem generator and jaxpr walker of the shared backend tests (there 'fused' is checked
# against ReferenceLoop, forward and every gradient, with the other backends).
from test_dispatch import D, E, F, _problem, _shapes_in


def test_fused_is_autos_cpu_backend_and_registered():
  # What 'auto' lowers into a CPU program (its lowering: test_dispatch.test_auto_*).
  assert isinstance(dispatch.get_backend('auto').cpu, Fused)
  assert isinstance(dispatch.get_backend('fused', block_size=8), Fused)
  assert 'fused' in dispatch.available_backends()


def test_fused_rejects_bad_sizes_and_fits_its_blocks_to_the_problem():
  with pytest.raises(ValueError, match='block_size=0'):
    Fused(block_size=0)
  with pytest.raises(ValueError, match='granule=-2'):
    Fused(granule=-2)
  with pytest.raises(ValueError, match='multiple of granule=4'):
    Fused(block_size=6, granule=4)
  assert Fused().sizes(32, 1) == (32, 16)                 # capped at the rows there are
  assert Fused(block_size=24).sizes(1000, 5) == (24, 8)   # granule divides the block
  assert Fused(granule=48).sizes(1000, 5) == (528, 48)    # the block rounded up to granules
  assert Fused(4, 2).sizes(0, 5) == (2, 2)                # no rows: still one granule, not 0


def test_fused_duplicates_out_of_range_ids_all_dropped_and_one_expert():
  x, index, weights, experts, _ = _problem(t=9, k=3)
  index = index.at[0].set(jnp.array([1, 1, 2])).at[1].set(jnp.array([-1, E + 3, 0]))
  run = jax.jit(lambda index: Fused(4, 2, 'xla')(x, index, weights, experts, jax.nn.gelu))
  want = jax.jit(lambda index: dispatch.ReferenceLoop()(x, index, weights, experts, jax.nn.gelu))
  np.testing.assert_allclose(run(index), want(index), atol=1e-5)
  np.testing.assert_array_equal(run(jnp.full_like(index, E)), 0.0)
  # Blocks larger than all the rows (one expert on one device of an expert-parallel mesh),
  # explicit and default sizes: the static slices must still fit.
  one = dispatch.ExpertWeights(experts.w_in[:1], experts.w_out[:1])
  index1 = jnp.array([[0, 1]] * 6, jnp.int32)
  want = dispatch.ReferenceLoop()(x[:6], index1, weights[:6, :2], one, jax.nn.relu)
  for fused in (Fused(64, 16, 'xla'), Fused(kernels='xla')):
    got = jax.jit(lambda x: fused(x, index1, weights[:6, :2], one, jax.nn.relu))(x[:6])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_fused_keeps_no_weight_copies_and_no_row_buffers():
  t, k = 40, 4
  x, index, weights, experts, cot = _problem(t=t, k=k, bias=False)

  def shapes(backend):
    grad = jax.grad(lambda x, w, e: jnp.vdot(backend(x, index, w, e, jax.nn.relu), cot),
                    argnums=(0, 1, 2))
    return set(_shapes_in(jax.make_jaxpr(grad)(x, weights, experts).jaxpr))
  fused = shapes(Fused(4, 2, 'xla'))  # the XLA loop (the C++ kernel: test_dispatch_fused_cpu)
  # No stacked expert weights (one copy per loop iteration, as autodiff of the loop would keep)
  assert not {s for s in fused if len(s) == 3 and s[1:] in ((D, F), (F, D)) and s[0] not in (1, E)}
  # and no permuted [rows >= t*k, d] buffer: only [t, d] (x, y, dx) and block-sized rows,
  # where the unfused 'ragged' backend (permute, grouped matmul, combine) has several (the
  # check can fail).
  row_buffers = lambda shapes: {s for s in shapes if len(s) == 2 and s[1] == D and s[0] >= t * k}
  assert not row_buffers(fused)
  assert row_buffers(shapes(dispatch.get_backend('ragged')))


def test_choose_block_size_multiples_bounded_classes():
  for n, e in [(65536, 16), (65536, 128), (32768, 512), (4096, 16), (52, 5), (1, 1)]:
    block, granule = choose_block_size(n, e)
    assert block % granule == 0 and 16 <= block <= 1024 and block // granule <= 16
  assert choose_block_size(65536, 128) == (1024, 64)   # measured best-ish for σ-MoE, 128 experts


def test_packed_sort_equals_stable_argsort():
  index = jax.random.randint(jax.random.key(5), (300, 3), -2, E + 3).astype(jnp.int32)
  s = jax.jit(dispatch_ops.sort_and_rank, static_argnums=1)(index, E)
  flat = np.asarray(index).reshape(-1)
  flat = np.where((flat < 0) | (flat > E), E, flat)
  order = np.argsort(flat, kind='stable')
  np.testing.assert_array_equal(s.order, order)
  np.testing.assert_array_equal(s.sorted_expert, flat[order])
  np.testing.assert_array_equal(s.group_sizes, np.bincount(flat, minlength=E + 1)[:E])
