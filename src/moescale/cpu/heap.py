"""Keep XLA:CPU's per-step temporaries in the heap: one malloc arena, no mmap'd chunks.

    from moescale.cpu import heap
    heap.keep_heap()    # first thing in a process that will run XLA:CPU steps

Why: XLA:CPU allocates each execution's temporary buffer with malloc from one of its own
threads. glibc serves a request that large with a fresh mmap and gives it back with munmap
when the step ends, so every step faults every page of its temporaries in again (measured
with getrusage and strace: tens of thousands of minor faults a step for the bench's dense
train step). With one arena (M_ARENA_MAX 1: XLA's threads allocate from the main heap), no
mmap'd chunks (M_MMAP_MAX 0) and a 1 GiB trim threshold, the freed buffer stays in the heap
and the next step reuses its pages. docs/performance.md has the measurements.

The cost: memory the process has freed is not returned to the system (up to the trim
threshold), and threads share one malloc lock. A training process reaches its peak every
step anyway. Call it before JAX starts its CPU client: threads that already hold an arena
keep it. The command line (`moescale train`, `moescale bench`, `make demo`) calls it; a
notebook may. It does nothing off glibc, where an accelerator backend is selected or
installed (its host side is not the bottleneck), or with MOESCALE_KEEP_HEAP=0.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import platform

log = logging.getLogger(__name__)

# glibc's mallopt parameter numbers (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
TRIM_THRESHOLD = 1 << 30
# Modules whose presence makes JAX pick an accelerator by default.
_ACCELERATOR_MODULES = ('jax_cuda12_plugin', 'jax_cuda13_plugin', 'jax_rocm60_plugin',
                        'jax_rocm7_plugin', 'libtpu')

_applied: list[bool] = []


def _cpu_process() -> bool:
  platforms = os.environ.get('JAX_PLATFORMS', '').strip().lower()
  if platforms:
    return platforms.split(',')[0] == 'cpu'
  return not any(importlib.util.find_spec(m) is not None for m in _ACCELERATOR_MODULES)


def keep_heap() -> bool:
  """Applies the settings above once per process; True if they are in effect."""
  if _applied:
    return _applied[0]
  ok = False
  if os.environ.get('MOESCALE_KEEP_HEAP', '1') == '0':
    reason = 'MOESCALE_KEEP_HEAP=0'
  elif platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc':
    reason = 'not glibc'
  elif not _cpu_process():
    reason = 'an accelerator backend is selected or installed'
  else:
    try:
      libc = ctypes.CDLL(None)
      ok = all(libc.mallopt(param, value) == 1 for param, value in
               ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD)))
      reason = 'mallopt refused a setting' if not ok else ''
    except (OSError, AttributeError) as e:
      reason = str(e)
  if not ok:
    log.debug('host heap settings not applied: %s', reason)
  _applied.append(ok)
  return ok
