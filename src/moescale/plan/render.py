"""A plan (`moescale.plan.make_plan`'s dict) as the text `moescale plan` prints."""

from __future__ import annotations

GIB = 2 ** 30


def _b(x) -> str:
  if x is None:
    return '-'
  if abs(x) >= GIB / 10:
    return f'{x / GIB:,.2f} GiB'
  return f'{x / 2 ** 20:,.1f} MiB' if abs(x) >= 2 ** 17 else f'{x / 2 ** 10:,.1f} KiB'


def _t(seconds) -> str:
  if seconds is None:
    return '-'
  return f'{seconds * 1e3:,.1f} ms' if seconds < 10 else f'{seconds:,.1f} s'


def text(plan: dict) -> str:
  mesh = ' x '.join(f'{a} {n}' for a, n in plan['mesh'].items())
  where = f" (topology {plan['topology']})" if plan['topology'] else ''
  lines = [f"{plan['devices']} {plan['platform']} devices{where}, compiled by "
           f"{plan['compiler']}; mesh {mesh}; batch {plan['batch_size']} x "
           f"{plan['sequence_length']} tokens; {plan['params']:,} parameters", '',
           'Memory per device']
  m = plan['memory']
  for key, label in (('params', 'parameters'), ('optimizer_state', 'optimizer state'),
                     ('gradients', 'gradients (in temporaries)'),
                     ('other_state', 'other state'), ('batch', 'batch'),
                     ('arguments', 'compiler: arguments'), ('outputs', 'compiler: outputs'),
                     ('aliased', 'compiler: aliased (donated)'),
                     ('temporaries', 'compiler: temporaries'), ('code', 'compiler: code'),
                     ('peak', 'peak')):
    value = _b(m.get(key))
    if key == 'temporaries' and m.get('temporaries_at_least'):
      value = '>= ' + _b(m['temporaries_at_least'])
    lines.append(f'  {label:<30} {value:>14}')
  fit = plan['fit']
  if fit.get('compiler'):
    lines.append(f"  DOES NOT FIT: the compiler refused it: {fit['compiler']}")
  elif fit['fits'] is None:
    lines.append('  device memory unknown (--device_memory_gib): no verdict')
  else:
    verdict = 'fits' if fit['fits'] else 'DOES NOT FIT'
    lines.append(f"  {verdict}: {_b(m['peak'])} of {_b(fit['device_memory'])}, "
                 f"{'margin' if fit['fits'] else 'missing'} {_b(abs(fit['margin']))}")
    if plan['compiler'] == 'cuda':
      # JAX preallocates XLA_PYTHON_CLIENT_MEM_FRACTION of a GPU (0.75 unless set).
      lines.append('  (of the whole GPU: run with XLA_PYTHON_CLIENT_MEM_FRACTION=0.95, JAX '
                   'takes 0.75 of it by default)')
  if fit['suggestions']:
    lines += ['', 'What would make it fit'] + [f'  {s}' for s in fit['suggestions']]
  if plan['largest_arrays']:
    lines += ['', 'Largest arrays per device']
    lines += [f"  {_b(a['bytes']):>12}  {a['shape']:<40} {a['op']}"
              for a in plan['largest_arrays']]
  if plan['collectives'] is not None:
    lines += ['', 'Collectives per step, per device (bytes sent: ring algorithms)']
    lines += [f"  {kind:<20} {c['ops']:>5} ops {c['executions']:>7} runs  result "
              f"{_b(c['result_bytes']):>12}  sent {_b(c['sent_bytes']):>12}"
              for kind, c in plan['collectives'].items() if c['ops']]
    lines.append(f"  total sent {_b(plan['collective_bytes_per_step'])}")
  t, a = plan['time'], plan['assumptions']
  lines += ['', 'Step time (a stated model, not a measurement)',
            f"  compute      {_t(t['compute_seconds']):>12}  ({t['flops_per_device']:.3g} FLOPs a "
            f"device at {a['efficiency']:g} of {_flops(a['peak_flops'])})",
            f"  collectives  {_t(t['collective_seconds']):>12}  (bytes sent at "
            f"{_rate(a['link_bytes'])} a device)",
            f"  step         {_t(t['step_seconds']):>12}  "
            f"({'overlapped: the larger' if a['overlap'] else 'not overlapped: the sum'})",
            f"  run          {_hours(t['run_hours'])} for {t['train_steps']:,} steps, "
            f"{_hours(t['device_hours'], 'device-hours')}"]
  s = plan['seconds']
  lines += ['', f"planned in {s['total']:.1f} s (lowering {s['lower']:.1f} s, compiling "
                f"{s['compile']:.1f} s)"]
  if plan.get('compiler_note'):
    lines.append(f"note: {plan['compiler_note']}")
  return '\n'.join(lines)


def _flops(x) -> str:
  return '- (--peak_tflops)' if x is None else f'{x / 1e12:g} TFLOP/s'


def _rate(x) -> str:
  return '- (--link_gbytes)' if x is None else f'{x / 1e9:g} GB/s'


def _hours(x, unit: str = 'hours') -> str:
  if x is None:
    return '-'
  return f'{x:,.1f} {unit}' if x >= 0.1 else f"{x * 3600:,.1f} {unit.replace('hours', 'seconds')}"
