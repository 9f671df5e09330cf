"""A plan from a compiled step: memory per device against the device's, what would make it fit,
the collectives, and a step time and run cost from a stated model.

Memory per device (bytes):
  held    parameters, optimizer state, other model state (RNG counters, XL memory), the
          batch: each leaf's shard (`program.shard_bytes`); gradients: one more copy of the
          parameters' shards, inside the compiler's temporaries.
  peak    the compiler's figures: arguments + outputs - aliased (the donated state is
          updated in place) + temporaries + generated code.
  fits    peak <= the device's memory; the margin is what is left (negative: missing).

Step time (the assumptions print beside the numbers):
  compute     training FLOPs per step (`moescale.accounting`: tokens x train FLOPs per token,
              the 'standard' 6N convention plus attention) / devices / (peak x efficiency)
  collectives the bytes each device sends per step (`plan.hlo`) / link bandwidth
  step        compute + collectives (no overlap: an upper bound; --overlap: the larger one)
  run         train_steps x step; device-hours = run x devices.
Worked example: 2e16 FLOPs a step on 512 chips of 459 TFLOP/s at efficiency 0.4 take
2e16 / 512 / 1.836e14 = 212.8 ms; 60 GB sent a device at 600 GB/s add 100 ms: 312.8 ms a
step, so 100,000 steps take 8.69 hours, 4,448 device-hours.
"""

from __future__ import annotations

import dataclasses

from moescale.plan import hlo
from moescale.plan.platforms import Platform
from moescale.plan.program import Program

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Assumptions:
  efficiency: float = 0.4     # fraction of peak FLOP/s the step's matmuls reach
  overlap: bool = False       # collectives hidden behind compute (step = max) or not (sum)

  def __post_init__(self):
    if not 0 < self.efficiency <= 1:
      raise ValueError(f'efficiency={self.efficiency!r}; valid: a fraction in (0, 1]')


def memory(program: Program) -> dict:
  """Bytes per device (module docstring); peak None where the compiler refused the program."""
  s = program.state_bytes
  out = {'params': s['params'], 'optimizer_state': s['opt_state'], 'gradients': s['params'],
         'other_state': s['rest'] + s['memory'], 'batch': program.batch_bytes}
  m = program.memory
  if m is not None:
    out.update(arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes,
               aliased=m.alias_size_in_bytes, temporaries=m.temp_size_in_bytes,
               code=m.generated_code_size_in_bytes)
    out['peak'] = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                   + m.temp_size_in_bytes + m.generated_code_size_in_bytes)
  else:
    # The compiler's total temporaries where it says them; one allocation it could not place
    # only bounds them from below.
    r = program.refused
    out.update(arguments=None, outputs=None, aliased=None, code=None, peak=None,
               temporaries=None if r.array else r.needed,
               temporaries_at_least=r.needed if r.array else None)
  return out


def fits(mem: dict, platform: Platform, refused=None) -> dict:
  """{'device_memory', 'fits', 'margin'} against the platform's memory (None: unknown)."""
  cap = platform.memory_bytes
  if refused is not None:
    cap = refused.available or cap
    return {'device_memory': cap, 'fits': False, 'margin': None, 'compiler': str(refused)}
  if cap is None:
    return {'device_memory': None, 'fits': None, 'margin': None}
  return {'device_memory': cap, 'fits': mem['peak'] <= cap, 'margin': cap - mem['peak']}


def step_time(flops_per_step: float, devices: int, sent_bytes: float | None,
              platform: Platform, assumptions: Assumptions, train_steps: int) -> dict:
  """The stated model of the module docstring; None where a figure it needs is unknown."""
  compute = (flops_per_step / devices / (platform.peak_flops * assumptions.efficiency)
             if platform.peak_flops else None)
  comm = sent_bytes / platform.link_bytes if platform.link_bytes and sent_bytes is not None \
      else None
  if compute is None:
    step = None
  elif comm is None:
    step = compute
  else:
    step = max(compute, comm) if assumptions.overlap else compute + comm
  return {'flops_per_step': flops_per_step, 'flops_per_device': flops_per_step / devices,
          'compute_seconds': compute, 'collective_seconds': comm, 'step_seconds': step,
          'train_steps': train_steps,
          'run_hours': None if step is None else step * train_steps / 3600,
          'device_hours': None if step is None else step * train_steps * devices / 3600}


def suggestions(mem: dict, fit: dict, alternatives: dict[str, dict], cfg, *,
                remat: bool = False, batch_shards: int = 1) -> list[str]:
  """What would make it fit, each with its flag and its effect. alternatives: {mesh flag:
  state bytes per device under that mesh} (exact, not compiled); remat: the model already
  rematerialises; batch_shards: the mesh's batch shards, which a microbatch must fill."""
  if fit.get('fits') is not False:
    return []
  held = mem['params'] + mem['optimizer_state'] + mem['gradients']
  out = []
  for flag, state in alternatives.items():
    after = state['params'] * 2 + state['opt_state']
    if after < held:
      out.append(f'{flag}: parameters, optimizer state and gradients {_gib(held)} -> '
                 f'{_gib(after)} a device (exact for the state; plan it to see the rest)')
  temp = mem.get('temporaries') or mem.get('temporaries_at_least')
  if temp and not remat:
    out.append(f'--gin.TransformerLM.remat=True: recompute each block in the backward pass; '
               f'activations kept for it are most of the {_gib(temp)} of temporaries')
  accum = 2 * cfg.step.grad_accum_steps
  if temp and (cfg.batch_size // cfg.step.parallel_microbatches) % (accum * batch_shards) == 0:
    out.append(f'--gin.StepConfig.grad_accum_steps={accum}: microbatches half the size, '
               'their activations about half the memory (the batch and the update stay the '
               'same)')
  if not out:
    out.append('nothing on this mesh: more devices (a larger --mesh), or a smaller model')
  return out


def _gib(x: float) -> str:
  return f'{x / GIB:,.2f} GiB'


def collective_summary(program: Program, devices: int) -> tuple[dict | None, float | None]:
  """({kind: totals per step}, bytes sent per device per step), None when not compiled."""
  if program.hlo is None:
    return None, None
  items = hlo.collectives(program.hlo, devices)
  summary = hlo.summary(items)
  return summary, sum(s['sent_bytes'] for s in summary.values())
