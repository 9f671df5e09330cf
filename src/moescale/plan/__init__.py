"""Plan before you rent: will a config fit, and how fast will it run, on that mesh?

    moescale plan --gin_file=models/artetxe2022/moe_1_1t.gin --gin_file=runs/artetxe2022.gin \\
        --platform=tpu_v5p --mesh=1,16,1,32        # DATA,FSDP,TENSOR,EXPERT: 512 chips

compiles the trainer's own training step (`plan.program`: the same state, optimizer,
shardings, rules and donation as `moescale train`) for that many simulated devices of the
target platform with the target's compiler (`plan.target`: libtpu for a TPU slice, XLA:GPU for
GPUs, XLA:CPU only for --platform cpu), without allocating the model, and reports per device:
parameter, optimizer-state and gradient bytes, the compiler's peak and temporary memory, the
largest arrays, the collectives with their bytes per step (`plan.hlo`), whether it fits the
device's memory and what would (`plan.estimate`), and a step time and run cost from a stated
model. `make_plan` is the same in Python; `plan.render` prints it as a table or JSON.
"""

from __future__ import annotations

import dataclasses
import math
import time

from flax import nnx

from moescale.plan import estimate, hlo, platforms, program, target
from moescale.plan.estimate import Assumptions
from moescale.plan.platforms import PLATFORMS, Platform, platform

MESH_ORDER = ('data', 'fsdp', 'tensor', 'expert')   # the order of --mesh


def parse_mesh(text: str) -> dict[str, int]:
  """'DATA,FSDP,TENSOR,EXPERT' -> {'data': ..., ...}; one entry may be -1 (the rest)."""
  parts = [p.strip() for p in str(text).split(',')]
  try:
    sizes = [int(p) for p in parts]
  except ValueError:
    sizes = None
  if sizes is None or len(sizes) != 4 or any(s == 0 or s < -1 for s in sizes) \
      or sizes.count(-1) > 1:
    raise ValueError(f'--mesh={text!r}; valid: four sizes DATA,FSDP,TENSOR,EXPERT, each a '
                     'positive integer (at most one -1: the devices the others leave), e.g. '
                     '1,16,1,32 for 512 devices')
  return dict(zip(MESH_ORDER, sizes))


def device_count(sizes: dict[str, int], devices: int | None) -> int:
  """The devices a plan simulates: `devices`, else the product of a mesh with no -1."""
  if devices is not None:
    if devices < 1:
      raise ValueError(f'--devices={devices}; valid: a positive number of devices')
    return devices
  if -1 in sizes.values():
    raise ValueError(f'the mesh {sizes} leaves an axis to the device count (-1): pass --devices '
                     'N, or give every axis')
  return math.prod(sizes.values())


def _alternatives(model_fn, cfg, sizes: dict, devs) -> dict[str, dict]:
  """State bytes under meshes that move a factor 2 into fsdp or expert (from data, else from
  the other), exactly and without compiling."""
  from moescale.train import trainer
  out = {}
  for to in ('fsdp', 'expert'):
    for frm in ('data', 'fsdp' if to == 'expert' else 'expert', 'tensor'):
      if frm == to or sizes[frm] % 2:
        continue
      alt = dict(sizes, **{frm: sizes[frm] // 2, to: sizes[to] * 2})
      try:
        mesh = trainer.check_mesh(model_fn, with_mesh(cfg, alt), devs)
        out['--mesh=' + ','.join(str(alt[a]) for a in MESH_ORDER)] = program.state_bytes(
            trainer.build_state(model_fn, cfg, mesh, abstract=True).state)
      except ValueError:
        continue
      break
  return out


def with_mesh(cfg, sizes: dict):
  """The TrainConfig with its mesh axes replaced (the plan's mesh), on all given devices."""
  return dataclasses.replace(cfg, mesh=dataclasses.replace(
      cfg.mesh, data=sizes['data'], fsdp=sizes['fsdp'], expert=sizes['expert'],
      tensor=sizes['tensor'], num_devices=None))


def _check_divided(abstract_params, cfg, mesh) -> None:
  from moescale import sharding as shd
  bad = shd.undivided(abstract_params, mesh, cfg.rules)
  if bad:
    lines = [f"  {b['path']} {list(b['shape'])}: dimension {b['dim']} "
             f"({b['shape'][b['dim']]}) over {b['axis']}={b['axis_size']}" for b in bad[:8]]
    more = f'\n  ... and {len(bad) - 8} more' if len(bad) > 8 else ''
    valid = []
    for axis in dict.fromkeys(b['axis'] for b in bad):
      g = math.gcd(*(b['shape'][b['dim']] for b in bad if b['axis'] == axis))
      valid.append(f'{axis} in {[n for n in range(1, g + 1) if g % n == 0]}')
    raise ValueError(f'{len(bad)} parameter dimension(s) do not divide over the mesh axes '
                     f'their rules split them on, so they would be replicated there:\n'
                     + '\n'.join(lines) + more + f"\nvalid: {'; '.join(valid)} (--mesh), or "
                     'rules that do not split them')


def make_plan(model_fn, cfg, platform_: Platform, *, length: int, stream: bool = False,
              mem_len: int = 0, mesh: dict[str, int] | None = None, devices: int | None = None,
              assumptions: Assumptions = Assumptions(), compiler_options: dict | None = None,
              top: int = 8) -> dict:
  """The plan of training `cfg` (a TrainConfig) with `model_fn` on `platform_` (module
  docstring). length: tokens a row; stream, mem_len: Transformer-XL rows and their memory;
  mesh: {'data', 'fsdp', 'tensor', 'expert'} (default: cfg.mesh's); devices: the device count
  where an axis is -1. A JSON-able dict; ValueError / RuntimeError on bad input."""
  from moescale import accounting
  from moescale import sharding as shd
  from moescale.train import trainer
  sizes = mesh or {'data': cfg.mesh.data, 'fsdp': cfg.mesh.fsdp, 'tensor': cfg.mesh.tensor,
                   'expert': cfg.mesh.expert}
  count = device_count(sizes, devices)
  resolved = shd.mesh_shape(sizes['data'], sizes['fsdp'], sizes['expert'], sizes['tensor'],
                            num_devices=count)
  t = time.perf_counter()
  devs = target.devices(platform_, count)
  if platform_.compiler == 'tpu' and compiler_options is None:
    # libtpu stops at the first program over the chip's memory; told not to, it finishes and
    # says what the program needs, so a plan that does not fit still shows where memory goes.
    compiler_options = {'xla_tpu_no_crash_on_oom': True}
  cfg = with_mesh(cfg, resolved)
  the_mesh = trainer.check_mesh(model_fn, cfg, devs)
  model = accounting.abstract_model(model_fn, cfg.seed)   # shapes only; built once here
  _check_divided(nnx.state(model, nnx.Param), cfg, the_mesh)
  prog = program.compile_step(model_fn, cfg, the_mesh, length, stream, compiler_options)
  mem = estimate.memory(prog)
  fit = estimate.fits(mem, platform_, prog.refused)
  summary, sent = estimate.collective_summary(prog, count)
  c = accounting.count(model_fn, length + mem_len, length)
  flops = c.train_flops_per_token['standard'] * cfg.batch_size * length
  alts = _alternatives(model_fn, cfg, resolved, devs) if fit['fits'] is False else {}
  arrays = hlo.largest_arrays(prog.hlo, top) if prog.hlo else (
      [prog.refused.array] if prog.refused and prog.refused.array else [])
  remat = bool(getattr(model, 'remat', False))
  shards = resolved['data'] * resolved['fsdp'] * resolved['expert']
  return {
      'platform': platform_.name, 'compiler': platform_.compiler, 'devices': count,
      'topology': target.topology_name(platform_, count),
      'mesh': {a: resolved[a] for a in MESH_ORDER}, 'batch_size': cfg.batch_size,
      'sequence_length': length, 'params': c.total_params,
      'memory': mem, 'fit': {**fit, 'suggestions': estimate.suggestions(
          mem, fit, alts, cfg, remat=remat, batch_shards=shards)},
      'largest_arrays': arrays,
      'collectives': summary, 'collective_bytes_per_step': sent,
      'time': estimate.step_time(flops, count, sent, platform_, assumptions, cfg.train_steps),
      'assumptions': {'efficiency': assumptions.efficiency, 'overlap': assumptions.overlap,
                      'peak_flops': platform_.peak_flops, 'link_bytes': platform_.link_bytes,
                      'device_memory': platform_.memory_bytes,
                      'flops_convention': 'standard'},
      'seconds': {**prog.seconds, 'total': time.perf_counter() - t},
      'compiler_note': prog.note,
  }


__all__ = ['PLATFORMS', 'Assumptions', 'Platform', 'device_count', 'make_plan', 'parse_mesh',
           'platform', 'with_mesh']
