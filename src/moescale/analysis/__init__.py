"""From trained runs to the papers' answers: speedup factors (Artetxe et al. 2022) and
parameter-matched comparisons (Csordás et al. 2023).

    from moescale import analysis
    rows = analysis.collect_runs(['runs/dense_s', 'runs/dense_m', 'runs/moe_s'])
    analysis.write_records(rows, 'runs.csv')          # what `moescale collect` writes
    result = analysis.analyse(analysis.read_records('runs.csv'), fit='powerlaw')
    result.speedups                                     # one dict per (run, domain)
    pairs, notes = analysis.param_matched(rows)
    analysis.write_plots(result, 'plots/')              # PNG paths
    analysis.build_report(run_dirs, 'report/')          # report.md + plots: `moescale report`
    run_dirs = analysis.stage_runs(['gs://bucket/study'], '/tmp/runs')   # cloud -> local

Modules, by concern: records (the CSV / JSON-lines file and its columns), collect (run
directories -> records; counts abstract models with JAX), speedup (dense curves, fits and
factors: NumPy only), matched (parameter-matched comparison), tables (text tables), plots
(matplotlib), history and history_plots (training curves, expert usage), report and report_md
(report.md), storage (cloud run directories), cli (`moescale collect`, `speedup`, `report`).
Names load on first use, so reading a records file or computing speedups imports no JAX.
"""

from moescale import lazy

_LAZY = {
    'COLUMNS': 'records', 'read_records': 'records', 'write_records': 'records',
    'collect_runs': 'collect',
    'analyse': 'speedup', 'Analysis': 'speedup', 'DenseCurve': 'speedup', 'Factor': 'speedup',
    'PowerLaw': 'speedup',
    'param_matched': 'matched',
    'write_plots': 'plots',
    'build_report': 'report', 'Report': 'report',
    'read_history': 'history', 'History': 'history',
    'stage_runs': 'storage',
}

__getattr__, __dir__, __all__ = lazy.names(__name__, _LAZY)
