"""The report's other figures, as PNG files: training curves, expert usage over training, and
perplexity against parameters (matplotlib, Agg canvas, through `plots.new_figure`).

loss_curves.png            training loss against training tokens seen (log x), one line per
                           run; beside it the loss of each logged evaluation domain
expert_usage_<run>.png     per routed layer, a heatmap of each expert's share of the kept
                           assignments at every log step (1/E is perfect balance), and the
                           fraction of assignments dropped over capacity
perplexity_vs_params.png   one panel per domain: every run's perplexity against its total
                           parameters (log x), by family, the reference family joined
"""

from __future__ import annotations

import os
import re
from typing import Sequence

from moescale.analysis.history import History
from moescale.analysis.plots import new_figure, save_png

_MARKERS = 'osD^vP*X'


def loss_curves(histories: Sequence[History], tokens_per_step: dict[str, float],
                path: str) -> str:
  """Training loss (and logged evaluation loss per domain) of every run, against training
  tokens where every run's tokens per step are known, else against steps."""
  by_tokens = all(h.run in tokens_per_step for h in histories)
  domains = list(dict.fromkeys(d for h in histories for d in h.evals))
  fig, axes = new_figure(1 + len(domains))
  panels = [('training loss', lambda h: h.loss)] + [
      (f'eval loss: {d}', lambda h, d=d: h.evals.get(d)) for d in domains]
  for ax, (title, series) in zip(axes, panels):
    for i, h in enumerate(histories):
      s = series(h)
      if s is None or not len(s[0]):
        continue
      x = s[0] * tokens_per_step[h.run] if by_tokens else s[0]
      ax.plot(x, s[1], marker='.' if len(x) < 20 else None, lw=1, color=f'C{i % 10}',
              label=h.run)
    ax.set_xscale('log')
    ax.set_xlabel('training tokens' if by_tokens else 'step')
    ax.set_ylabel('loss (nats / token)')
    ax.set_title(title, fontsize=9)
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(fontsize=6)
  return save_png(fig, path)


def expert_usage(h: History, path: str) -> str:
  """Heatmaps of expert shares per routed layer, and the dropped fraction where logged."""
  layers = list(h.usage)
  fig, axes = new_figure(len(layers) + bool(h.dropped))
  for ax, layer in zip(axes, layers):
    steps, usage = h.usage[layer]
    e = usage.shape[1]
    # One log (a very short run) still gets a column of width 1 step, not an empty extent.
    x0, x1 = (steps[0], steps[-1]) if steps[-1] > steps[0] else (steps[0] - 0.5, steps[0] + 0.5)
    # Colour relative to perfect balance (1/E), so that layers of any E read alike.
    im = ax.imshow((usage * e).T, aspect='auto', origin='lower', cmap='viridis', vmin=0,
                   vmax=max(2.0, float((usage * e).max())), interpolation='nearest',
                   extent=(x0, x1, -0.5, e - 0.5))
    ax.set_xlabel('step')
    ax.set_ylabel('expert')
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_title(f'{h.run} {layer}: share x E', fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05)
  if h.dropped:
    ax = axes[len(layers)]
    for i, (layer, (steps, frac)) in enumerate(h.dropped.items()):
      ax.plot(steps, frac, lw=1, color=f'C{i % 10}', label=layer)
    ax.set_xlabel('step')
    ax.set_ylabel('fraction dropped')
    ax.set_title(f'{h.run}: assignments over capacity', fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=6)
  return save_png(fig, path)


def perplexity_vs_params(rows: Sequence[dict], reference: str, path: str) -> str:
  """Perplexity against total parameters, one panel per domain."""
  domains = list(dict.fromkeys(r['domain'] for r in rows))
  fig, axes = new_figure(len(domains))
  for ax, domain in zip(axes, domains):
    here = [r for r in rows if r['domain'] == domain and r.get('params')]
    families = list(dict.fromkeys(r['family'] for r in here))
    for i, family in enumerate(families):
      pts = sorted((r for r in here if r['family'] == family), key=lambda r: r['params'])
      x, y = [r['params'] for r in pts], [r['perplexity'] for r in pts]
      ax.plot(x, y, ls='-' if family == reference else 'none',
              marker=_MARKERS[i % len(_MARKERS)], color='black' if family == reference
              else f'C{i}', label=family)
    ax.set_xscale('log')
    ax.set_xlabel('parameters')
    ax.set_ylabel('perplexity')
    ax.set_title(domain, fontsize=9)
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(fontsize=7)
  return save_png(fig, path)


def file_name(run: str) -> str:
  """A run name ('small/moe') as a file-name part ('small_moe')."""
  return re.sub(r'[^A-Za-z0-9_.-]+', '_', run).strip('_') or 'run'


def write_history_plots(histories: Sequence[History], rows: Sequence[dict], reference: str,
                        out_dir: str) -> list[str]:
  """Every figure of this module for these runs; returns the PNG paths."""
  os.makedirs(out_dir, exist_ok=True)
  per_step = {}
  for r in rows:
    if r.get('tokens') and r.get('step'):
      per_step[r['run']] = r['tokens'] / r['step']
  paths = [loss_curves(histories, per_step, os.path.join(out_dir, 'loss_curves.png'))]
  if rows:
    paths.append(perplexity_vs_params(rows, reference,
                                      os.path.join(out_dir, 'perplexity_vs_params.png')))
  for h in histories:
    if h.routed:
      paths.append(expert_usage(h, os.path.join(out_dir,
                                                f'expert_usage_{file_name(h.run)}.png')))
  return paths

