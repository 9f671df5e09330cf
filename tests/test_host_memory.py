"""cpu.heap.keep_heap: when it applies, and that it stops XLA:CPU re-faulting its buffers."""

import os
import subprocess
import sys

import pytest

from moescale.cpu import heap


@pytest.fixture
def fresh(monkeypatch):
  monkeypatch.setattr(heap, '_applied', [])
  return monkeypatch


def test_opt_out_and_accelerators_leave_malloc_alone(fresh):
  calls = []
  fresh.setattr(heap.ctypes, 'CDLL', lambda *a: calls.append(a))
  fresh.setenv('MOESCALE_KEEP_HEAP', '0')
  assert heap.keep_heap() is False
  fresh.setattr(heap, '_applied', [])
  fresh.setenv('MOESCALE_KEEP_HEAP', '1')
  fresh.setenv('JAX_PLATFORMS', 'cuda,cpu')
  assert heap.keep_heap() is False
  assert calls == []                  # mallopt was never reached


# What XLA:CPU does every step, in miniature: a worker thread mallocs a 64 MiB buffer (above
# glibc's largest mmap threshold, 32 MiB), writes it and frees it. Prints the minor page
# faults per round.
_PROBE = """
import ctypes, resource, threading
from moescale.cpu import heap
applied = heap.keep_heap()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
size, result = 64 << 20, []

def step():
  p = libc.malloc(size); libc.memset(p, 1, size); libc.free(p)

def worker():
  for _ in range(2):
    step()
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(4):
    step()
  result.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4)

t = threading.Thread(target=worker); t.start(); t.join()
print(applied, result[0])
"""


@pytest.mark.skipif(sys.platform != 'linux', reason='glibc malloc settings')
def test_kept_heap_reuses_the_pages_of_freed_buffers():
  def faults(keep: str):
    env = dict(os.environ, MOESCALE_KEEP_HEAP=keep, JAX_PLATFORMS='cpu')
    out = subprocess.run([sys.executable, '-c', _PROBE], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    return out[0] == 'True', float(out[1])

  applied, kept = faults('1')
  if not applied:
    pytest.skip('mallopt unavailable (not glibc)')
  _, default = faults('0')
  # 64 MiB is 16,384 pages: by default each round maps them afresh and faults them in.
  assert default > 8000, default
  assert kept < default / 20, (kept, default)
