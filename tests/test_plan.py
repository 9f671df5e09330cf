"""`moescale plan`: the trainer's step compiled for a mesh of simulated devices. Its memory figures
are checked against what the same config allocates when it runs on the tests' 8 fake CPU
devices; the HLO reading against hand-written programs; the time model against its worked
example; bad input against its messages. The TPU compile itself needs libtpu (`pip install
'moescale[plan]'`), the GPU compile the CUDA plugin (`'moescale[plan-gpu]'`, no GPU): those
tests run where they are installed."""

import dataclasses
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moescale import gin_config, plan
from moescale import sharding as shd
from moescale.plan import cli, estimate, hlo, platforms, program
from moescale.train import step as step_lib
from moescale.train import trainer

TINY = ['--gin_file=runs/tiny.gin']


def _installed(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:   # its parent package is not installed either
    return False


def _tiny(bindings=()):
  gin_config.parse(['runs/tiny.gin'], ["MODEL_DIR='/tmp/unused'", *bindings], finalize=False)
  model_fn, cfg, _ = gin_config.run_parts()
  return model_fn, cfg


def _device0_bytes(tree) -> int:
  """Bytes of the shards that live on the first device: what it actually holds."""
  first = jax.devices()[0]
  return sum(s.data.nbytes for leaf in jax.tree.leaves(tree) for s in leaf.addressable_shards
             if s.device == first)


def test_cpu_plan_equals_what_the_trainer_allocates_and_compiles():
  model_fn, cfg = _tiny()
  mesh_sizes = {'data': 2, 'fsdp': 2, 'tensor': 1, 'expert': 2}
  got = plan.make_plan(model_fn, cfg, platforms.platform('cpu').with_overrides(1, 1, 10),
                       length=128, mesh=mesh_sizes)
  # The real thing on the same 8 devices: the trainer's state, initialised, and its step.
  cfg = plan.with_mesh(cfg, mesh_sizes)
  mesh = trainer.check_mesh(model_fn, cfg)
  built = trainer.build_state(model_fn, cfg, mesh)
  m = got['memory']
  assert m['params'] == _device0_bytes(built.state.params) > 0
  assert m['optimizer_state'] == _device0_bytes(built.state.opt_state) > 0
  assert m['other_state'] == _device0_bytes(built.state.rest) + _device0_bytes(built.state.step)
  step = step_lib.jit_train_step(step_lib.make_train_step(
      built.graphdef, built.optimizer, built.schedule, cfg.step), built.state_sh, mesh)
  sh = shd.batch_sharding(mesh, 1)
  batch = {k: jax.device_put(np.ones((16, 128), np.int32), sh) for k in program.PACKED_KEYS}
  with shd.use_mesh(mesh, cfg.rules):
    compiled = step.lower(built.state, batch).compile()
    new_state, metrics = compiled(built.state, batch)
  stats = compiled.memory_analysis()
  assert m['temporaries'] == stats.temp_size_in_bytes > 0
  assert m['arguments'] == stats.argument_size_in_bytes == m['params'] + m[
      'optimizer_state'] + m['other_state'] + m['batch']
  assert m['aliased'] == stats.alias_size_in_bytes > 0         # the donated state
  assert np.isfinite(float(metrics['loss']))
  assert _device0_bytes(new_state.params) == m['params']       # the step keeps the layout
  assert got['fit']['fits'] is True and got['fit']['margin'] == 2 ** 30 - m['peak']
  assert got['collectives']['all-gather']['ops'] > 0           # FSDP gathers its weights
  assert got['collective_bytes_per_step'] > 0


def test_a_plan_that_does_not_fit_says_what_would():
  model_fn, cfg = _tiny()
  sizes = {'data': 8, 'fsdp': 1, 'tensor': 1, 'expert': 1}
  got = plan.make_plan(model_fn, cfg, platforms.platform('cpu').with_overrides(0.001, 1, 10),
                       length=128, mesh=sizes)
  fit = got['fit']
  assert fit['fits'] is False and fit['margin'] == 0.001 * 2 ** 30 - got['memory']['peak']
  text = '\n'.join(fit['suggestions'])
  # Moving a factor 2 from data to fsdp halves the FSDP-split state, exactly.
  assert '--mesh=4,2,1,1' in text and '--gin.TransformerLM.remat=True' in text
  assert '--gin.StepConfig.grad_accum_steps=2' not in text   # 16 rows / 2 / 2 / 8 shards


def test_cli_prints_a_table_and_json(capsys):
  args = [*TINY, '--platform=cpu', '--mesh=2,2,1,2', '--device_memory_gib=1',
          '--peak_tflops=1', '--link_gbytes=10']
  assert cli.main(args) == 0
  out = capsys.readouterr().out
  assert '8 cpu devices' in out and 'fits:' in out and 'Collectives per step' in out
  assert cli.main([*args, '--json']) == 0
  got = json.loads(capsys.readouterr().out)
  assert got['mesh'] == {'data': 2, 'fsdp': 2, 'tensor': 1, 'expert': 2}
  assert got['assumptions']['efficiency'] == 0.4 and got['time']['step_seconds'] > 0


@pytest.mark.parametrize('args, message', [
    (['--platform=tpu_v9'], "'tpu_v9' is not a known platform; valid: ['tpu_v4'"),
    (['--platform=cpu', '--mesh=2,2,2'], 'four sizes DATA,FSDP,TENSOR,EXPERT'),
    (['--platform=cpu', '--mesh=2,0,1,1'], 'four sizes DATA,FSDP,TENSOR,EXPERT'),
    (['--platform=cpu', '--mesh=3,1,1,1', '--devices=8'], 'but 8 are available'),
    (['--platform=cpu', '--mesh=-1,1,1,1'], 'pass --devices N'),
    (['--platform=cpu', '--mesh=1,1,1,8', '--gin.BATCH_SIZE=4'],
     'batch_size=4 must be a multiple of 8'),
    # runs/tiny.gin's 4 heads over tensor=8: replicated without a word, were it not refused.
    (['--platform=cpu', '--mesh=1,1,8,1'],
     'blocks/0/attention/q_proj [128, 4, 32]: dimension 1 (4) over tensor=8'),
    (['--platform=cpu', '--mesh=1,1,8,1'], 'valid: tensor in [1, 2, 4] (--mesh)'),
    (['--platform=cpu', '--efficiency=0'], 'efficiency=0.0; valid: a fraction in (0, 1]'),
])
def test_bad_input(args, message):
  with pytest.raises(ValueError) as e:
    cli.main([*TINY, *args])
  assert message in str(e.value)


def test_more_cpu_devices_than_jax_started_with(capsys):
  assert cli.main([*TINY, '--platform=cpu', '--mesh=2,1,1,8', '--gin.BATCH_SIZE=32']) == 2
  err = capsys.readouterr().err
  assert 'a cpu plan of 16 devices needs 16 CPU devices, and JAX started with 8' in err


def test_experts_that_do_not_divide_the_expert_axis_are_refused():
  model_fn, cfg = _tiny(['NUM_EXPERTS = 6'])
  with pytest.raises(ValueError, match='6 experts .* do not divide over the expert mesh axis'):
    plan.make_plan(model_fn, cfg, platforms.platform('cpu'), length=128,
                   mesh={'data': 2, 'fsdp': 1, 'tensor': 1, 'expert': 4})


HLO = """HloModule m

%body (p: (s32[], f32[256,1024])) -> (s32[], f32[256,1024]) {
  %p = (s32[], f32[256,1024]) parameter(0)
  %x = f32[256,1024]{1,0} get-tuple-element(%p), index=1
  %ag = f32[1024,1024]{1,0} all-gather(%x), replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}
  %rs = f32[128,1024]{1,0} reduce-scatter(%ag), replica_groups=[1,8]<=[8], dimensions={0}
  ROOT %t = (s32[], f32[256,1024]) tuple(%i, %x)
}

%cond (p: (s32[], f32[256,1024])) -> pred[] {
  %p = (s32[], f32[256,1024]) parameter(0)
  %c = s32[] constant(3)
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

ENTRY %main (a: f32[256,1024]) -> f32[256,1024] {
  %a = f32[256,1024]{1,0} parameter(0)
  %ar = bf16[512,512]{1,0} all-reduce(%a), replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, to_apply=%add
  %w = (s32[], f32[256,1024]) while(%tuple), condition=%cond, body=%body
  %cp = f32[256,1024]{1,0} collective-permute(%a), source_target_pairs={{0,1},{1,0}}
  ROOT %r = f32[256,1024]{1,0} get-tuple-element(%w), index=1
}
"""


def test_collectives_are_read_with_loop_counts_groups_and_bytes():
  got = {c.kind: c for c in hlo.collectives(HLO, devices=8)}
  ag, rs, ar, cp = (got[k] for k in ('all-gather', 'reduce-scatter', 'all-reduce',
                                    'collective-permute'))
  assert (ag.count, rs.count, ar.count, cp.count) == (3, 3, 1, 1)   # the loop runs 3 times
  assert (ag.group, rs.group, ar.group) == (4, 8, 4)
  mib = 2 ** 20
  assert ag.result_bytes == 4 * mib and ag.sent_bytes == 3 * mib          # B (n-1)/n
  assert rs.result_bytes == mib / 2 and rs.sent_bytes == 3.5 * mib        # B (n-1)
  assert ar.result_bytes == mib / 2 and ar.sent_bytes == 0.75 * mib       # 2 B (n-1)/n
  assert cp.sent_bytes == mib
  total = hlo.summary(got.values())
  assert total['all-gather']['sent_bytes'] == 9 * mib and total['all-to-all']['ops'] == 0
  largest = hlo.largest_arrays(HLO, 2)
  assert [a['name'] for a in largest] == ['ag', 'cp'] and largest[0]['bytes'] == 4 * mib


def test_refusals_are_read_from_the_compilers_messages():
  r = program._refusal('RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory '
                       'required for HLO temporaries (2.18T) exceeds available HBM (95.74G).')
  assert r.needed == pytest.approx(2.18 * 2 ** 40) and r.available == pytest.approx(
      95.74 * 2 ** 30)
  r = program._refusal(
      'RESOURCE_EXHAUSTED: Allocation (size=274877906944) would exceed memory (size='
      '103079215104) :: %s0 = inlined_call_operand.hbm [shape: bf16[16,524288,16384], index: '
      '0, kind: input, shape index: {}] /* operand 0 */ :: bitcast_dynamic-update-slice_fusion.92')
  assert (r.needed, r.available) == (274877906944, 103079215104)
  assert r.array['shape'] == 'bf16[16,524288,16384]'
  assert r.array['name'] == 'bitcast_dynamic-update-slice_fusion.92'
  assert program._refusal('INVALID_ARGUMENT: bad') is None


def test_step_time_worked_example():
  v5p = platforms.platform('tpu_v5p')
  t = estimate.step_time(2e16, 512, 60e9, v5p, estimate.Assumptions(0.4), 100_000)
  assert t['compute_seconds'] == pytest.approx(0.21276, abs=1e-5)
  assert t['collective_seconds'] == pytest.approx(0.1)
  assert t['run_hours'] == pytest.approx(8.6877, abs=1e-4)
  assert t['device_hours'] == pytest.approx(4448.12, abs=0.01)
  overlapped = estimate.step_time(2e16, 512, 60e9, v5p, estimate.Assumptions(0.4, True), 1)
  assert overlapped['step_seconds'] == pytest.approx(0.21276, abs=1e-5)
  with pytest.raises(ValueError, match='efficiency=1.5'):
    estimate.Assumptions(1.5)


def test_tpu_topologies():
  v5p, v5e = platforms.platform('tpu_v5p'), platforms.platform('tpu_v5e')
  assert [v5p.topology(n) for n in (4, 8, 32, 64, 512)] == [
      'v5p:2x2x1', 'v5p:2x2x2', 'v5p:2x4x4', 'v5p:4x4x4', 'v5p:8x8x8']
  assert v5e.topology(256) == 'v5e:16x16'
  with pytest.raises(ValueError, match='12 tpu_v5p chips make no 3-D TPU topology'):
    v5p.topology(12)


@pytest.mark.skipif(importlib.util.find_spec('libtpu') is None,
                    reason="libtpu not installed (pip install 'moescale[plan]')")
def test_tpu_plan_compiles_the_tpu_program(capsys):
  assert cli.main([*TINY, '--platform=tpu_v5p', '--mesh=1,2,1,2', '--json']) == 0
  got = json.loads(capsys.readouterr().out)
  assert got['topology'] == 'v5p:2x2x1' and got['compiler'] == 'tpu'
  assert got['fit']['fits'] is True and got['fit']['device_memory'] == 95 * 2 ** 30
  assert got['collectives']['all-gather']['ops'] > 0


def test_gpu_descriptions_carry_the_platforms_figures():
  """What XLA:GPU is told of a GPU it compiles for without one: the published figures, and
  the platform's memory (an override included), which the plan's fit uses too."""
  from moescale.plan import gpu_target
  h100 = platforms.platform('h100')
  text = gpu_target.target_config(h100)
  assert 'core_count: 132\n' in text and 'cuda_compute_capability { major: 9 minor: 0 }' in text
  assert f'device_memory_size: {int(h100.memory_bytes)}\n' in text
  assert 'device_description_str: "NVIDIA H100 80GB HBM3"' in text
  a100 = gpu_target.target_config(platforms.platform('a100').with_overrides(memory_gib=40))
  assert 'core_count: 108\n' in a100 and f'device_memory_size: {40 * 2 ** 30}\n' in a100
  assert 'major: 8 minor: 0' in a100
  h200 = gpu_target.target_config(platforms.platform('h200'))
  assert 'memory_bandwidth: 4800000000000\n' in h200 and 'device_memory_size: 141000000000' in h200
  with pytest.raises(ValueError, match="no GPU description for 'tpu_v5p'"):
    gpu_target.target_config(platforms.platform('tpu_v5p'))
  from moescale.plan import target
  with pytest.raises(ValueError, match='12 h100 GPUs do not fill nodes of 8'):
    target.devices(h100, 12)


def test_a_gemm_xla_gpu_cannot_tile_without_autotuning_goes_to_cublas_and_says_so():
  class Lowered:   # what XLA:GPU did with Artetxe et al.'s 2.7B (head_dim 80), no GPU present
    def __init__(self, fails):
      self.fails, self.calls = fails, []

    def compile(self, options):
      self.calls.append(dict(options))
      if self.fails and options.get('xla_gpu_enable_triton_gemm') is not False:
        raise jax.errors.JaxRuntimeError(
            "INTERNAL: Couldn't find output tile sizes that satisfy hlo: %dot.79 = f32[32768,2560]")
      return 'compiled'
  lowered = Lowered(fails=True)
  compiled, note = program.compile_lowered(lowered, {'a': 1})
  assert compiled == 'compiled' and lowered.calls[-1] == {'a': 1,
                                                          'xla_gpu_enable_triton_gemm': False}
  assert 'could not tile a GEMM' in note and 'f32[32768,2560]' in note
  lowered = Lowered(fails=False)
  assert program.compile_lowered(lowered, None) == ('compiled', None) and len(lowered.calls) == 1

  class Broken(Lowered):   # any other compiler error is not retried
    def compile(self, options):
      raise jax.errors.JaxRuntimeError('INTERNAL: something else')
  with pytest.raises(jax.errors.JaxRuntimeError, match='something else'):
    program.compile_lowered(Broken(True))


def test_a_tpu_compiler_in_use_or_missing_is_named(monkeypatch):
  """libtpu serves one process a machine, and its own message says to delete its lock, which
  would let two share it: the plan says the compiler is busy instead. Without libtpu (or the
  CUDA plugin), what to install."""
  from jax.experimental import topologies
  from moescale.plan import target
  for key in target._LIBTPU_ENV:
    monkeypatch.setenv(key, os.environ.get(key, ''))   # restored after the test
  monkeypatch.setenv('TPU_ACCELERATOR_TYPE', 'v5p-8')

  def busy(**_):
    raise RuntimeError('ABORTED: Internal error when accessing libtpu multi-process lockfile. '
                       'Run "$ sudo rm /tmp/libtpu_lockfile".')
  monkeypatch.setattr(topologies, 'get_topology_desc', busy)
  with pytest.raises(target.Unavailable, match='in use by another process') as e:
    target.devices(platforms.platform('tpu_v5p'), 4)
  assert 'sudo rm' not in str(e.value)

  def missing(**_):
    raise RuntimeError('TPU runtime not installed')
  monkeypatch.setattr(topologies, 'get_topology_desc', missing)
  with pytest.raises(target.Unavailable, match=r"pip install 'moescale\[plan\]'"):
    target.devices(platforms.platform('tpu_v5p'), 4)

  def no_plugin(**_):
    raise NotImplementedError('topology not implemented for cuda')
  monkeypatch.setattr(topologies, 'get_topology_desc', no_plugin)
  with pytest.raises(target.Unavailable, match=r"pip install 'moescale\[plan-gpu\]'"):
    target.devices(platforms.platform('h100'), 8)


@pytest.mark.skipif(not _installed('jax_plugins.xla_cuda12'),
                    reason="CUDA plugin not installed (pip install 'moescale[plan-gpu]')")
def test_gpu_plan_compiles_the_gpu_program_without_a_gpu(capsys):
  assert cli.main([*TINY, '--platform=h100', '--mesh=1,2,1,2', '--json']) == 0
  got = json.loads(capsys.readouterr().out)
  assert got['compiler'] == 'cuda' and got['topology'] == '1x1x4' and got['fit']['fits'] is True
  assert got['fit']['device_memory'] == 80e9
  assert got['collectives']['all-gather']['ops'] > 0
  assert 'JAX_SKIP_CUDA_CONSTRAINTS_CHECK' not in os.environ   # for the call only


def test_a_cpu_plan_leaves_the_environment_as_it_was(monkeypatch):
  # Its fake-device flag is for this call only: a later subprocess (a notebook kernel, a
  # `moescale` command) must start with the devices the caller asked for.
  jax.devices()   # JAX has started, with the tests' 8 devices: a plan of 16 is refused (2)
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
  assert cli.main([*TINY, '--platform=cpu', '--mesh=2,1,1,8', '--gin.BATCH_SIZE=32']) == 2
  assert os.environ['XLA_FLAGS'] == '--xla_force_host_platform_device_count=8'
  monkeypatch.delenv('XLA_FLAGS')
  assert cli.main([*TINY, '--platform=cpu', '--mesh=2,1,1,8', '--gin.BATCH_SIZE=32']) == 2
  assert 'XLA_FLAGS' not in os.environ


def test_a_transformer_xl_plan_counts_the_memory_the_trainer_keeps():
  """Csordás et al.'s CPU-sized model reads contiguous streams with one segment of memory:
  the plan's batch is the stream's and its state holds the memory, as the trainer's does."""
  gin_config.parse(['models/small/csordas_dense.gin', 'runs/csordas2023.gin'],
                   ["MODEL_DIR='/tmp/unused'"], finalize=False)
  model_fn, cfg = gin_config.run_parts()[:2]
  length, _, stream = gin_config.data_shape()
  assert stream
  sizes = {'data': 2, 'fsdp': 1, 'tensor': 1, 'expert': 1}
  got = plan.make_plan(model_fn, cfg, platforms.platform('cpu'), length=length, stream=stream,
                       mem_len=length, mesh=sizes)
  cfg = plan.with_mesh(cfg, sizes)
  mesh = trainer.check_mesh(model_fn, cfg, jax.devices()[:2])
  built = trainer.build_state(model_fn, cfg, mesh)
  held = (_device0_bytes(built.state.memory) + _device0_bytes(built.state.rest)
          + _device0_bytes(built.state.step))
  assert got['memory']['other_state'] == held and _device0_bytes(built.state.memory) > 2 ** 19
  assert got['memory']['arguments'] == sum(
      got['memory'][k] for k in ('params', 'optimizer_state', 'other_state', 'batch'))
