"""Test setup: 8 fake CPU devices (before jax is imported), fp32 matmuls, no TF noise."""

import os

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

from moescale import host_memory  # noqa: E402

# As the command line does (before JAX's CPU client starts): XLA:CPU's step temporaries stay
# in the heap instead of being mmap'd and faulted in afresh at every call.
host_memory.keep_heap()

import jax  # noqa: E402

# Exact fp32 matmuls so reference comparisons can use tight tolerances.
jax.config.update('jax_default_matmul_precision', 'highest')


def pytest_sessionfinish(session):
  # The process that made the cache (the xdist controller, or a plain pytest) removes it:
  # about 24 MB a run.
  if _OWN_CACHE and not hasattr(session.config, 'workerinput'):
    import shutil
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)
