"""`moescale plan`: the command line of `moescale.plan` (see its docstring)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import Sequence

EPILOG = """The config is the one `moescale train` reads (--gin_file, --gin.NAME=VALUE); MODEL_DIR
need not be bound. --mesh overrides the config's mesh macros (DATA_PARALLELISM, ...).
Platforms: tpu_v4, tpu_v5e, tpu_v5p, tpu_v6e (libtpu: pip install 'moescale[plan]'), a100,
h100, h200 (the CUDA plugin), cpu (this host's XLA:CPU, with fake devices). The figures each
assumes are printed with the plan; override them with the flags below."""


PLACEHOLDERS = {'MODEL_DIR': 'unused: moescale plan writes nothing',
                'VOCABULARY': 'bytes'}   # the model's vocab_size is what the step sees


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog='moescale plan', epilog=EPILOG,
                              description='Compile the training step for a mesh of simulated '
                                          'devices: memory, collectives and time per device.',
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--platform', required=True, help='the target devices (see below)')
  p.add_argument('--mesh', default=None, help='DATA,FSDP,TENSOR,EXPERT axis sizes, e.g. 1,16,1,32')
  p.add_argument('--devices', type=int, default=None,
                 help='the device count, where an axis of the mesh is -1')
  p.add_argument('--device_memory_gib', type=float, default=None)
  p.add_argument('--peak_tflops', type=float, default=None, help='per device, bf16')
  p.add_argument('--link_gbytes', type=float, default=None,
                 help='GB/s a device sends while a collective runs')
  p.add_argument('--efficiency', type=float, default=0.4,
                 help='the fraction of peak FLOP/s the step reaches (default 0.4)')
  p.add_argument('--overlap', action='store_true',
                 help='collectives hidden behind compute (step = the larger, not the sum)')
  p.add_argument('--top', type=int, default=8, help='largest arrays to list')
  p.add_argument('--json', action='store_true', help='print the plan as one JSON object')
  return p


def main(argv: Sequence[str]) -> int:
  from moescale import gin_config
  files, bindings, paths, rest = gin_config.split_gin_flags(argv)
  p = parser()
  args = p.parse_args(rest)
  if not files:
    p.error('at least one --gin_file is required, e.g. --gin_file=runs/tiny.gin')
  from moescale import plan
  from moescale.plan import target
  chosen = plan.platform(args.platform).with_overrides(
      args.device_memory_gib, args.peak_tflops, args.link_gbytes)
  mesh = plan.parse_mesh(args.mesh) if args.mesh else None
  plan.Assumptions(args.efficiency, args.overlap)   # bad values refused before JAX starts
  env = {}
  if chosen.compiler == 'cpu' and mesh is not None:
    # Fake CPU devices exist only if asked for before JAX starts its CPU client.
    count = plan.device_count(mesh, args.devices)
    env['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS') or ''} {target.cpu_flag(count)}"
  if chosen.compiler == 'cuda':
    # The CUDA plugin checks the CUDA libraries against a GPU when JAX starts and, finding
    # none, does not load: a compile-only plan needs the plugin, not a GPU.
    env['JAX_SKIP_CUDA_CONSTRAINTS_CHECK'] = '1'
  with _environ(env):   # only for this call: a caller's later subprocesses must not inherit
    return _plan(files, bindings, paths, args, chosen, mesh)


@contextlib.contextmanager
def _environ(changes: dict[str, str]):
  saved = {k: os.environ.get(k) for k in changes}
  os.environ.update(changes)
  try:
    yield
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


def _plan(files, bindings, paths, args, chosen, mesh) -> int:
  from moescale import gin_config, plan
  from moescale.plan import render, target
  assumptions = plan.Assumptions(args.efficiency, args.overlap)
  # What the step does not read need not be bound: where the run leaves them to the user
  # (a paper run names its vocabulary), placeholders. The user's own bindings are checked.
  bound = {b.split('=', 1)[0].strip() for b in bindings}
  placeholders = [f'{name} = {value!r}' for name, value in PLACEHOLDERS.items()
                  if name not in bound]
  gin_config.parse(files, [*bindings, *placeholders], paths, finalize=False)
  from moescale import gin_checks
  gin_checks.check_macros(gin_checks.binding_statements(bindings), gin_config.READ_BY_CODE)
  import gin
  model_fn, cfg, _ = gin_config.run_parts()
  length, _, stream = gin_config.data_shape(' '.join(files))
  mem_len = int(gin.get_bindings('TransformerLM').get('mem_len') or 0)
  try:
    result = plan.make_plan(model_fn, cfg, chosen, length=length, stream=stream,
                            mem_len=mem_len, mesh=mesh, devices=args.devices,
                            assumptions=assumptions, top=args.top)
  except target.Unavailable as e:
    print(f'moescale plan: error: {e}', file=sys.stderr)
    return 2
  print(json.dumps(result, indent=1) if args.json else render.text(result))
  return 0
