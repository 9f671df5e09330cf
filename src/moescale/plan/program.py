"""The training step a run would execute, lowered and compiled for a mesh of simulated devices
without allocating anything: the trainer's own state (`trainer.build_state(abstract=True)`:
the same optimizer, shardings and rules) and its own step (`step.make_train_step`,
`step.jit_train_step`: the same donation and shardings), traced under the same mesh context.

    program = compile_step(model_fn, cfg, mesh, length=2048, stream=False)
    program.state_bytes      # {'params': ..., 'opt_state': ..., 'rest': ..., 'memory': ...}
    program.memory           # the compiler's CompiledMemoryStats (per device)
    program.hlo              # the optimized program, as text (moescale.plan.hlo reads it)

Bytes per device are exact for the state: each leaf's shard shape under its sharding times
its itemsize, the largest shard where shards differ in size (they do not, under the mesh
checks). The compiler's figures are what it assigned for one device's program.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time

import jax
import jax.numpy as jnp

from moescale import sharding as shd
from moescale.train import step as step_lib
from moescale.train import trainer

# The batch a data source yields (moescale.data: packed rows, or Transformer-XL streams).
PACKED_KEYS = ('decoder_input_tokens', 'decoder_target_tokens', 'decoder_loss_weights',
               'decoder_segment_ids', 'decoder_positions')
STREAM_KEYS = ('decoder_input_tokens', 'decoder_target_tokens', 'decoder_loss_weights')


class DoesNotFit(RuntimeError):
  """The target's compiler refused the program for want of device memory; `needed` and
  `available` are its figures in bytes where its message gives them, `array` the one array
  it could not place ({'name', 'shape', 'bytes', 'op'}) where it names one."""

  def __init__(self, message: str, needed: float | None, available: float | None,
               array: dict | None = None):
    super().__init__(message)
    self.needed, self.available, self.array = needed, available, array


@dataclasses.dataclass
class Program:
  mesh: object
  state_bytes: dict[str, int]
  batch_bytes: int
  memory: object | None          # CompiledMemoryStats, None when the compiler refused it
  hlo: str | None
  refused: DoesNotFit | None
  seconds: dict[str, float]
  note: str | None = None        # how the compile departed from the platform's defaults


def batch_spec(cfg: trainer.TrainConfig, mesh, length: int, stream: bool) -> dict:
  """The global batch the trainer feeds its step, as sharded shapes."""
  sh = shd.batch_sharding(mesh, 1)
  keys = STREAM_KEYS if stream else PACKED_KEYS
  out = {k: jax.ShapeDtypeStruct((cfg.batch_size, length), jnp.int32, sharding=sh) for k in keys}
  if stream:
    out['memory_reset'] = jax.ShapeDtypeStruct((cfg.batch_size,), jnp.int32, sharding=sh)
  return out


def itemsize(dtype) -> int:
  """Bytes an element takes; a PRNG key (an RNG stream's state) is its uint32 key data."""
  if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    return 4 * math.prod(dtype._impl.key_shape)   # pylint: disable=protected-access
  return jnp.dtype(dtype).itemsize


def shard_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded shapes."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shape) * itemsize(leaf.dtype)
  return total


def state_bytes(state) -> dict[str, int]:
  """Bytes one device holds of an (abstract) TrainState, by part."""
  return {'params': shard_bytes(state.params), 'opt_state': shard_bytes(state.opt_state),
          'rest': shard_bytes(state.rest) + shard_bytes(state.step),
          'memory': shard_bytes(state.memory) if state.memory is not None else 0}


def compile_step(model_fn, cfg: trainer.TrainConfig, mesh, length: int, stream: bool,
                 compiler_options: dict | None = None) -> Program:
  """Lowers and compiles the trainer's step for `mesh` (see the module docstring)."""
  t = time.perf_counter()
  built = trainer.build_state(model_fn, cfg, mesh, abstract=True)
  state = built.state
  held = state_bytes(state)
  batch = batch_spec(cfg, mesh, length, stream)
  step = step_lib.jit_train_step(step_lib.make_train_step(built.graphdef, built.optimizer,
                                                          built.schedule, cfg.step),
                                 built.state_sh, mesh)
  with shd.use_mesh(mesh, cfg.rules):
    lowered = step.lower(state, batch)
  seconds = {'lower': time.perf_counter() - t}
  t = time.perf_counter()
  try:
    compiled, note = compile_lowered(lowered, compiler_options)
  except jax.errors.JaxRuntimeError as e:
    refused = _refusal(str(e))
    if refused is None:
      raise
    seconds['compile'] = time.perf_counter() - t
    return Program(mesh, held, shard_bytes(batch), None, None, refused, seconds)
  seconds['compile'] = time.perf_counter() - t
  return Program(mesh, held, shard_bytes(batch), compiled.memory_analysis(),
                 compiled.as_text(), None, seconds, note)


_TRITON_TILING = "Couldn't find output tile sizes"
_TRITON_GEMM = 'xla_gpu_enable_triton_gemm'


def compile_lowered(lowered, compiler_options: dict | None = None):
  """(compiled, note): `lowered.compile(compiler_options)`, and where XLA:GPU cannot tile a
  GEMM, again with Triton GEMMs off, the note saying so (None otherwise).

  XLA:GPU picks Triton GEMM tilings by autotuning on the GPU; compiling without one it takes
  defaults, which for some shapes (Artetxe et al.'s 2.7B, head_dim 80) it cannot tile. Those
  GEMMs then go to cuBLAS, as XLA:GPU sends shapes Triton does not take: the same arrays and
  collectives."""
  options = dict(compiler_options or {})
  try:
    return lowered.compile(options), None
  except jax.errors.JaxRuntimeError as e:
    if _TRITON_TILING not in str(e) or options.get(_TRITON_GEMM) is False:
      raise
    note = (f'XLA:GPU could not tile a GEMM without a GPU to autotune on ('
            f'{str(e).splitlines()[0][:160]}...): compiled with {_TRITON_GEMM}=False '
            '(cuBLAS GEMMs)')
    return lowered.compile({**options, _TRITON_GEMM: False}), note


_UNITS = {'': 1, 'B': 1, 'K': 2 ** 10, 'M': 2 ** 20, 'G': 2 ** 30, 'T': 2 ** 40, 'P': 2 ** 50}


def _size(text: str) -> float:
  number, unit = re.fullmatch(r'([\d.]+)\s*([KMGTP]?)i?B?', text.strip()).groups()
  return float(number) * _UNITS[unit]


def _refusal(message: str) -> DoesNotFit | None:
  """A compiler's out-of-memory refusal as DoesNotFit (None: another error). The TPU compiler
  says, e.g., 'RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for
  HLO temporaries (2.18T) exceeds available HBM (95.74G).'"""
  if 'RESOURCE_EXHAUSTED' not in message and 'out of memory' not in message.lower():
    return None
  first = message.strip().splitlines()[0]
  m = re.search(r'\(([\d.]+\s*[KMGTP]?i?B?)\) exceeds available \w+ \(([\d.]+\s*[KMGTP]?i?B?)\)',
                message)
  if m:
    return DoesNotFit(first, _size(m.group(1)), _size(m.group(2)))
  m = re.search(r'Allocation \(size=(\d+)\) would exceed memory \(size=(\d+)\)', message)
  if m:
    # '... :: %s0 = inlined_call_operand.hbm [shape: bf16[16,524288,16384], ...] :: fusion.92'
    shape = re.search(r'shape: ([a-z0-9]+\[[\d,]*\])', message)
    where = re.search(r'\]\s*(?:/\*.*?\*/)?\s*::\s*([\w.\-]+)', message)
    array = {'name': where.group(1) if where else '?', 'shape': shape.group(1) if shape else '?',
             'bytes': float(m.group(1)), 'op': 'the allocation the compiler could not place'}
    return DoesNotFit(first, float(m.group(1)), float(m.group(2)), array)
  return DoesNotFit(first, None, None)
