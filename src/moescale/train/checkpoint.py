"""orbax checkpoints: params, optimizer state, step, RNG state and the data position.

Layout (orbax CheckpointManager in MODEL_DIR/checkpoints):
    checkpoints/<step>/state   the TrainState pytree, sharded arrays (StandardSave)
    checkpoints/<step>/meta    JSON: data iterator position, config fingerprint

Orbax writes each step to a temporary directory and renames it when complete, so the latest
*complete* checkpoint is always the one `latest_step()` returns; resuming never reads a
half-written step. Damage after that (a file truncated or deleted: a full disk, a copy cut
short) is caught by a manifest: once a step is complete, the size of every file in it is
written to MODEL_DIR/checkpoints.manifest/<step>.json, and `restore_latest` checks it before
reading. It skips a damaged step with a warning naming it and falls back to the previous
complete one; a step that does not restore at all (orbax's own errors) is skipped the same
way. Sizes, not hashes: hashing would read every byte of a multi-terabyte checkpoint; a
truncation or a missing file changes the sizes. Nothing in MODEL_DIR is deleted or
overwritten by a failed restore.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
from typing import Any

import jax
import orbax.checkpoint as ocp

from moescale import quiet


log = logging.getLogger(__name__)


def _errno(e: BaseException) -> int | None:
  """The OS error number of a failed write: an OSError's, or the one tensorstore writes at the
  end of its ValueError ('... No space left on device [os_error_code=\'28\']')."""
  for x in (e, e.__cause__):
    if getattr(x, 'errno', None):
      return x.errno
  m = re.search(r"os_error_code='?(\d+)", str(e))
  return int(m.group(1)) if m else None


_WHY = {errno.ENOSPC: 'the disk is full or over quota: free space',
        errno.EDQUOT: 'the disk is full or over quota: free space',
        errno.EFBIG: 'a file would pass the limit on file size (`ulimit -f`): raise it',
        errno.EROFS: 'the file system is read-only: remount it writable',
        errno.EACCES: 'permission denied: make MODEL_DIR writable',
        errno.EPERM: 'permission denied: make MODEL_DIR writable'}


class CheckpointError(ValueError):
  """A checkpoint that cannot be restored (bad input to a resume: the CLI prints it as one
  paragraph, no traceback)."""


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
    self._in_flight: int | None = None   # the step of the save orbax may still be writing

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, meta: dict[str, Any], force: bool = False) -> bool:
    # orbax first waits for the save in flight: its write error surfaces here or in wait().
    with self._write_errors(step):
      saved = self.manager.save(
          step, args=ocp.args.Composite(state=ocp.args.StandardSave(_keys_to_data(state)),
                                        meta=ocp.args.JsonSave(meta)), force=force)
      self._write_manifests()   # of the steps completed before this one (orbax is async)
    if saved:
      self._in_flight = step
    return saved

  @contextlib.contextmanager
  def _write_errors(self, step: int | None):
    """A failed write of a save (a full disk, a quota: an OSError, or tensorstore's ValueError
    for the arrays) as a CheckpointError naming the step, the
    directory and the steps still intact. orbax writes each step under a temporary name and
    renames it only once complete, so a failed step is never listed (nor given a manifest)."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except
      # tensorstore (the arrays) reports a full disk as ValueError('RESOURCE_EXHAUSTED: ...').
      if not quiet.write_failure(e):
        raise
      steps = [s for s in (self._in_flight, step) if s is not None]
      self._in_flight = None
      what = ' or '.join(f'step {s}' for s in sorted(set(steps))) or 'a checkpoint'
      code = _errno(e)
      why = _WHY.get(code, 'fix the file system')
      cause = os.strerror(code) if code else str(e)[:300]
      raise CheckpointError(
          f'writing checkpoint {what} to {self.directory} failed ({cause}): {why}, '
          f'then resume from the same MODEL_DIR. The complete checkpoints '
          f'{self.all_steps()} are intact; nothing of them was overwritten.') from e

  # -- the size manifest (module docstring) --------------------------------------------------

  @property
  def manifest_dir(self) -> str:
    return self.directory + '.manifest'

  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _sizes(self, step: int) -> dict[str, int]:
    root = self._step_dir(step)
    return {os.path.relpath(os.path.join(here, f), root): os.path.getsize(os.path.join(here, f))
            for here, _, files in os.walk(root) for f in files}

  def _write_manifests(self) -> None:
    """Manifests of the complete steps that have none; stale ones of deleted steps removed.
    Only process 0 writes (one file system view for all hosts)."""
    if jax.process_index() != 0:
      return
    in_flight = getattr(self.manager, 'is_saving_in_progress', lambda: False)()
    steps = set(self.all_steps())
    os.makedirs(self.manifest_dir, exist_ok=True)
    for name in os.listdir(self.manifest_dir):
      if name.endswith('.json') and int(name[:-5]) not in steps:
        os.remove(os.path.join(self.manifest_dir, name))
    for step in sorted(steps):
      path = os.path.join(self.manifest_dir, f'{step}.json')
      if os.path.exists(path) or (in_flight and step == max(steps)):
        continue
      sizes = self._sizes(step)
      if not sizes:   # not on disk under its final name yet
        continue
      with open(path + '.tmp', 'w') as f:
        json.dump(sizes, f)
      os.replace(path + '.tmp', path)

  def damage(self, step: int) -> str | None:
    """What is wrong with step's files against its manifest (None: matches, or no manifest)."""
    path = os.path.join(self.manifest_dir, f'{step}.json')
    if not os.path.exists(path):
      return None
    with open(path) as f:
      want = json.load(f)
    have = self._sizes(step)
    missing = sorted(set(want) - set(have))
    if missing:
      return f'{len(missing)} file(s) missing, e.g. {missing[0]}'
    short = sorted(f for f in want if have[f] != want[f])
    if short:
      return f'{short[0]} is {have[short[0]]} bytes, was {want[short[0]]}'
    return None

  def restore_latest(self, abstract_state):
    """(state, meta, step) of the latest complete step that is intact and restores; damaged
    or unreadable later steps are skipped with a warning naming each. CheckpointError if
    none restores."""
    failures = []
    for step in sorted(self.all_steps(), reverse=True):
      why = self.damage(step)
      if why is None:
        try:
          state, meta = self.restore(abstract_state, step)
          return state, meta, step
        except CheckpointError as e:
          why = str(e.__cause__ or e)[:300]
      log.warning('checkpoint step %d in %s is damaged (%s): skipped, trying an earlier one',
                  step, self._step_dir(step), why)
      failures.append(f'step {step}: {why}')
    raise CheckpointError(f'no checkpoint in {self.directory} restores: '
                          + '; '.join(failures) + '. Nothing was deleted.')

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
    with self._write_errors(None):
      self.manager.wait_until_finished()
      self._in_flight = None
      self._write_manifests()

  def close(self) -> None:
    self.manager.close()
