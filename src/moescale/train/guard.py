"""What keeps a run safe on shared, preemptible machines: one writer per MODEL_DIR, a
preemption notice turned into a checkpoint, and a stop at the first non-finite step.

    with RunLock(model_dir), Preemption() as preempted:
      for step in ...:
        ...
        if preempted(step):       # SIGTERM arrived: save at this step, exit 0
          break

RunLock: process 0 holds an exclusive `fcntl.flock` on MODEL_DIR/.moescale.lock for the whole
run, so a second `moescale train` on the same directory (a double submission, a forgotten
terminal) is refused instead of interleaving checkpoints. The lock file names its holder; the
kernel releases the lock when the holder exits, however it exits (`kill -9` included), so a
stale lock file never blocks a resume.

Preemption: TPU and cloud GPU preemption sends SIGTERM with a grace period. The handler only
sets a flag; the training loop checks it after each step, saves a checkpoint at that step and
returns. Across processes every host must stop at the same step: there JAX's own preemption
sync point decides (`multihost_utils.reached_preemption_sync_point`, fed by the distributed
runtime's SIGTERM notifier), never a home-made agreement.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import signal
import socket
import threading

import jax
import jax.numpy as jnp
import numpy as np

LOCK_NAME = '.moescale.lock'


class RunLockError(ValueError):
  """MODEL_DIR is in use by another run."""


_HELD: set[str] = set()   # the lock paths this process holds (a nested RunLock is a no-op)


class RunLock:
  """An exclusive lock on model_dir for the duration of a `with` block (process 0 only).
  Re-entrant within a process: `run_training` takes it before writing config.gin and the
  trainer again around the run."""

  def __init__(self, model_dir: str):
    self.path = os.path.abspath(os.path.join(model_dir, LOCK_NAME))
    self.fd = None

  def __enter__(self):
    if jax.process_index() != 0 or self.path in _HELD:
      return self
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.read(fd, 4096).decode(errors='replace').strip() or 'another process'
      os.close(fd)
      raise RunLockError(f'{os.path.dirname(self.path)} is in use by {holder}: two runs '
                         'must not write one MODEL_DIR. Wait for it to finish or stop it, or '
                         'choose another MODEL_DIR.') from None
    os.ftruncate(fd, 0)
    when = datetime.datetime.now().isoformat(timespec='seconds')
    os.write(fd, f'pid {os.getpid()} on {socket.gethostname()} since {when}\n'.encode())
    self.fd = fd
    _HELD.add(self.path)
    return self

  def __exit__(self, *exc):
    if self.fd is not None:
      _HELD.discard(self.path)
      fcntl.flock(self.fd, fcntl.LOCK_UN)
      os.close(self.fd)
      self.fd = None
    return False


class Preemption:
  """`with Preemption() as preempted:` ... `preempted(step)` -> True once a stop was asked
  for (SIGTERM in a single process; JAX's sync point across processes)."""

  def __init__(self, signals=(signal.SIGTERM,)):
    self.signals = signals
    self.requested = False
    self.previous = {}

  def _handle(self, signum, frame):
    del frame
    self.requested = True

  def __enter__(self):
    # Signal handlers can only be installed from the main thread (a run inside a worker
    # thread, e.g. a notebook's, keeps the default action).
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      for s in self.signals:
        self.previous[s] = signal.signal(s, self._handle)
    return self

  def __call__(self, step: int) -> bool:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      return bool(multihost_utils.reached_preemption_sync_point(step))
    return self.requested

  def __exit__(self, *exc):
    for s, handler in self.previous.items():
      signal.signal(s, handler)
    self.previous = {}
    return False


class NonFiniteError(ValueError):
  """The loss or the parameters went NaN / Inf (printed as one paragraph by the CLI)."""


def check_finite(step: int, since: int, scalars: dict, params, skipping: bool,
                 last_checkpoint: int | None) -> None:
  """Raises NonFiniteError when the logged loss (unless skipping) or the parameter norm is
  not finite, naming the steps, the parameters that went bad and the checkpoint kept.
  Checked at log steps and before every save, so a bad state is never checkpointed."""
  loss, norm = scalars.get('loss'), scalars.get('param_norm')
  finite = lambda x: x is None or bool(np.all(np.isfinite(x)))
  if finite(norm) and (skipping or finite(loss)):
    return
  bad = nonfinite_parameters(params)
  shown = ', '.join(bad[:6]) + (f' and {len(bad) - 6} more' if len(bad) > 6 else '')
  raise NonFiniteError(
      f'training went non-finite between step {since} and step {step}: loss {loss}, parameter '
      f'norm {norm}; ' + (f'non-finite parameters: {shown}. ' if bad else '')
      + ('The last good checkpoint is kept: step '
         f'{last_checkpoint}. ' if last_checkpoint is not None else 'No checkpoint was saved. ')
      + 'Lower the learning rate or clip harder, or set OptimizerConfig.skip_nonfinite = N to '
      'skip up to N such steps in a row.')


def nonfinite_parameters(params) -> list[str]:
  """Paths of the parameter arrays holding a NaN or an Inf (sharded arrays welcome)."""
  ok = jax.jit(lambda p: jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)), p))(params)
  flat, _ = jax.tree_util.tree_flatten_with_path(jax.device_get(ok))
  return [jax.tree_util.keystr(path, simple=True, separator='/')
          for path, good in flat if not bool(good)]


VOCABULARY_FILE = 'vocabulary.json'


class VocabularyMismatch(ValueError):
  pass


def check_vocabulary(model_dir: str, data, write: bool = True) -> None:
  """The token ids a run's checkpoints were trained on stay the ones it reads. The data
  source's `fingerprint()` (a seqio source's vocabulary: moescale.data.vocab.fingerprint) is
  recorded in MODEL_DIR/vocabulary.json when training starts (write, process 0); when the
  file exists, a source whose fingerprint differs is refused: the same vocab_size with other
  tokens would train or evaluate without a word on ids that mean something else. Sources
  without a fingerprint (synthetic data) are not checked."""
  fingerprint = getattr(data, 'fingerprint', None)
  if fingerprint is None:
    return
  now = fingerprint()
  path = os.path.join(model_dir, VOCABULARY_FILE)
  if os.path.isfile(path):
    with open(path) as f:
      then = json.load(f)
    if then.get('sha256') != now['sha256']:
      raise VocabularyMismatch(
          f"{model_dir} was trained with the vocabulary {then.get('vocabulary')!r} "
          f"({then.get('vocab_size')} ids, sha256 {str(then.get('sha256'))[:12]}), but this "
          f"data has {now['vocabulary']!r} ({now['vocab_size']} ids, sha256 "
          f"{now['sha256'][:12]}): token ids would mean other tokens. Valid: the vocabulary "
          f'recorded in {path} (--gin.VOCABULARY)')
    return
  if write and jax.process_index() == 0:
    os.makedirs(model_dir, exist_ok=True)
    with open(path + '.tmp', 'w') as f:
      json.dump(now, f, indent=1)
    os.replace(path + '.tmp', path)
