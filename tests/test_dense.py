import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moescale.layers import DenseFFN
from moescale.layers.dense import topk_activation_mask


def _x(shape=(2, 5, 8), seed=0):
  return jax.random.normal(jax.random.key(seed), shape)


def _y(layer, x, **kw):
  """The output of `layer(x, **kw)`; a dense FFN has no auxiliary losses or metrics."""
  y, aux = layer(x, **kw)
  assert not aux.losses and not aux.metrics
  return y


def test_dense_matches_two_matmuls_with_bias_and_gelu():
  layer = DenseFFN(8, 16, activation='gelu', use_bias=True, rngs=nnx.Rngs(0))
  layer.b_in[...] = jnp.arange(16.0) / 16
  layer.b_out[...] = -jnp.arange(8.0) / 8
  x = _x()
  want = jax.nn.gelu(x @ layer.w_in[...] + layer.b_in[...], approximate=False) @ layer.w_out[...]
  want = want + layer.b_out[...]
  np.testing.assert_allclose(_y(layer, x), want, rtol=1e-5, atol=1e-5)


def test_topk_activation_full_width_equals_plain_dense():
  plain = DenseFFN(8, 16, rngs=nnx.Rngs(3))
  topk = DenseFFN(8, 16, topk_activation=16, rngs=nnx.Rngs(3))
  x = _x()
  np.testing.assert_array_equal(_y(plain, x), _y(topk, x))


def test_topk_activation_keeps_k_largest_and_ties():
  h = jnp.array([[0.0, 3.0, 1.0, 3.0, 2.0, 0.5]])
  np.testing.assert_array_equal(topk_activation_mask(h, 2), [[0, 3, 0, 3, 0, 0]])
  # Ties with the k-th value are kept: 3 entries survive for k=2 here.
  h = jnp.array([[1.0, 2.0, 2.0, 0.0]])
  np.testing.assert_array_equal(topk_activation_mask(h, 2), [[0, 2, 2, 0]])
  np.testing.assert_array_equal(topk_activation_mask(h, 1), [[0, 2, 2, 0]])


def test_topk_activation_gradient_only_through_kept_units():
  h = jnp.array([[0.5, 3.0, 1.0, 2.0]])
  g = jax.grad(lambda h: topk_activation_mask(h, 2).sum())(h)
  np.testing.assert_array_equal(g, [[0, 1, 0, 1]])


def test_dense_rejects_bad_arguments():
  with pytest.raises(ValueError, match='d_ff=0'):
    DenseFFN(8, 0, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='topk_activation=32'):
    DenseFFN(8, 16, topk_activation=32, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="unknown activation 'swish'"):
    DenseFFN(8, 16, activation='swish', rngs=nnx.Rngs(0))


def test_dense_params_carry_logical_axes():
  layer = DenseFFN(8, 16, use_bias=True, rngs=nnx.Rngs(0))
  specs = nnx.get_partition_spec(nnx.state(layer))
  assert tuple(specs['w_in'].get_value()) == ('embed', 'mlp')
  assert tuple(specs['w_out'].get_value()) == ('mlp', 'embed')
  assert tuple(specs['b_in'].get_value()) == ('mlp',)


def test_dense_dropout_only_in_training():
  layer = DenseFFN(8, 64, dropout=0.5, rngs=nnx.Rngs(0, dropout=1))
  x = _x()
  np.testing.assert_array_equal(_y(layer, x, deterministic=True),
                                _y(layer, x, deterministic=True))
  assert not np.allclose(_y(layer, x, deterministic=False), _y(layer, x, deterministic=True))
