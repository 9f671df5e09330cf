"""Expert parallelism: each device of the mesh's `expert` axis computes only its own experts.

A wrapper around any dispatch backend, run inside `jax.shard_map` ("ring of experts"):

    per device r of P along `expert` (local tokens x_r [t/P', d], local experts E/P):
      1. all-gather the tokens and their routing over `expert`     x_all [P·t_r, d]
      2. keep the assignments that go to experts r·E/P .. (r+1)·E/P - 1, renumbered 0..E/P-1;
         every other assignment becomes the dispatch sentinel (not computed)
      3. the inner backend computes those experts on those rows      y_all [P·t_r, d] (partial)
      4. reduce-scatter over `expert`: each device gets the sum for its own tokens

Each device does 1/P of the expert FLOPs, and nothing is dropped that the router kept, so it
works for dropless and capacity routing alike. It needs only all-gather and reduce-scatter, which
every XLA backend has (`ragged_all_to_all` does not exist on XLA:CPU). The communication is P
times an all-to-all's; an all-to-all variant for capacity-bounded routing is the natural next
step on TPU/GPU.

Worked example: 8 devices as (data=2, expert=4), 16 experts, 4096 tokens per step, top-2. Each
device holds 512 tokens and experts {4r..4r+3}; it gathers the 2048 tokens of its expert
group, computes the ~1024 assignments to its 4 experts, and keeps the reduced 512 rows.

When the expert axis also carries `tensor` parallelism on `mlp` (expert_size), each device
computes its slice of the hidden units and the partial outputs are summed over `tensor` too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from moescale import sharding as shd
from moescale.layers import dispatch as dispatch_lib

EXPERT_AXIS = 'expert'


class ExpertParallel:
  """`ExpertParallel(inner, mesh)(x, expert_index, weights, experts, activation, capacity)`."""

  def __init__(self, inner: dispatch_lib.DispatchBackend, mesh: Mesh):
    self.inner, self.mesh = inner, mesh
    self.name = f'expert_parallel({getattr(inner, "name", type(inner).__name__)})'

  def _fits(self, tokens: int, experts: dispatch_lib.ExpertWeights) -> bool:
    rows = 1
    for a in shd.BATCH_AXES:
      rows *= self.mesh.shape[a]
    return experts.num_experts % self.mesh.shape[EXPERT_AXIS] == 0 and tokens % rows == 0

  def __call__(self, x, expert_index, weights, experts, activation, capacity=None):
    dispatch_lib.check_assignment_shapes(x, expert_index, weights, experts)
    if not self._fits(x.shape[0], experts):
      # Shapes that do not split evenly fall back to GSPMD's choice (correct, not sharded work).
      return self.inner(x, expert_index, weights, experts, activation, capacity)
    mesh, inner = self.mesh, self.inner
    num_shards = mesh.shape[EXPERT_AXIS]
    tensor = mesh.shape['tensor']
    local_experts = experts.num_experts // num_shards
    hidden = experts.w_in.shape[-1]
    split_hidden = tensor > 1 and hidden % tensor == 0
    mlp = 'tensor' if split_hidden else None
    rows = P(shd.BATCH_AXES, None)
    specs = dispatch_lib.ExpertWeights(
        w_in=P(EXPERT_AXIS, None, mlp), w_out=P(EXPERT_AXIS, mlp, None),
        b_in=None if experts.b_in is None else P(EXPERT_AXIS, mlp),
        b_out=None if experts.b_out is None else P(EXPERT_AXIS, None))
    local_capacity = None if capacity is None else capacity * num_shards

    def local(x, expert_index, weights, w):
      rank = jax.lax.axis_index(EXPERT_AXIS)
      gather = lambda a: jax.lax.all_gather(a, EXPERT_AXIS, axis=0, tiled=True)
      x_all, idx_all, w_all = gather(x), gather(expert_index), gather(weights)
      local_idx = idx_all - rank * local_experts
      mine = (idx_all < experts.num_experts) & (local_idx >= 0) & (local_idx < local_experts)
      local_idx = jnp.where(mine, local_idx, local_experts).astype(expert_index.dtype)
      w_all = jnp.where(mine, w_all, jnp.zeros_like(w_all))
      if split_hidden and w.b_out is not None:
        # The output bias is added once, on tensor rank 0; the other ranks add partial sums.
        first = jax.lax.axis_index('tensor') == 0
        w = w._replace(b_out=jnp.where(first, w.b_out, jnp.zeros_like(w.b_out)))
      y_all = inner(x_all, local_idx, w_all, w, activation, local_capacity)
      if split_hidden:
        y_all = jax.lax.psum(y_all, 'tensor')
      return jax.lax.psum_scatter(y_all, EXPERT_AXIS, scatter_dimension=0, tiled=True)

    return jax.shard_map(local, mesh=mesh, in_specs=(rows, rows, rows, specs),
                         out_specs=rows, check_vma=False)(x, expert_index, weights, experts)


def wrap_for_mesh(backend: dispatch_lib.DispatchBackend) -> dispatch_lib.DispatchBackend:
  """`backend`, wrapped in ExpertParallel when the active mesh has an expert axis > 1."""
  mesh = shd.current_mesh()
  if mesh is None or mesh.shape.get(EXPERT_AXIS, 1) == 1 or isinstance(backend, ExpertParallel):
    return backend
  return ExpertParallel(backend, mesh)
