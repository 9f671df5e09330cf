"""Test setup: 8 fake CPU devices (before jax is imported), fp32 matmuls, no TF noise; the
`cpu_kernels` marker of the tests that need moescale's C++ kernels."""

import functools
import os
import platform
import sys

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
if '--xla_force_host_platform_device_count' not in os.environ['XLA_FLAGS']:
  os.environ['XLA_FLAGS'] += ' --xla_force_host_platform_device_count=8'
# Tests check numbers, not speed: XLA's cheapest backend optimisation halves compile time here,
# and XLA:CPU's older (non-MLIR) fusion emitters compile a sharded train step of test_trainer's
# model in 4.1-4.3 s instead of 7.0-7.5 s (the same step runs as fast: 0.18 vs 0.20 s for 3).
if '--xla_backend_optimization_level' not in os.environ['XLA_FLAGS']:
  os.environ['XLA_FLAGS'] += ' --xla_backend_optimization_level=0'
if '--xla_cpu_use_fusion_emitters' not in os.environ['XLA_FLAGS']:
  os.environ['XLA_FLAGS'] += ' --xla_cpu_use_fusion_emitters=false'
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
# One JAX compilation cache per test run, shared by the xdist workers and the subprocesses the
# tests start: many tests compile the same programs (single-device references of the sharded
# tests, the trainer's runs of one model, the tiny run's two invocations). A fresh directory
# per run, so a run never reuses what an earlier checkout compiled. Measured: building the
# quick bench's top-2 MoE train step took 18.8 s compiled, 4.9 s from the cache.
_OWN_CACHE = None
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:  # the xdist workers inherit the controller's
  import tempfile
  _OWN_CACHE = os.path.join(tempfile.gettempdir(), f'moescale-tests-jax-cache-{os.getpid()}')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _OWN_CACHE
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')

from moescale.cpu import heap  # noqa: E402

# As the command line does (before JAX's CPU client starts): XLA:CPU's step temporaries stay
# in the heap instead of being mmap'd and faulted in afresh at every call.
heap.keep_heap()

import jax  # noqa: E402

# Exact fp32 matmuls so reference comparisons can use tight tolerances.
jax.config.update('jax_default_matmul_precision', 'highest')

import pytest  # noqa: E402


@functools.cache
def cpu_kernels_unexpected() -> str | None:
  """Why moescale's C++ kernels are not expected to build here, or None where they are.

  They are expected where moescale/cpu/build.py builds them: x86-64 Linux (-march=native, the AVX2
  paths) with a C++ compiler. Decided from the platform alone (once), never by building: a build
  that fails where the kernels are expected is a test failure (pytest_runtest_setup), not a
  skip, so a broken kernel source cannot pass as 'skipped'.
  """
  if not sys.platform.startswith('linux') or platform.machine() != 'x86_64':
    return f'the C++ kernels build on x86-64 Linux, not {sys.platform} {platform.machine()}'
  from moescale.cpu import build
  if build.compiler() is None:
    return 'no C++ compiler ($CXX, c++, g++ or clang++)'
  return None


def pytest_configure(config):
  config.addinivalue_line(
      'markers', "cpu_kernels: needs moescale's C++ kernels: skipped where they are not expected "
      '(conftest.cpu_kernels_unexpected), failed with the build log where they do not build')


def pytest_collection_modifyitems(config, items):
  marked = [item for item in items if item.get_closest_marker('cpu_kernels')]
  reason = cpu_kernels_unexpected() if marked else None
  for item in marked if reason else ():
    item.add_marker(pytest.mark.skip(reason=f'C++ kernels not expected here: {reason}'))


def pytest_runtest_setup(item):
  # `make mutate`: mutmut first runs the tests once with every mutable function behind a
  # recording trampoline ('stats'), and later runs each mutant only against the tests that
  # called its function then. A function called under a trace runs only while JAX traces, and
  # JAX reuses a trace (jit, custom_vjp) for the same callable and shapes, so a helper of a
  # module-level jitted function was credited only to the first test that traced it (3 of the
  # 12 tests that exercise topk_moe's masked mean). Clearing the caches per test re-traces.
  if os.environ.get('MUTANT_UNDER_TEST') == 'stats':
    jax.clear_caches()
  # Skipped items never get here (the skip marker is evaluated first); for the others the
  # kernels are expected, so a failed build or load fails the test with the compiler's log.
  if item.get_closest_marker('cpu_kernels') and not cpu_kernels_unexpected():
    from moescale.cpu import build
    if not build.load():
      pytest.fail("moescale's C++ kernels are expected here but did not load:\n"
                  f"{build.failure()}",
                  pytrace=False)


def pytest_sessionfinish(session):
  # The process that made the cache (the xdist controller, or a plain pytest) removes it:
  # about 24 MB a run.
  if _OWN_CACHE and not hasattr(session.config, 'workerinput'):
    import shutil
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)
