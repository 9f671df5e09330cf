"""The optimiser's choice of decayed parameters: matrices only by default, every parameter for
recipes that decay them all (fairseq's Adam, docs/sources.md#artetxe-et-al-2022-training-
settings)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moescale.train import optim

PARAMS = {'ffn': {'w_in': jnp.ones((2, 3)), 'b_in': jnp.ones((3,))},
          'norm': {'scale': jnp.ones((2,))}}


def _decay_step(name, **kw):
  """One step with zero gradients: all that moves a parameter is its weight decay."""
  cfg = optim.OptimizerConfig(name=name, learning_rate=1.0, decay='constant', clip_norm=None,
                              weight_decay=0.1, **kw)
  tx, _ = optim.make_optimizer(cfg, 10, PARAMS)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, PARAMS), tx.init(PARAMS), PARAMS)
  return jax.tree.map(np.asarray, updates)


@pytest.mark.parametrize('name', ['adamw', 'sgd'])
def test_weight_decay_reaches_1d_parameters_only_when_asked(name):
  default = _decay_step(name)
  # Zero gradients give a zero Adam step: the update is -lr * wd * p exactly where decay applies.
  np.testing.assert_allclose(default['ffn']['w_in'], -0.1)
  assert not default['ffn']['b_in'].any() and not default['norm']['scale'].any()
  every = _decay_step(name, weight_decay_params='all')
  for leaf in jax.tree.leaves(every):
    np.testing.assert_allclose(leaf, -0.1)


def test_unknown_decayed_parameter_set_names_the_value():
  with pytest.raises(ValueError, match="weight_decay_params='biases'"):
    optim.OptimizerConfig(weight_decay_params='biases')
