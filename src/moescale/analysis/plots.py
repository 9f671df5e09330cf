"""The figures of a speedup analysis, as PNG files (matplotlib, Agg canvas, imported on use).

    paths = write_plots(analyse(records, fit='powerlaw'), 'plots/')

perplexity_vs_flops.png     one panel per domain: the dense runs and their curve (the fit
                            dashed, where asked for), every other run as a point, log x
perplexity_vs_seconds.png   the same against measured device-seconds (where the dense runs
                            have them)
speedup.png                 one panel per domain: each run's speedup in FLOPs and in
                            device-seconds side by side; an out-of-range factor is drawn
                            hatched at its bound, with '>' or '<' over it

Figures are built on `matplotlib.figure.Figure` with its own Agg canvas, never pyplot: no
global backend is switched and nothing opens a window, in a notebook or on a headless host.
"""

from __future__ import annotations

import math
import os

import numpy as np

from moescale.analysis.speedup import MEASURES, Analysis

_LABELS = {'flops': 'training FLOPs', 'seconds': 'training device-seconds'}
_MARKERS = 'osD^vP*X'


def write_plots(analysis: Analysis, out_dir: str) -> list[str]:
  """Writes the figures into out_dir (created); returns the PNG paths written."""
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for measure in MEASURES:
    if any(m == measure for _, m in analysis.curves):
      paths.append(save_png(_curves_figure(analysis, measure),
                         os.path.join(out_dir, f'perplexity_vs_{measure}.png')))
  paths.append(save_png(_speedup_figure(analysis), os.path.join(out_dir, 'speedup.png')))
  return paths


def new_figure(panels: int):
  from matplotlib.figure import Figure
  cols = min(panels, 3)
  rows = math.ceil(panels / cols)
  fig = Figure(figsize=(5.2 * cols, 4.0 * rows), layout='constrained')
  axes = fig.subplots(rows, cols, squeeze=False).ravel()
  for ax in axes[panels:]:
    ax.set_visible(False)
  return fig, axes


def save_png(fig, path: str) -> str:
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  FigureCanvasAgg(fig).print_png(path)
  return path


def _curves_figure(analysis: Analysis, measure: str):
  from matplotlib.ticker import NullFormatter
  column = MEASURES[measure]
  domains = [d for d in analysis.domains if (d, measure) in analysis.curves]
  fig, axes = new_figure(len(domains))
  for ax, domain in zip(axes, domains):
    rows = [r for r in analysis.rows if r['domain'] == domain and r.get(column) is not None]
    curve = analysis.curves[domain, measure]
    xs = np.geomspace(curve.compute[0], curve.compute[-1], 100)
    ax.plot(xs, [curve.perplexity_at(x) for x in xs], color='black', lw=1.2,
            label=f'{analysis.reference} (interpolated)')
    fit = analysis.fits.get((domain, measure))
    if fit is not None:
      # Over every run of the panel: the extrapolated factors read off the dashed part.
      xs = np.geomspace(min([fit.lo] + [r[column] for r in rows]) / 1.5,
                        max([fit.hi] + [r[column] for r in rows]) * 1.5, 100)
      ax.plot(xs, [fit.perplexity_at(x) for x in xs], color='gray', ls='--', lw=1,
              label=f'fit {fit.a:.3g}·C^-{fit.b:.3g}')
    families = list(dict.fromkeys(r['family'] for r in rows))
    for i, family in enumerate(families):
      pts = [r for r in rows if r['family'] == family]
      ax.scatter([r[column] for r in pts], [r['perplexity'] for r in pts],
                 marker=_MARKERS[i % len(_MARKERS)], s=30, zorder=3, label=family,
                 color='black' if family == analysis.reference else f'C{i}')
      # One label per configuration: its seeds sit at one compute, and a label each would
      # cover the points.
      labelled = set()
      for r in pts:
        name = r.get('config') or r['run']
        if name not in labelled:
          labelled.add(name)
          ax.annotate(name, (r[column], r['perplexity']), fontsize=6, xytext=(3, 3),
                      textcoords='offset points')
    ax.set_xscale('log')
    ax.xaxis.set_minor_formatter(NullFormatter())   # minor labels (3x10^11, ...) overlap
    ax.set_xlabel(_LABELS[measure])
    ax.set_ylabel('perplexity')
    ax.set_title(domain, fontsize=9)
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(fontsize=7)
  return fig


def _speedup_figure(analysis: Analysis):
  domains = analysis.domains
  fig, axes = new_figure(len(domains))
  width = 0.4
  for ax, domain in zip(axes, domains):
    records = [s for s in analysis.speedups if s['domain'] == domain]
    labelled = set()
    for j, measure in enumerate(MEASURES):
      for i, s in enumerate(records):
        f = s[measure]
        value = f['speedup'] if f['speedup'] is not None else f['bound']
        if value is None:
          continue
        hatch = None if f['speedup'] is not None else '//'
        ax.bar(i + (j - 0.5) * width, value, width, color=f'C{j}', hatch=hatch,
               edgecolor='black', lw=0.5,
               label=None if measure in labelled else _LABELS[measure])
        labelled.add(measure)
        if hatch:
          ax.annotate('>' if f['bound_kind'] == 'lower' else '<', (i + (j - 0.5) * width, value),
                      ha='center', va='bottom', fontsize=8)
    if not labelled:  # every factor 'no_curve' / 'no_data': say so rather than show nothing
      ax.text(0.5, 0.5, f'no {analysis.reference} curve', transform=ax.transAxes,
              ha='center', va='center', color='gray')
    ax.axhline(1.0, color='black', lw=0.8)
    ax.set_xticks(range(len(records)), [s['run'] for s in records], rotation=30, ha='right',
                  fontsize=7)
    ax.set_ylabel(f'speedup over {analysis.reference}')
    ax.set_title(domain, fontsize=9)
    ax.grid(True, axis='y', alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if labels:
      ax.legend(fontsize=7)
  return fig
