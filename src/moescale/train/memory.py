"""Transformer-XL memory in training and evaluation: its shape, an empty one, its place in
the train state and in a batch, and the check that the data is a contiguous stream.

The memory of a batch is {'layers': [[batch, mem, d_model]] per layer, 'mask': [batch, mem]
bool}: row b holds the end of row b's previous segment (mask False where nothing is yet), so
it is split over the data axes as the batch rows are, and it is part of `TrainState` (and of
every checkpoint: a resumed run continues with the memory it had).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from moescale import sharding as shd

Batch = dict[str, jax.Array]


class MemorySpec(NamedTuple):
  """The Transformer-XL memory a model keeps: one [batch, mem_len, d_model] per layer."""
  layers: int
  d_model: int
  dtype: Any
  mem_len: int


def memory_spec(graphdef, params, rest) -> MemorySpec | None:
  """What memory the model returns from a forward pass (its own mem_len), or None."""
  found = {}

  def probe(params, rest):
    model = nnx.merge(graphdef, params, rest)
    found['mem_len'] = int(getattr(model, 'mem_len', 0) or 0)
    return model(jnp.zeros((1, 1), jnp.int32)).memory

  out = jax.eval_shape(probe, params, rest)
  if not out or not found['mem_len']:
    return None
  return MemorySpec(len(out), out[0].shape[-1], out[0].dtype, found['mem_len'])


def empty_memory(spec: MemorySpec, batch: int, mem_len: int | None = None, sharding=None):
  """A memory of mem_len (default: the model's) slots per row, all empty (mask False)."""
  layers, d, dtype = spec.layers, spec.d_model, spec.dtype
  mem_len = spec.mem_len if mem_len is None else mem_len
  zeros = lambda shape, dt: (jnp.zeros(shape, dt) if sharding is None
                             else jax.device_put(jnp.zeros(shape, dt), sharding))
  return {'layers': [zeros((batch, mem_len, d), dtype) for _ in range(layers)],
          'mask': zeros((batch, mem_len), bool)}


def forward_kwargs(batch) -> dict:
  """The model call's memory arguments from a batch `with_memory` made ({} without)."""
  if 'memory' not in batch:
    return {}
  return {'memory': batch['memory']['layers'], 'memory_mask': batch['memory']['mask']}


def next_memory(out, batch):
  """The memory for the next segment, per row (None when the batch carried none)."""
  if 'memory' not in batch:
    return None
  return {'layers': list(out.memory), 'mask': out.memory_mask}


def with_memory(batch: Batch, memory) -> Batch:
  """The batch with the state's memory added, rows that start a new stream emptied."""
  batch = dict(batch)
  reset = batch.pop('memory_reset', None)
  if memory is None:
    return batch
  mask = memory['mask']
  if reset is not None:
    mask = mask & (reset[:, None] == 0)
  return {**batch, 'memory': {'layers': memory['layers'], 'mask': mask}}


def attach(state, state_sh, spec: MemorySpec, batch_size: int, mesh, abstract: bool = False):
  """The state with an empty memory for batch_size rows, split over the data axes as the
  batch rows are (each device keeps its own rows' memory). abstract: its shapes only, as the
  rest of an abstract state (nothing is allocated: `moescale plan` compiles for devices that
  hold no arrays)."""
  sharding = shd.batch_sharding(mesh, 1)
  if abstract:
    memory = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                          jax.eval_shape(lambda: empty_memory(spec, batch_size)))
  else:
    memory = empty_memory(spec, batch_size, sharding=sharding)
  return (dataclasses.replace(state, memory=memory),
          dataclasses.replace(state_sh, memory=jax.tree.map(lambda _: sharding, memory)))


class CheckedStream:
  """The train iterator, refusing data whose rows are not contiguous streams: memory carried
  from one packed, shuffled row to the next would be unrelated text. Peeks at the first batch
  (and reports the position from before it until it is handed out)."""

  def __init__(self, it, spec: MemorySpec):
    self._it, self._start = it, it.position()
    self._first = next(it)
    if 'memory_reset' not in self._first:
      raise ValueError(
          f'the model keeps Transformer-XL memory (mem_len={spec.mem_len}) but the training '
          'data is packed: rows do not continue from one batch to the next. Train on '
          'contiguous streams (seqio_data.stream = True; moescale.data.stream) or set '
          'mem_len = 0.')

  def __iter__(self):
    return self

  def __next__(self):
    if self._first is not None:
      first, self._first = self._first, None
      return first
    return next(self._it)

  def position(self):
    return self._start if self._first is not None else self._it.position()
