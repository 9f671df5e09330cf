"""Building moescale's C++ kernels for XLA:CPU: compiled on first use, registered with `jax.ffi`.

    from moescale.cpu import build
    if build.load():                   # False: no compiler, or the build failed (logged once)
      ...jax.ffi.ffi_call(build.TOP_K, ...)

The sources beside this file (pkm_search.cc, pkm_gather.cc, attention.cc, moe_ffn.cc and their
headers) are compiled with the system C++ compiler ($CXX, else c++ / g++ / clang++), side by
side, and linked into one library, against the XLA FFI headers that jaxlib ships
(`jax.ffi.include_dir()`), for this machine's CPU
(-march=native), into a cache directory: $MOESCALE_KERNEL_CACHE, else
~/.cache/moescale/kernels (a temporary directory if that is not writable). The file name is a
hash of the sources, the flags, the jaxlib version and the CPU's feature flags, so an edited
source, a new jaxlib or another machine sharing the home directory builds its own copy. The
build writes to a temporary name and renames it into place: processes building at the same
time never load a half-written library.

Why a compiled extension at all: see the sources and the binding modules beside this file.
Every caller keeps XLA's own ops as the fallback, so a machine without a compiler computes the
same results, only slower.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import jax

log = logging.getLogger(__name__)

_HERE = pathlib.Path(__file__).parent
SOURCES = (_HERE / 'pkm_search.cc', _HERE / 'pkm_gather.cc',   # compiled into one library
           _HERE / 'attention.cc', _HERE / 'moe_ffn.cc')
HEADERS = (_HERE / 'parallel.h', _HERE / 'small_gemm.h', _HERE / 'activations.h')
COMPILE_FLAGS = ('-O3', '-march=native', '-std=c++17', '-fPIC', '-pthread')
LINK_FLAGS = ('-shared', '-pthread')
FLAGS = COMPILE_FLAGS + LINK_FLAGS
# FFI target name -> the handler symbol in pkm_search.cc / pkm_gather.cc / attention.cc /
# moe_ffn.cc.
TOP_K = 'moescale_top_k'
GATHER_REDUCE = 'moescale_gather_reduce'
GATHER_DOT = 'moescale_gather_dot'
SCATTER_ADD = 'moescale_scatter_add'
PRODUCT_TOP_K = 'moescale_product_top_k'
PRODUCT_TOP_K_GRAD = 'moescale_product_top_k_grad'
ATTENTION = 'moescale_attention'
ATTENTION_GRAD = 'moescale_attention_grad'
MOE_FFN = 'moescale_moe_ffn'
MOE_FFN_GRAD = 'moescale_moe_ffn_grad'
_SYMBOLS = {TOP_K: 'MoescaleTopK', PRODUCT_TOP_K: 'MoescaleProductTopK',
            PRODUCT_TOP_K_GRAD: 'MoescaleProductTopKGrad',
            GATHER_REDUCE: 'MoescaleGatherReduce',
            GATHER_DOT: 'MoescaleGatherDot', SCATTER_ADD: 'MoescaleScatterAdd',
            ATTENTION: 'MoescaleAttention', ATTENTION_GRAD: 'MoescaleAttentionGrad',
            MOE_FFN: 'MoescaleMoeFfn', MOE_FFN_GRAD: 'MoescaleMoeFfnGrad'}


class KernelBuildError(RuntimeError):
  """The C++ kernels could not be built (no compiler, or it failed: the message has its log)."""


def compiler() -> str | None:
  """The C++ compiler to use: $CXX if set, else the first of c++, g++, clang++ on PATH."""
  if os.environ.get('CXX'):
    return shutil.which(os.environ['CXX']) or os.environ['CXX']
  for name in ('c++', 'g++', 'clang++'):
    path = shutil.which(name)
    if path:
      return path
  return None


def _cpu_features() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      return next((line for line in f if line.startswith('flags')), '')
  except OSError:
    return platform.processor()


def _cache_dir() -> pathlib.Path:
  base = os.environ.get('MOESCALE_KERNEL_CACHE') or os.path.join(
      os.path.expanduser('~'), '.cache', 'moescale', 'kernels')
  path = pathlib.Path(base)
  try:
    path.mkdir(parents=True, exist_ok=True)
    if os.access(path, os.W_OK):
      return path
  except OSError:
    pass
  return pathlib.Path(tempfile.gettempdir()) / 'moescale-kernels'


def library_path(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """Where the library for this source, jaxlib and CPU lives (built or not)."""
  import jaxlib
  key = hashlib.sha256()
  for part in (*(f.read_bytes() for f in SOURCES + HEADERS), ' '.join(FLAGS).encode(),
               jaxlib.__version__.encode(), platform.machine().encode(),
               _cpu_features().encode()):
    key.update(part)
  directory = pathlib.Path(cache_dir) if cache_dir is not None else _cache_dir()
  return directory / f'moescale_cpu_{key.hexdigest()[:16]}.so'


def build(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """Compiles SOURCES into one library unless the cache has it; returns the library's path.

  Raises KernelBuildError naming the compiler and its output if it cannot.
  """
  target = library_path(cache_dir)
  if target.exists():
    return target
  cxx = compiler()
  if cxx is None:
    raise KernelBuildError('no C++ compiler found (set $CXX, or install c++ / g++ / clang++)')
  target.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=target.parent) as work:
    # One compiler per source, side by side (the slowest source sets the time: ~20 s instead
    # of ~35 s one after another on 2 cores), then one link into a temporary name.
    objects = [os.path.join(work, f'{src.stem}.o') for src in SOURCES]
    compiles = [[cxx, *COMPILE_FLAGS, f'-I{jax.ffi.include_dir()}', '-c', str(src), '-o', obj]
                for src, obj in zip(SOURCES, objects)]
    tmp = os.path.join(work, target.name)
    _run_all(compiles)
    _run_all([[cxx, *LINK_FLAGS, *objects, '-o', tmp]])
    os.replace(tmp, target)  # atomic: a concurrent build of the same key wins or loses whole
  return target


def _run_all(commands: list[list[str]]) -> None:
  """Runs the commands at once; KernelBuildError naming the first that fails and its output."""
  try:
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cmd in commands]
  except OSError as e:
    raise KernelBuildError(f'{" ".join(commands[0])} could not run: {e}') from None
  failed = None
  for cmd, proc in zip(commands, procs):
    try:
      _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
      proc.kill()
      _, err = proc.communicate()
    if proc.returncode != 0 and failed is None:
      failed = f'{" ".join(cmd)} failed ({proc.returncode}):\n{err[-4000:]}'
  if failed:
    raise KernelBuildError(failed)


_failure: list[str] = []


def failure() -> str | None:
  """Why `load()` returned False (None if it has not, or has not run)."""
  return _failure[-1] if _failure else None


@functools.cache
def load() -> bool:
  """Builds (once per machine), loads and registers the kernels; False if they are unavailable.

  Only XLA:CPU runs them: on another default backend this returns False without building.
  """
  if jax.default_backend() != 'cpu':
    _failure.append(f'the default backend is {jax.default_backend()!r}, not cpu')
    return False
  try:
    lib = ctypes.cdll.LoadLibrary(str(build()))
    for name, symbol in _SYMBOLS.items():
      jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform='cpu')
  except (KernelBuildError, OSError, AttributeError) as e:
    _failure.append(str(e))
    log.warning('moescale C++ kernels unavailable, using XLA ops instead: %s', e)
    return False
  return True
