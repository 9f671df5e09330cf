"""moescale.train.checkpoint on its own: what a save gives back, where it places it, what it
keeps. (tests/test_trainer.py resumes whole runs through it.)"""

import os

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


def _three_steps(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=3)
  state = _state()
  for step in (1, 2, 3):
    ckpt.save(step, {**state, 'step': jnp.int32(step)}, {'step': step})
  ckpt.wait()
  return ckpt, state


def _files(step_dir):
  return sorted(p for p in step_dir.rglob('*') if p.is_file())


@pytest.mark.parametrize('damage', ['truncate', 'delete', 'truncate_meta', 'empty_dir'])
def test_a_damaged_latest_step_is_skipped_for_the_previous_complete_one(tmp_path, caplog,
                                                                         damage):
  """Every kind of damage to the latest step (a file cut short, a file gone, the meta JSON
  cut, every file gone) is detected before reading; the previous step is restored, with a
  warning naming the damaged one, and nothing is deleted."""
  ckpt, state = _three_steps(tmp_path)
  step3 = tmp_path / 'checkpoints' / '3'
  manifests = sorted(p.name for p in (tmp_path / 'checkpoints.manifest').iterdir())
  assert manifests == ['1.json', '2.json', '3.json']
  files = _files(step3)
  biggest = max(files, key=lambda p: p.stat().st_size)
  if damage == 'truncate':
    biggest.write_bytes(biggest.read_bytes()[:biggest.stat().st_size // 2])
  elif damage == 'delete':
    biggest.unlink()
  elif damage == 'truncate_meta':
    meta = next(p for p in files if p.parent.name == 'meta')
    meta.write_bytes(meta.read_bytes()[:3])
  else:
    for p in files:
      p.unlink()
  before = _files(tmp_path / 'checkpoints')
  with caplog.at_level('WARNING'):
    restored, meta, step = ckpt.restore_latest(_abstract(state))
  assert step == 2 and meta == {'step': 2} and int(restored['step']) == 2
  assert 'checkpoint step 3' in caplog.text and 'damaged' in caplog.text
  assert _files(tmp_path / 'checkpoints') == before          # nothing deleted
  ckpt.close()


def test_no_intact_step_is_a_clear_error_and_an_intact_one_restores(tmp_path):
  ckpt, state = _three_steps(tmp_path)
  _, meta, step = ckpt.restore_latest(_abstract(state))
  assert (step, meta) == (3, {'step': 3})
  for s in (1, 2, 3):
    for p in _files(tmp_path / 'checkpoints' / str(s)):
      p.write_bytes(b'')
  with pytest.raises(checkpoint.CheckpointError, match='no checkpoint in .* restores: step 3'):
    ckpt.restore_latest(_abstract(state))
  ckpt.close()


def test_a_step_that_fails_to_restore_without_a_manifest_is_skipped_too(tmp_path):
  """A damaged step written before manifests existed (or whose manifest was lost): orbax's
  own failure to read it sends the restore to the previous step."""
  ckpt, state = _three_steps(tmp_path)
  (tmp_path / 'checkpoints.manifest' / '3.json').unlink()
  for p in _files(tmp_path / 'checkpoints' / '3'):
    if p.parent.name == 'meta':
      p.write_text('{not json')
  _, meta, step = ckpt.restore_latest(_abstract(state))
  assert step == 2
  ckpt.close()


def test_a_full_disk_during_a_save_keeps_the_earlier_step_and_says_so(tmp_path, monkeypatch):
  import errno
  from orbax.checkpoint._src.handlers import json_checkpoint_handler as json_handler
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  state = _state()
  ckpt.save(1, state, {'position': 1})
  ckpt.wait()

  async def full(self, item, directory):  # orbax's own write of the step's meta, mid-save
    raise OSError(errno.ENOSPC, 'No space left on device', str(directory))
  monkeypatch.setattr(json_handler.JsonCheckpointHandler, '_save_fn', full)
  with pytest.raises(checkpoint.CheckpointError) as e:
    ckpt.save(2, state, {'position': 2})
    ckpt.wait()   # orbax writes in the background: the error surfaces at the latest here
  message = str(e.value)
  assert 'checkpoint step 2' in message and ckpt.directory in message, message
  assert 'disk is full' in message and 'checkpoints [1] are intact' in message, message
  # The failed step is neither listed nor given a manifest, and step 1 still restores.
  monkeypatch.undo()
  assert ckpt.all_steps() == [1]
  assert sorted(os.listdir(ckpt.manifest_dir)) == ['1.json']
  restored, meta, step = ckpt.restore_latest(_abstract(state))
  assert step == 1 and meta == {'position': 1}
  np.testing.assert_array_equal(restored['w'], state['w'])
  ckpt.close()
