"""Library noise on the terminal: TensorFlow's start-up lines, held to TF_CPP_MIN_LOG_LEVEL,
and the background copies of a failed checkpoint write (at the end).

TensorFlow 2.21 logs through absl's C++ logging, and a few of its lines come from code that runs
while its shared libraries load, before anything reads TF_CPP_MIN_LOG_LEVEL: with the level at 3
`import tensorflow` still prints, once per library that carries absl (twice),

    WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
    I0000 00:00:... port.cc:153] oneDNN custom operations are on. You may see slightly ...
    I0000 00:00:... cudart_stub.cc:31] Could not find cuda drivers on your machine, ...

No setting reaches them (TF_ENABLE_ONEDNN_OPTS=0 drops the oneDNN line only by turning oneDNN
off, which changes TF's numerics). So `native_stderr` captures file descriptor 2 around the
import and writes back every line except absl-format lines below the level (I=0, W=1, E=2, as TF
counts; a fatal line always) and absl's pre-initialisation banner. Anything else written there,
a Python warning or a crash report, comes back in order; TF_CPP_MIN_LOG_LEVEL=0 shows it all.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile

# absl's C++ prefix: severity, MMDD, hh:mm:ss.micros (before absl is initialised: 0000
# 00:00:<seconds since 1970>), thread id, file:line]
_ABSL_LINE = re.compile(rb'([IWEF])\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [^ \]]+:\d+\] ')
_PREINIT = b'WARNING: All log messages before absl::InitializeLog() is called are written to STDERR'
_SEVERITY = {b'I': 0, b'W': 1, b'E': 2}


def min_log_level() -> int:
  """TF_CPP_MIN_LOG_LEVEL as TF reads it (unset or not a number: 0, everything)."""
  try:
    return int(os.environ.get('TF_CPP_MIN_LOG_LEVEL', '0'))
  except ValueError:
    return 0


def keep(line: bytes, level: int) -> bool:
  """Whether a line of native stderr is shown at TF_CPP_MIN_LOG_LEVEL=level."""
  if line.rstrip(b'\r\n') == _PREINIT:
    return level < 1
  m = _ABSL_LINE.match(line)
  return m is None or _SEVERITY.get(m.group(1), 3) >= level


@contextlib.contextmanager
def native_stderr(level: int | None = None):
  """Runs the body with file descriptor 2 captured, then writes back the lines `keep` keeps.
  level: default TF_CPP_MIN_LOG_LEVEL; below 1 (or no fd 2 to capture) nothing is captured."""
  level = min_log_level() if level is None else level
  try:
    saved = os.dup(2) if level >= 1 else None
  except OSError:
    saved = None
  if saved is None:
    yield
    return
  with tempfile.TemporaryFile() as tmp:
    sys.stderr.flush()
    os.dup2(tmp.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      tmp.seek(0)
      kept = b''.join(line for line in tmp if keep(line, level))
      if kept:
        os.write(2, kept)


# -- a failed checkpoint write, reported once --------------------------------------------------
#
# When a save fails (a full disk), orbax's background threads each log the failure at ERROR with
# its traceback (the array writer, the metadata writer, the commit thread, then the main thread
# waiting for them: four copies), and tensorstore's write callbacks, landing on the event loop
# orbax has already closed, raise 'Event loop is closed' dozens of times through
# sys.unraisablehook. The same failure then reaches the trainer's thread, where
# moescale.train.checkpoint reports it as one paragraph naming the step and what is intact
# (measured on a 13 MB tmpfs, the tiny run's second save: 566 lines of stderr before this).

# tensorstore's and the OS's words for a write that could not happen: raised as ValueError
# ('RESOURCE_EXHAUSTED: Error writing "w/0" in OCDBT database ...: No space left on device').
_WRITE_FAILURE = re.compile(
    r'No space left on device|Disk quota exceeded|RESOURCE_EXHAUSTED|Error writing|Failed writing'
    r'|Read-only file system')


def write_failure(e: BaseException) -> bool:
  """Whether `e` (or what caused it) is a failed write of a file: an OSError, or tensorstore's
  error text for one."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) or _WRITE_FAILURE.search(str(e)):
      return True
    e = e.__cause__ or e.__context__
  return False


class _WriteFailureRecords(logging.Filter):
  """Drops ERROR records of a failed write (the caller reports it once). Logger, not file:
  absl's records name absl's own file as their origin when its logger was made before absl."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR:
      return True
    exc = record.exc_info[1] if record.exc_info else None
    return not ((exc is not None and write_failure(exc))
                or _WRITE_FAILURE.search(record.getMessage()))


def _closed_loop(unraisable) -> bool:
  return (isinstance(unraisable.exc_value, RuntimeError)
          and str(unraisable.exc_value) == 'Event loop is closed')


def checkpoint_write_failures() -> None:
  """Quiets the background copies of a failed checkpoint write (see above): their ERROR records
  from orbax (absl's logger) and from asyncio ('Task exception was never retrieved'), and 'Event
  loop is closed' raised into sys.unraisablehook. Anything else still prints. For the command
  line (not with --debug); idempotent."""
  for name in ('absl', 'asyncio'):
    logger = logging.getLogger(name)
    if not any(isinstance(f, _WriteFailureRecords) for f in logger.filters):
      logger.addFilter(_WriteFailureRecords())
  previous = sys.unraisablehook
  if getattr(previous, 'moescale_quiet', False):
    return

  def hook(unraisable):
    if not _closed_loop(unraisable):
      previous(unraisable)
  hook.moescale_quiet = True
  sys.unraisablehook = hook
