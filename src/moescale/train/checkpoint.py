"""orbax checkpoints: params, optimizer state, step, RNG state and the data position.

Layout (orbax CheckpointManager in MODEL_DIR/checkpoints):
    checkpoints/<step>/state   the TrainState pytree, sharded arrays (StandardSave)
    checkpoints/<step>/meta    JSON: data iterator position, config fingerprint

Orbax writes each step to a temporary directory and renames it when complete, so the latest
*complete* checkpoint is always the one `latest_step()` returns; resuming never reads a
half-written step. A corrupt checkpoint raises `CheckpointError` naming the step and the path,
and nothing in MODEL_DIR is deleted or overwritten by a failed restore.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  pass


def _is_key(x) -> bool:
  return hasattr(x, 'dtype') and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _keys_to_data(tree):
  """Typed PRNG keys (nnx.Rngs state) are stored as their raw uint32 data."""
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _abstract_keys_to_data(tree):
  def one(x):
    if not _is_key(x):
      return x
    data = jax.eval_shape(jax.random.key_data, x)
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=getattr(x, 'sharding', None))
  return jax.tree.map(one, tree)


def _key_impl(key):
  """The PRNG implementation of a key array, concrete or abstract (a ShapeDtypeStruct, which
  `jax.random.key_impl` refuses: it is asked of the traced key instead)."""
  if isinstance(key, jax.Array):
    return jax.random.key_impl(key)
  impl = []
  jax.eval_shape(lambda k: impl.append(jax.random.key_impl(k)) or k, key)
  return impl[0]


def _data_to_keys(tree, like):
  return jax.tree.map(lambda x, l: jax.random.wrap_key_data(x, impl=_key_impl(l))
                      if _is_key(l) else x, tree, like)


class Checkpointer:
  """Periodic + final saves, keep-N, resume from the latest complete step."""

  def __init__(self, model_dir: str, keep: int | None = 3):
    self.directory = os.path.abspath(os.path.join(model_dir, 'checkpoints'))
    # orbax's saves are asynchronous: save() returns while the arrays are written, and the
    # next save, restore() or wait() waits for it (training continues meanwhile).
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=('state', 'meta'))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, meta: dict[str, Any], force: bool = False) -> bool:
    return self.manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(_keys_to_data(state)),
                                      meta=ocp.args.JsonSave(meta)), force=force)

  def restore(self, abstract_state, step: int | None = None):
    """(state, meta) for `step` (default latest), arrays placed by abstract_state's shardings."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f'no checkpoint in {self.directory}')
    target = _abstract_keys_to_data(abstract_state)
    try:
      restored = self.manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                        meta=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types for truncated / mismatched files
      raise CheckpointError(
          f'checkpoint step {step} in {self.directory} cannot be restored ({type(e).__name__}: '
          f'{str(e)[:500]}). It may be corrupt or from a different model configuration; '
          f'move it aside to resume from an earlier step ({self.all_steps()}), or use a fresh '
          f'MODEL_DIR. Nothing was deleted.') from e
    return _data_to_keys(restored['state'], abstract_state), dict(restored['meta'] or {})

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
