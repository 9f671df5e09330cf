"""Finite differences of every FFN family with its auxiliary losses *in* the objective.

The families' output gradients are checked elsewhere; here the objective is what training
minimises, c_out·<y, cot> + Σ aux.losses (the family's own weighted losses, each checked to be
its weight times the unweighted value in aux.metrics), and once the weighted losses alone, so
a `stop_gradient` (or a lost term) anywhere in the load-balancing, router-z or entropy losses
shows up as a wrong router gradient. Float64 throughout, with routing margins far above the
finite-difference step (no expert choice flips between the two evaluations).
"""

import functools

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import test_util

from moescale.layers import DenseFFN, ProductKeyMemory, SigmaMoE, TopKMoE, dispatch

D = 6
WEIGHTS = {'load_balance': 1.0, 'router_z': 0.5, 'entropy': 1.0}
_TOPK_WEIGHTS = dict(load_balance_weight=WEIGHTS['load_balance'],
                     router_z_weight=WEIGHTS['router_z'])
FAMILIES = {
    # (constructor, the aux losses it must record)
    'topk_moe': (functools.partial(TopKMoE, num_experts=4, expert_size=5, top_k=2,
                                   capacity_factor=1.0, use_bias=True, **_TOPK_WEIGHTS),
                 {'load_balance', 'router_z'}),
    'switch': (functools.partial(TopKMoE, num_experts=4, expert_size=5, top_k=1,
                                 capacity_factor=0.0, **_TOPK_WEIGHTS),
               {'load_balance', 'router_z'}),
    'sigma_moe': (functools.partial(SigmaMoE, num_experts=4, expert_size=5, top_k=2,
                                    num_layers=2, entropy_weight=WEIGHTS['entropy']),
                  {'entropy'}),
    'pkm': (functools.partial(ProductKeyMemory, num_heads=2, num_keys=3, knn=2, k_dim=4,
                              score_fn='relu'), set()),
    'topk_activation': (functools.partial(DenseFFN, d_ff=8, topk_activation=3, use_bias=True),
                        set()),
}




def _moe_dispatch(fn):
  """The float64 loop backend for the MoE families (the fast ones accumulate in float32)."""
  if 'num_experts' not in getattr(fn, 'keywords', {}):
    return fn
  return functools.partial(fn, dispatch=dispatch.ReferenceLoop(accumulate=None))


@pytest.mark.parametrize('family', list(FAMILIES))
def test_gradients_with_aux_losses_match_finite_differences(family):
  make, expected = FAMILIES[family]
  # Built in float32 (initialisers compile once), computed in float64 from a cast copy.
  layer = _moe_dispatch(make)(D, dtype=jnp.float64, rngs=nnx.Rngs(3))
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
  rng = np.random.RandomState(0)
  x = rng.randn(2, 5, D)
  cot = rng.randn(2, 5, D)
  segment_ids = np.array([[1, 1, 1, 1, 0], [1, 1, 2, 2, 2]])   # one padding token
  with jax.enable_x64(True):
    f64 = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), t)
    params, rest = f64(params), f64(rest)
    if 'w_router' in params:
      # Well separated router logits: an eps-step of the inputs never flips a choice.
      params['w_router'][...] = params['w_router'][...] * 4.0
    flat, unravel = jax.flatten_util.ravel_pytree((params, jnp.asarray(x)))

    def parts(flat):
      p, xx = unravel(flat)
      y, aux = nnx.merge(graphdef, p, rest, copy=True)(xx, deterministic=True,
                                                        segment_ids=segment_ids)
      return jnp.vdot(y, cot), aux

    # The losses the family trains on: each its weight times the unweighted metric.
    aux = parts(flat)[1]
    assert set(aux.losses) == expected
    for name, value in aux.losses.items():
      np.testing.assert_allclose(value, WEIGHTS[name] * aux.metrics[name], rtol=1e-12)
    total = lambda aux: sum(aux.losses.values(), 0.0)
    objectives = [jax.jit(lambda f: 0.1 * parts(f)[0] + total(parts(f)[1]))]
    if expected:
      objectives.append(jax.jit(lambda f: total(parts(f)[1])))
      # The aux losses alone have a router gradient the check can see.
      g = jax.grad(objectives[1])(flat)
      router = unravel(g)[0]['w_router'][...]
      assert float(jnp.abs(router).max()) > 1e-3
    for objective in objectives:
      test_util.check_grads(objective, (flat,), order=1, modes=['rev'], eps=1e-6, atol=1e-7,
                            rtol=1e-6)
