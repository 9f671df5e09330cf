"""moescale.train.checkpoint on its own: what a save gives back, where it places it, what it
keeps. (tests/test_trainer.py resumes whole runs through it.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from moescale.train import checkpoint


def _state():
  return {'w': jnp.arange(16.0).reshape(8, 2), 'step': jnp.int32(3),
          # Typed keys of two implementations: each must come back as itself.
          'key': jax.random.key(1), 'rbg_key': jax.random.key(2, impl='rbg'),
          'keys': jax.random.split(jax.random.key(3), 8)}


def _abstract(state, sharding=None):
  def one(x):
    if sharding is not None and x.ndim and not jax.dtypes.issubdtype(x.dtype,
                                                                     jax.dtypes.prng_key):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    return jax.eval_shape(lambda: x)
  return jax.tree.map(one, state)


def test_round_trip_keeps_values_and_key_implementations(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  state = _state()
  assert ckpt.save(5, state, {'position': 7})
  ckpt.wait()
  restored, meta = ckpt.restore(_abstract(state))
  assert meta == {'position': 7} and ckpt.latest_step() == 5
  np.testing.assert_array_equal(restored['w'], state['w'])
  assert int(restored['step']) == 3
  for name in ('key', 'rbg_key', 'keys'):
    assert jax.random.key_impl(restored[name]) == jax.random.key_impl(state[name]), name
    np.testing.assert_array_equal(jax.random.key_data(restored[name]),
                                  jax.random.key_data(state[name]))
  # The restored keys draw what the saved ones draw.
  np.testing.assert_array_equal(jax.random.uniform(restored['rbg_key'], (3,)),
                                jax.random.uniform(state['rbg_key'], (3,)))
  ckpt.close()


def test_restore_places_arrays_by_the_abstract_shardings(tmp_path):
  mesh = jax.make_mesh((8,), ('data',))
  sharding = NamedSharding(mesh, P('data'))
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  state = _state()
  ckpt.save(1, state, {})
  ckpt.wait()
  restored, _ = ckpt.restore(_abstract(state, sharding))
  assert restored['w'].sharding == sharding
  np.testing.assert_array_equal(restored['w'], state['w'])
  # Keys follow the sharding of their abstract leaf too (here: a split key array).
  keys = jax.ShapeDtypeStruct(state['keys'].shape, state['keys'].dtype, sharding=sharding)
  restored, _ = ckpt.restore({**_abstract(state), 'keys': keys})
  assert restored['keys'].sharding.is_equivalent_to(sharding, 1)
  assert len(restored['keys'].sharding.device_set) == 8
  ckpt.close()


def test_keeps_the_newest_n_and_restores_any_kept_step(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2)
  state = _state()
  for step in (1, 2, 3):
    ckpt.save(step, {**state, 'step': jnp.int32(step)}, {'step': step})
    ckpt.wait()
  assert ckpt.all_steps() == [2, 3]
  restored, meta = ckpt.restore(_abstract(state), step=2)
  assert int(restored['step']) == 2 and meta == {'step': 2}
  ckpt.close()


def test_no_checkpoint_is_a_clear_error(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'fresh'))
  assert (tmp_path / 'fresh' / 'checkpoints').is_dir()  # created on construction
  with pytest.raises(checkpoint.CheckpointError, match='no checkpoint in'):
    ckpt.restore(_abstract(_state()))
  ckpt.close()
