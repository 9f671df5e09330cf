"""The accelerator programs lower from a CPU machine: every family's whole train step, sharded,
exports for TPU and for CUDA with `jax.export` and contains no CPU-only kernel ('auto' follows
the platform the program is built for, not the host), while the same step built for this
CPU host still runs moescale's C++ kernels where they apply (one device)."""

import functools
import re

import jax
import numpy as np
import optax
import pytest

from moescale import sharding as shd
from moescale.layers import DenseFFN, ProductKeyMemory, SigmaMoE, TopKMoE
from moescale.model import TransformerLM
from moescale.train import step as step_lib

FAMILIES = {
    'dense': functools.partial(DenseFFN, d_ff=64),
    'topk_moe': functools.partial(TopKMoE, num_experts=4, expert_size=32, top_k=2,
                                  capacity_factor=1.0),
    'sigma_moe': functools.partial(SigmaMoE, num_experts=4, expert_size=16, top_k=2),
    'pkm': functools.partial(ProductKeyMemory, num_heads=2, num_keys=8, knn=4,
                             query_proj=False, score_fn='relu'),
}
MESHES = {'one_device': dict(devices=jax.devices()[:1]), 'data2_expert4': dict(data=2, expert=4)}
CUSTOM_CALL = re.compile(r'custom_call @([\w.$-]+)')


def _exportable_step(family, mesh):
  """(jitted train step, abstract state, abstract batch) of a small LM with `family`."""
  model_fn = functools.partial(TransformerLM, vocab_size=32, d_model=32, num_layers=2,
                               num_heads=4, ffn=functools.partial(DenseFFN, d_ff=64),
                               sparse_ffn=FAMILIES[family])
  tx = optax.adamw(1e-3)
  graphdef, state, state_sh = step_lib.create_train_state(model_fn, tx, 0, mesh)
  step = step_lib.jit_train_step(step_lib.make_train_step(graphdef, tx, lambda s: 1e-3),
                                 state_sh, mesh)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          state, state_sh)
  batch = {k: jax.ShapeDtypeStruct((8, 16), np.int32 if k != 'decoder_loss_weights'
                                   else np.float32, sharding=shd.batch_sharding(mesh))
           for k in ('decoder_input_tokens', 'decoder_target_tokens', 'decoder_loss_weights',
                     'decoder_segment_ids', 'decoder_positions')}
  return step, abstract, batch


@pytest.mark.parametrize('mesh_name', list(MESHES))
@pytest.mark.parametrize('family', list(FAMILIES))
def test_train_step_exports_for_tpu_and_cuda_without_cpu_kernels(family, mesh_name):
  """Kills: a kernel choice made from the host (jax.default_backend()) instead of the
  program's platform, a CPU kernel bound without a platform-dependent fallback."""
  mesh = shd.make_mesh(**MESHES[mesh_name])
  step, state, batch = _exportable_step(family, mesh)
  with shd.use_mesh(mesh):
    for platform in ('tpu', 'cuda'):
      # jax.export itself refuses a custom call without a compatibility guarantee, so a CPU
      # kernel in the program fails here; the check below names it.
      exported = jax.export.export(step, platforms=[platform])(state, batch)
      calls = set(CUSTOM_CALL.findall(exported.mlir_module()))
      assert not {c for c in calls if c.startswith('moescale')}, (platform, calls)
    cpu_calls = set(CUSTOM_CALL.findall(step.lower(state, batch).as_text()))
  # Built for this host, the one-device step runs the C++ kernels of the families that have
  # one ('pkm': its search; top-k / σ-MoE: the fused dispatch) and of attention.
  if mesh_name == 'one_device':
    assert 'moescale_attention' in cpu_calls, cpu_calls
    if family != 'dense':
      assert any(c.startswith(('moescale_moe_ffn', 'moescale_product_top_k'))
                 for c in cpu_calls), cpu_calls
  else:  # XLA cannot split a custom call: a multi-device step keeps XLA's ops
    assert not {c for c in cpu_calls if c.startswith('moescale')}, cpu_calls
