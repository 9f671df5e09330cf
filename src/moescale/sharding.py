"""Device meshes and logical axis rules (t5x style): the ground floor of distribution.

Every parameter carries logical axis names (`moescale.layers.common` has the legend). Rules map
each logical name to mesh axes in priority order; a mesh axis is used at most once per array,
so a later dimension whose mesh axis is taken stays replicated (flax's `logical_to_mesh_axes`).

The mesh has four named axes, always in this order, sizes possibly 1:

    data    pure data parallelism: params replicated, batch split
    fsdp    data parallelism with parameters (and optimizer state) split along `embed`
    expert  expert parallelism: expert weights split along `expert`; tokens also split here
            (each expert-parallel rank holds different tokens and swaps them all-to-all)
    tensor  tensor (model) parallelism: `mlp`, `heads`, `vocab` split

Worked example, 8 devices, mesh (data=2, fsdp=1, expert=4, tensor=1): the batch is split 8 ways
over (data, fsdp, expert); a [512, 256, 1024] expert weight ('expert','embed','mlp') is split
4 ways on its first axis (128 experts per device) and replicated over `data`.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

import jax
import numpy as np
from flax import linen as nn_linen
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'expert', 'tensor')
BATCH_AXES = ('data', 'fsdp', 'expert')

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

# Parameters use the plain names; activations use act_* names so that, e.g., `embed` can be
# FSDP-split on weights while activations keep d_model whole.
DEFAULT_RULES: Rules = (
    ('batch', BATCH_AXES),
    ('act_batch', BATCH_AXES),
    ('act_length', None),
    ('act_embed', None),
    ('act_mlp', 'tensor'),
    ('act_heads', 'tensor'),
    ('act_kv', None),
    ('act_vocab', 'tensor'),
    ('act_expert', 'expert'),
    ('expert', 'expert'),
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv', None),
    ('vocab', 'tensor'),
    ('keys', None),
    ('values', 'tensor'),
    ('length', None),
    ('norm', None),
    ('layers', None),      # the stacked-layers axis of scanned blocks: never split
)


def mesh_shape(data: int = -1, fsdp: int = 1, expert: int = 1, tensor: int = 1,
               num_devices: int | None = None) -> dict[str, int]:
  """Resolves one -1 entry to 'the rest of the devices'; checks the product.

  >>> mesh_shape(data=-1, expert=4, num_devices=8)
  {'data': 2, 'fsdp': 1, 'expert': 4, 'tensor': 1}
  """
  n = jax.device_count() if num_devices is None else num_devices
  sizes = {'data': data, 'fsdp': fsdp, 'expert': expert, 'tensor': tensor}
  unknown = [k for k, v in sizes.items() if v == -1]
  bad = {k: v for k, v in sizes.items() if v != -1 and (not isinstance(v, int) or v < 1)}
  if bad or len(unknown) > 1:
    raise ValueError(f'mesh sizes {sizes}: each must be a positive int, at most one -1')
  known = math.prod(v for v in sizes.values() if v != -1)
  if unknown:
    if n % known:
      raise ValueError(f'{n} devices do not divide by the fixed mesh axes {sizes} '
                       f'(product {known})')
    sizes[unknown[0]] = n // known
  if math.prod(sizes.values()) != n:
    raise ValueError(f'mesh {sizes} has {math.prod(sizes.values())} devices, but {n} are '
                     f'available: valid are axis sizes whose product is {n}, or one axis -1 '
                     'for the devices the others leave')
  return sizes


def make_mesh(data: int = -1, fsdp: int = 1, expert: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 4-axis mesh (data, fsdp, expert, tensor) over all (or the given) devices."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(data, fsdp, expert, tensor, num_devices=len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  # Auto axes: GSPMD propagates shardings from our explicit in/out shardings and constraints.
  types = (jax.sharding.AxisType.Auto,) * 4
  try:
    return jax.make_mesh(shape, MESH_AXES, axis_types=types, devices=devices)
  except NotImplementedError:
    # A TPU slice's devices are laid out on its physical torus, each mesh axis a product of
    # whole physical axes; an axis of 32 on an 8x8x8 slice needs one physical axis split (JAX
    # refuses by default: such an axis's rings are less direct). Split rather than fail.
    from jax.experimental import mesh_utils
    grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    return Mesh(grid, MESH_AXES, axis_types=types)


def logical_to_spec(names: Sequence[str | None] | None, rules: Rules = DEFAULT_RULES) -> P:
  """('batch', 'act_length', 'act_embed') -> P(('data','fsdp','expert'), None, None)."""
  if names is None:
    return P()
  known = {r[0] for r in rules}
  unknown = [n for n in names if n is not None and n not in known]
  if unknown:
    raise ValueError(f'logical axis names {unknown} have no rule; known: {sorted(known)}')
  return nn_linen.logical_to_mesh_axes(tuple(names), list(rules))


def _fit_spec(spec: P, shape: Sequence[int], mesh: Mesh | jax.sharding.AbstractMesh) -> P:
  """Drops mesh axes that do not divide a dimension (e.g. 4 heads over tensor=8), so small
  test models still run on big meshes; the dimension is then replicated over those axes. An
  axis the mesh lacks (a user's own mesh) is dropped too."""
  sizes = dict(mesh.shape)
  out = []
  for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
    kept, size = [], 1
    for a in axes:
      if a in sizes and dim % (size * sizes[a]) == 0:
        kept.append(a)
        size *= sizes[a]
    out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return P(*out)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules = DEFAULT_RULES):
  """NamedShardings for an (abstract) nnx.State from each Variable's logical names."""
  def one(var):
    names = var.get_metadata().get('out_sharding') if isinstance(var, nnx.Variable) else None
    value = var.get_value() if isinstance(var, nnx.Variable) else var
    shape = getattr(value, 'shape', ())
    spec = _fit_spec(logical_to_spec(names, rules), shape, mesh) if names else P()
    sharding = NamedSharding(mesh, spec)
    return var.replace(sharding) if isinstance(var, nnx.Variable) else sharding
  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def undivided(state: nnx.State, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> list[dict]:
  """Where `state_shardings` replicates a dimension its rules would split, because the mesh
  axis (size > 1) does not divide it: one {'path', 'shape', 'dim', 'axis', 'axis_size'} each.
  Harmless for a small test model on a big mesh; for a real run (`moescale plan`) it is memory
  and parallelism lost without a word."""
  sizes, out = dict(mesh.shape), []
  for path, var in nnx.to_flat_state(state):
    names = var.get_metadata().get('out_sharding') if isinstance(var, nnx.Variable) else None
    if not names:
      continue
    shape = var.get_value().shape
    wanted = logical_to_spec(names, rules)
    for i, (dim, entry) in enumerate(zip(shape, tuple(wanted))):
      size = 1
      for a in ((entry,) if isinstance(entry, str) else tuple(entry or ())):
        if sizes.get(a, 1) > 1 and dim % (size * sizes[a]):
          out.append({'path': '/'.join(map(str, path)), 'shape': tuple(shape), 'dim': i,
                      'axis': a, 'axis_size': sizes[a]})
        elif a in sizes:
          size *= sizes[a]
  return out


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Batch arrays [batch, length, ...] split on the batch axis over the data axes."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def batch_shards() -> int:
  """How many ways the batch is split in the mesh JAX is tracing under (the product of the
  BATCH_AXES sizes; 1 without a mesh): the data-parallel shards, each one device's rows."""
  mesh = jax.sharding.get_abstract_mesh()
  sizes = {} if mesh.empty else dict(mesh.shape)
  return int(np.prod([sizes.get(a, 1) for a in BATCH_AXES]))


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Iterator[None]:
  """The one context a sharded program is traced and run under: JAX's mesh (`jax.set_mesh`)
  and the logical axis rules of its activation constraints (flax's `nnx.logical_axis_rules`).
  Both are the libraries' own contexts; moescale keeps no state of its own."""
  with jax.set_mesh(mesh), nnx.logical_axis_rules(tuple(rules)):
    yield


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """with_sharding_constraint by logical names, under the mesh JAX is tracing with (jax.set_mesh)
  and flax's logical axis rules (DEFAULT_RULES when none are set); the identity without a mesh,
  so layers annotate freely and still run un-meshed in a notebook or a unit test."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  rules = flax_spmd.get_logical_axis_rules() or DEFAULT_RULES
  spec = _fit_spec(logical_to_spec(names, rules), x.shape, mesh)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def host_rows(mesh: Mesh, batch_size: int) -> slice:
  """This process's rows of a global [batch_size, ...] batch: block `jax.process_index()` of
  `jax.process_count()` equal blocks, the trainer's and the data pipelines' convention (what
  each process passes to `host_local_to_global`).

  Raises ValueError where that would not assemble the global batch one process sees:
  batch_size does not divide by the processes or the data-parallel mesh size, or the mesh's
  device order gives this process's devices other rows under `batch_sharding` (e.g. a batch
  replicated over processes, by a mesh whose data axes all stay inside one process).
  """
  count, index = jax.process_count(), jax.process_index()
  shards = math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.shape)
  if batch_size % count or batch_size % shards:
    raise ValueError(f'batch_size={batch_size} must divide by the {count} processes and by the '
                     f'data-parallel mesh size {shards} (mesh {dict(mesh.shape)})')
  per_host = batch_size // count
  block = slice(index * per_host, (index + 1) * per_host)
  held = batch_sharding(mesh, 1).addressable_devices_indices_map((batch_size,)).values()
  rows = sorted({r for (s,) in held for r in range(*s.indices(batch_size))})
  if rows != list(range(block.start, block.stop)):
    raise ValueError(f'process {index} of {count} holds rows {rows[0]}..{rows[-1]} of a batch of '
                     f'{batch_size} on mesh {dict(mesh.shape)}, not its block {block.start}..'
                     f'{block.stop - 1}: use a mesh whose data axes (data, fsdp, expert) span '
                     'the processes in order (moescale.sharding.make_mesh over jax.devices())')
  return block


def host_local_to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles global arrays from each process's host-local batch shard (multi-host safe)."""
  def one(x):
    sharding = batch_sharding(mesh, x.ndim)
    return jax.make_array_from_process_local_data(sharding, x)
  return {k: one(v) for k, v in batch.items()}
